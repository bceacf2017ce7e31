"""The tier manager: `acquire(expert)` gives a ready model, moving its weights disk -> host -> device.

One condition variable guards all bookkeeping; the bytes move outside it, so loads of different
experts overlap each other and the caller's compute. Loads coalesce: whoever reserves a slot (or an
arena extent) does the load, and everyone else asking for that expert waits for it. An expert that
someone holds, or is waiting for, is never offered to the eviction policy, and neither budget is
ever exceeded: when nothing can be evicted the caller waits or gets a CapacityError, as configured.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from wallbreak.coe.bundle.manifest import Bundle, ExpertEntry
from wallbreak.coe.tiers.device import DevicePool, Slot, bind_to_flat
from wallbreak.coe.tiers.disk import CHUNK_BYTES, READER_THREADS, DirectMode, DiskReader
from wallbreak.coe.tiers.host import Extent, HostArena
from wallbreak.coe.tiers.policy import POLICIES, make_policy
from wallbreak.errors import CapacityError, ConfigError
from wallbreak.units import format_bytes

log = logging.getLogger(__name__)


@dataclass
class TierConfig:
    host_budget: int
    device_budget: int
    device: str = "cpu"
    policy: str = "cost"
    on_full: Literal["wait", "error"] = "wait"
    wait_timeout_s: float = 60.0
    reader_threads: int = READER_THREADS
    chunk_bytes: int = CHUNK_BYTES
    direct: DirectMode = "auto"
    max_slots: int | None = None
    prefetch_workers: int = 2
    # None: alias slots on CPU (a switch re-points views into the host arena), copies on CUDA.
    alias_slots: bool | None = None

    def __post_init__(self) -> None:
        if self.host_budget <= 0:
            raise ConfigError(f"host budget must be positive, got {self.host_budget}")
        if self.device_budget <= 0:
            raise ConfigError(f"device budget must be positive, got {self.device_budget}")
        if self.policy not in POLICIES:
            raise ConfigError(
                f"unknown eviction policy {self.policy!r}; choose one of: {', '.join(POLICIES)}"
            )
        if self.on_full not in ("wait", "error"):
            raise ConfigError(f"on_full must be 'wait' or 'error', got {self.on_full!r}")
        if self.wait_timeout_s <= 0:
            raise ConfigError(f"wait timeout must be positive, got {self.wait_timeout_s}")
        if self.max_slots is not None and self.max_slots < 1:
            raise ConfigError(f"max slots must be >= 1, got {self.max_slots}")
        if self.prefetch_workers < 1:
            raise ConfigError(f"prefetch workers must be >= 1, got {self.prefetch_workers}")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but no CUDA device is available")
        if self.alias_slots and dev.type != "cpu":
            raise ConfigError("alias slots need the device to be host memory (device cpu)")

    @property
    def alias(self) -> bool:
        return torch.device(self.device).type == "cpu" if self.alias_slots is None else self.alias_slots


@dataclass
class SwitchRecord:
    expert: str
    nbytes: int
    disk_to_host_s: float | None  # None: the expert was already in the host arena
    host_to_device_s: float
    prefetch: bool


@dataclass
class TierStats:
    hits: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    evictions: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    bytes_disk_to_host: int = 0
    bytes_disk_to_host_prefetch: int = 0  # of those, read ahead of need by prefetch
    bytes_host_to_device: int = 0
    disk_to_host_s: float = 0.0
    host_to_device_s: float = 0.0
    switches: int = 0
    alias_binds: int = 0  # switches that re-pointed views instead of copying (CPU)
    prefetch_loads: int = 0
    recent: deque[SwitchRecord] = field(default_factory=lambda: deque(maxlen=1024))

    def summary(self) -> dict[str, Any]:
        def gbps(b: int, s: float) -> float | None:
            return round(b / s / 1e9, 3) if s > 0 else None

        return {
            "hits": dict(self.hits),
            "misses": dict(self.misses),
            "evictions": dict(self.evictions),
            "switches": self.switches,
            "alias_binds": self.alias_binds,
            "prefetch_loads": self.prefetch_loads,
            "bytes_disk_to_host": self.bytes_disk_to_host,
            "bytes_disk_to_host_prefetch": self.bytes_disk_to_host_prefetch,
            "bytes_host_to_device": self.bytes_host_to_device,
            "disk_to_host_gbps": gbps(self.bytes_disk_to_host, self.disk_to_host_s),
            "host_to_device_gbps": gbps(self.bytes_host_to_device, self.host_to_device_s),
        }


@dataclass
class _HostEntry:
    extent: Extent
    loading: bool = True
    pins: int = 0


class Lease:
    """A reference to a ready expert; its weights stay put until released."""

    def __init__(self, manager: TierManager, expert: str, slot: Slot, moved_bytes: int = 0) -> None:
        self.expert = expert
        self.slot = slot
        self.moved_bytes = moved_bytes  # bytes this acquire moved (0: it was ready, or a prefetch moved it)
        self.model: nn.Module = slot.model
        self._manager = manager
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self.slot)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class TierManager:
    def __init__(self, bundle: Bundle, config: TierConfig, experts: Sequence[str] | None = None) -> None:
        """Serve `experts` (default: every expert in the bundle) within the configured budgets."""
        self.bundle = bundle
        self.config = config
        self.device = torch.device(config.device)
        self.entries = [bundle.expert(n) for n in (experts if experts is not None else bundle.names)]
        if not self.entries:
            raise ConfigError("a tier manager needs at least one expert to serve")
        self._served = {e.name for e in self.entries}
        biggest = max(self.entries, key=lambda e: e.total_bytes)
        if biggest.total_bytes > config.host_budget:
            raise CapacityError(
                f"host budget {format_bytes(config.host_budget)} is smaller than expert {biggest.name!r} "
                f"({format_bytes(biggest.total_bytes)}); raise --host-budget"
            )
        self.arena = HostArena(config.host_budget, pin=self.device.type == "cuda")
        self.alias = config.alias
        # An alias slot holds its expert's host extent, so the host budget also bounds the slots.
        budget = min(config.device_budget, self.arena.budget) if self.alias else config.device_budget
        self.pool = DevicePool(self.entries, budget, self.device, config.max_slots, alias=self.alias)
        self.reader = DiskReader(config.reader_threads, config.chunk_bytes, config.direct)
        self.host_policy = make_policy(config.policy)
        self.device_policy = make_policy(config.policy)
        self.stats = TierStats()
        self._cv = threading.Condition()
        self._host: dict[str, _HostEntry] = {}
        self._on_device: dict[str, Slot] = {}
        self._upcoming: list[str] = []
        self._executor = ThreadPoolExecutor(config.prefetch_workers, thread_name_prefix="wb-prefetch")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # -- public API -----------------------------------------------------------------------------

    def acquire(self, expert: str, timeout: float | None = None) -> Lease:
        """Block until `expert` is ready on the device and return a lease on it."""
        entry = self._entry(expert)
        deadline = time.monotonic() + (timeout if timeout is not None else self.config.wait_timeout_s)
        slot, moved = self._get_slot(entry, deadline, prefetch=False)
        return Lease(self, expert, slot, moved)

    def prefetch(self, expert: str, tier: Literal["host", "device"] = "device") -> Future[bool]:
        """Start moving `expert` up to `tier` in the background; never waits for space.

        The future says whether the expert ended up there (False when every candidate was busy).
        """
        entry = self._entry(expert)
        if tier not in ("host", "device"):
            raise ConfigError(f"prefetch tier must be 'host' or 'device', got {tier!r}")
        return self._executor.submit(self._prefetch_job, entry, tier)

    def set_upcoming(self, experts: list[str]) -> None:
        """Experts that known pending requests will need, soonest first (the policy looks ahead)."""
        with self._cv:
            self._upcoming = list(experts)

    def evict(self, expert: str, tier: Literal["host", "device", "all"] = "all") -> bool:
        """Drop an idle expert from a tier (benchmarks use this to force a cold switch).

        Returns False, and changes nothing, when the expert is in use or loading there."""
        self.bundle.expert(expert)
        with self._cv:
            if tier in ("device", "all"):
                slot = self._on_device.get(expert)
                if slot is not None:
                    if slot.busy:
                        return False
                    self._drop_from_slot(slot)
            if tier in ("host", "all"):
                h = self._host.get(expert)
                if h is not None:
                    if h.loading or h.pins:
                        return False
                    self.arena.free(self._host.pop(expert).extent)
                    self.host_policy.on_evict(expert)
            self._cv.notify_all()
            return True

    def where(self, expert: str) -> dict[str, bool]:
        with self._cv:
            h = self._host.get(expert)
            s = self._on_device.get(expert)
            return {"host": h is not None and not h.loading, "device": s is not None and not s.loading}

    def switch_seconds(self, expert: str) -> float:
        """What acquiring `expert` now would cost, from the rates measured so far (0 when resident)."""
        st, nbytes = self.stats, self._entry(expert).total_bytes
        disk_rate = st.bytes_disk_to_host / st.disk_to_host_s if st.disk_to_host_s > 0 else 1e9
        copy_rate = st.bytes_host_to_device / st.host_to_device_s if st.host_to_device_s > 0 else 1e10
        with self._cv:
            h = self._host.get(expert)
            s = self._on_device.get(expert)
            if s is not None and not s.loading:
                return 0.0
            copy = 0.0 if self.alias else nbytes / copy_rate
            if h is not None and not h.loading:
                return copy
            read = nbytes / disk_rate
            return copy + (read / 2 if h is not None else read)  # a read under way is half done, say

    def snapshot(self) -> dict[str, Any]:
        """Bookkeeping for invariant checks and /metrics."""
        with self._cv:
            return {
                "host_used": self.arena.used,
                "host_budget": self.arena.budget,
                "host": {n: {"loading": h.loading, "pins": h.pins} for n, h in self._host.items()},
                "slots": [
                    {"expert": s.expert, "loading": s.loading, "refs": s.refs, "pending": s.pending}
                    for s in self.pool.slots
                ],
                "device_bytes": self.pool.bytes,
                "device_budget": self.pool.budget,
            }

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.reader.close()
        self.arena.close()

    def __enter__(self) -> TierManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _entry(self, expert: str) -> ExpertEntry:
        entry = self.bundle.expert(expert)
        if expert not in self._served:
            served = ", ".join(e.name for e in self.entries)
            raise ConfigError(f"expert {expert!r} is not served by this tier manager; it serves: {served}")
        return entry

    # -- device tier ----------------------------------------------------------------------------

    def _get_slot(self, entry: ExpertEntry, deadline: float, prefetch: bool) -> tuple[Slot, int]:
        """The expert's slot, loaded, with a reference taken; and the bytes this call moved."""
        name = entry.name
        with self._cv:
            while True:
                slot = self._on_device.get(name)
                if slot is not None:
                    if not slot.loading:
                        slot.refs += 1
                        if not prefetch:
                            self.stats.hits["device"] += 1
                        self.device_policy.on_access(name)
                        return slot, 0
                    slot.pending += 1  # coalesce: wait for the load someone else is doing
                    self._cv.wait(max(deadline - time.monotonic(), 0.001))
                    slot.pending -= 1
                    if time.monotonic() > deadline and slot.loading:
                        raise CapacityError(f"timed out waiting for expert {name!r} to load")
                    continue
                slot = self._reserve_slot(entry)
                if slot is not None:
                    break
                self._wait_or_fail(deadline, prefetch, f"every device slot for expert {name!r} is in use")
            if not prefetch:
                self.stats.misses["device"] += 1
            slot.pending += 1
        try:
            moved = self._load_into(slot, entry, deadline, prefetch)
        except BaseException:
            with self._cv:
                slot.pending -= 1
                slot.loading = False
                slot.expert = None  # a failed load never took an alias pin
                self._on_device.pop(name, None)
                self._cv.notify_all()
            raise
        with self._cv:
            slot.pending -= 1
            slot.refs += 1
            return slot, moved

    def _reserve_slot(self, entry: ExpertEntry) -> Slot | None:
        candidates = self.pool.slots_for(entry.layout_key)
        for s in candidates:
            if s.expert is None and not s.busy:
                slot = s
                break
        else:
            idle = {s.expert: s for s in candidates if not s.busy and s.expert is not None}
            if not idle:
                return None
            victim = self.device_policy.victim(list(idle), self._upcoming)
            slot = idle[victim]
            self._drop_from_slot(slot)
            self.stats.evictions["device"] += 1
        slot.expert = entry.name
        slot.loading = True
        self._on_device[entry.name] = slot
        return slot

    def _drop_from_slot(self, slot: Slot) -> None:
        """Forget the slot's expert (under the lock); an alias slot lets go of its host extent."""
        assert slot.expert is not None
        del self._on_device[slot.expert]
        self.device_policy.on_evict(slot.expert)
        if slot.flat is None and slot.expert in self._host:
            self._host[slot.expert].pins -= 1
        slot.expert = None

    def _load_into(self, slot: Slot, entry: ExpertEntry, deadline: float, prefetch: bool) -> int:
        """Make the slot hold the expert; returns the bytes moved (disk reads and device copies)."""
        ext, d2h_s = self._get_host(entry, deadline, prefetch)
        keep_pin = False
        try:
            t0 = time.perf_counter()
            src = self.arena.view(ext)[: entry.total_bytes]
            if slot.flat is None:
                bind_to_flat(slot.model, src, entry)
                keep_pin = True  # released when the slot drops this expert
            elif self._stream is not None:
                done = torch.cuda.Event()
                with torch.cuda.stream(self._stream):
                    slot.flat.copy_(src, non_blocking=True)
                    done.record(self._stream)
                done.synchronize()
            else:
                slot.flat.copy_(src)
            h2d_s = time.perf_counter() - t0
        finally:
            if not keep_pin:
                with self._cv:
                    self._host[entry.name].pins -= 1
                    self._cv.notify_all()
        with self._cv:
            slot.loading = False
            self.device_policy.on_insert(entry.name, h2d_s + (d2h_s or 0.0), entry.total_bytes)
            st = self.stats
            st.switches += 1
            st.prefetch_loads += int(prefetch)
            if slot.flat is None:
                st.alias_binds += 1
            else:
                st.bytes_host_to_device += entry.total_bytes
                st.host_to_device_s += h2d_s
            st.recent.append(SwitchRecord(entry.name, entry.total_bytes, d2h_s, h2d_s, prefetch))
            self._cv.notify_all()
        read = entry.total_bytes if d2h_s is not None else 0
        return read + (0 if slot.flat is None else entry.total_bytes)

    def _release(self, slot: Slot) -> None:
        with self._cv:
            if slot.refs <= 0:
                raise RuntimeError("lease released twice")  # a bug in the caller, not user input
            slot.refs -= 1
            self._cv.notify_all()

    # -- host tier ------------------------------------------------------------------------------

    def _get_host(self, entry: ExpertEntry, deadline: float, prefetch: bool) -> tuple[Extent, float | None]:
        """Pin the expert's arena extent (loading it from disk if needed); the caller unpins."""
        name = entry.name
        with self._cv:
            while True:
                h = self._host.get(name)
                if h is not None:
                    if not h.loading:
                        h.pins += 1
                        if not prefetch:
                            self.stats.hits["host"] += 1
                        self.host_policy.on_access(name)
                        return h.extent, None
                    self._cv.wait(max(deadline - time.monotonic(), 0.001))
                    if time.monotonic() > deadline and name in self._host and self._host[name].loading:
                        raise CapacityError(f"timed out waiting for expert {name!r} to be read from disk")
                    continue
                ext = self._alloc_host(entry.total_bytes)
                if ext is not None:
                    break
                self._wait_or_fail(deadline, prefetch, f"the host arena has no room for expert {name!r}")
            h = _HostEntry(ext, loading=True, pins=1)
            self._host[name] = h
            if not prefetch:
                self.stats.misses["host"] += 1
        try:
            res = self.reader.read(
                self.bundle.blob_path(name), self.arena.memoryview(ext)[: entry.total_bytes]
            )
        except BaseException:
            with self._cv:
                del self._host[name]
                self.arena.free(ext)
                self._cv.notify_all()
            raise
        with self._cv:
            h.loading = False
            self.host_policy.on_insert(name, res.seconds, entry.total_bytes)
            self.stats.bytes_disk_to_host += res.nbytes
            self.stats.bytes_disk_to_host_prefetch += res.nbytes if prefetch else 0
            self.stats.disk_to_host_s += res.seconds
            self._cv.notify_all()
        return ext, res.seconds

    def _alloc_host(self, nbytes: int) -> Extent | None:
        ext = self.arena.alloc(nbytes)
        while ext is None:
            idle = [n for n, h in self._host.items() if not h.loading and h.pins == 0]
            if not idle:
                # Idle alias slots hold host extents too: give one up before failing.
                held = {s.expert: s for s in self.pool.slots if s.flat is None and s.expert and not s.busy}
                if not held:
                    return None
                self._drop_from_slot(held[self.device_policy.victim(list(held), self._upcoming)])
                self.stats.evictions["device"] += 1
                continue
            victim = self.host_policy.victim(idle, self._upcoming)
            self.arena.free(self._host.pop(victim).extent)
            self.host_policy.on_evict(victim)
            self.stats.evictions["host"] += 1
            ext = self.arena.alloc(nbytes)
        return ext

    # -- shared ---------------------------------------------------------------------------------

    def _wait_or_fail(self, deadline: float, prefetch: bool, reason: str) -> None:
        if prefetch or self.config.on_full == "error":
            raise CapacityError(reason)
        left = deadline - time.monotonic()
        if left <= 0:
            raise CapacityError(f"timed out after {self.config.wait_timeout_s:g}s: {reason}")
        self._cv.wait(left)

    def _prefetch_job(self, entry: ExpertEntry, tier: str) -> bool:
        deadline = time.monotonic() + self.config.wait_timeout_s
        try:
            if tier == "host":
                self._get_host(entry, deadline, prefetch=True)
                with self._cv:
                    self._host[entry.name].pins -= 1
                    self._cv.notify_all()
            else:
                self._release(self._get_slot(entry, deadline, prefetch=True)[0])
        except CapacityError:
            return False
        except Exception:
            log.exception("prefetch of expert %r failed", entry.name)
            return False
        return True
