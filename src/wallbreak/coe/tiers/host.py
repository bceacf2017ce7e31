"""Host tier: one arena of host memory, allocated once at its exact budget and pre-touched.

Allocating per expert would pay page faults on every load and, on CUDA, `pin_memory()` rounds
each allocation up to a power of two. One anonymous mapping of exactly the budget, registered with
CUDA as pinned when a GPU is present, avoids both; experts get 4 KiB-aligned extents of it through
a first-fit allocator, so disk reads can land in it with O_DIRECT.

On the CPU the arena is also where the experts being served are read from (alias slots), so every
decode step streams an expert's weights from it. Asked for transparent huge pages (`madvise`), the
arena's 2 MiB pages cut the TLB misses of that stream: in an interleaved probe the compiled one-row
step of SmolLM2 int8 ran 1.1-1.2x faster on 2 MiB pages than on 4 KiB ones; serving, at most 3%
(docs/benchmarks.md). Where the kernel's THP setting is `never`, the advice does nothing and
`huge_bytes()` says so.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wallbreak.errors import ConfigError

log = logging.getLogger(__name__)
PAGE = 4096
# /proc/self/smaps walks every mapping's page tables (about 10 ms in a serving process): /health,
# on the event loop, reads the huge-page figure at most this often
HUGE_BYTES_MAX_AGE_S = 10.0


@dataclass(frozen=True)
class Extent:
    offset: int
    nbytes: int


class HostArena:
    def __init__(
        self, budget: int, pin: bool = False, pretouch: bool = True, huge_pages: bool = False
    ) -> None:
        if budget < PAGE:
            raise ConfigError(f"host budget must be at least {PAGE} bytes, got {budget}")
        self.budget = budget // PAGE * PAGE
        self._mm = mmap.mmap(-1, self.budget, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.huge_pages = huge_pages and _advise_huge(self._mm)  # before the pages are touched
        self.buffer = torch.frombuffer(self._mm, dtype=torch.uint8)
        if pretouch:
            # Fault every page in now, so a load later is a pure copy.
            np.frombuffer(self._mm, dtype=np.uint8)[::PAGE] = 0
        self.pinned = False
        if pin:
            self.pinned = _register_pinned(self.buffer)
        self._free: list[tuple[int, int]] = [(0, self.budget)]  # sorted (offset, nbytes)
        self.used = 0
        self._huge_bytes: tuple[float, int | None] | None = None  # (when read, bytes)

    def view(self, ext: Extent) -> torch.Tensor:
        return self.buffer[ext.offset : ext.offset + ext.nbytes]

    def memoryview(self, ext: Extent) -> memoryview:
        return memoryview(self._mm)[ext.offset : ext.offset + ext.nbytes]

    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    def alloc(self, nbytes: int) -> Extent | None:
        """First fit; None when no free run is large enough (the caller evicts and retries)."""
        need = (nbytes + PAGE - 1) // PAGE * PAGE
        for i, (off, n) in enumerate(self._free):
            if n >= need:
                if n == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, n - need)
                self.used += need
                return Extent(off, need)
        return None

    def free(self, ext: Extent) -> None:
        i = bisect.bisect_left(self._free, (ext.offset, 0))
        self._free.insert(i, (ext.offset, ext.nbytes))
        self.used -= ext.nbytes
        # Merge with neighbours so large experts still find a run after churn.
        if i + 1 < len(self._free) and self._free[i][0] + self._free[i][1] == self._free[i + 1][0]:
            self._free[i] = (self._free[i][0], self._free[i][1] + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == self._free[i][0]:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    def huge_bytes(self) -> int | None:
        """Bytes of the arena the kernel backs with huge pages, as read at most
        `HUGE_BYTES_MAX_AGE_S` ago (None where /proc cannot say)."""
        now = time.monotonic()
        if self._huge_bytes is None or now - self._huge_bytes[0] > HUGE_BYTES_MAX_AGE_S:
            self._huge_bytes = (now, huge_bytes_in(self.buffer.data_ptr(), self.budget))
        return self._huge_bytes[1]

    def summary(self) -> dict[str, int | bool | None]:
        """Its budget, what is used, whether huge pages were asked for, and what the kernel backs
        with them (`huge_bytes`)."""
        return {"budget": self.budget, "used": self.used, "huge_pages": self.huge_pages,
                "huge_bytes": self.huge_bytes()}  # fmt: skip

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False


def _register_pinned(buf: torch.Tensor) -> bool:
    if not torch.cuda.is_available():
        log.info("no CUDA device: host arena stays pageable")
        return False
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    code = int(err.value if hasattr(err, "value") else err)
    if code != 0:
        log.warning("cudaHostRegister failed (error %s); host->device copies will be pageable", code)
        return False
    return True


def _advise_huge(mm: mmap.mmap) -> bool:
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    if advice is None:
        return False
    try:
        mm.madvise(advice)
    except OSError as e:  # a kernel without THP
        log.info("host arena stays on small pages: madvise(MADV_HUGEPAGE) failed (%s)", e)
        return False
    return True


def huge_bytes_in(start: int, nbytes: int, smaps: str = "/proc/self/smaps") -> int | None:
    """AnonHugePages of the mappings that overlap [start, start + nbytes), from `smaps`."""
    try:
        text = Path(smaps).read_text()
    except OSError:
        return None
    total, inside = 0, False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):  # a mapping's first line: "lo-hi perms ..."
            lo, _, hi = head.partition("-")
            inside = int(lo, 16) < start + nbytes and int(hi, 16) > start
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total
