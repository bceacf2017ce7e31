"""Disk tier: a parallel, chunked reader that lands blob bytes straight in the caller's buffer.

Reads use `os.preadv` from several threads (it releases the GIL), in large aligned chunks. O_DIRECT
skips the page cache, which wins when the file is cold; when the file is already resident a buffered
read is a memcpy from the cache and wins instead, so `direct="auto"` asks the kernel (mincore) how
much of the file is resident and picks. Filesystems that refuse O_DIRECT (tmpfs, some overlays) fall
back to buffered reads cleanly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from wallbreak.coe import defaults
from wallbreak.errors import BundleError, ConfigError

DirectMode = Literal["auto", "on", "off"]
DIRECT_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def buffer_address(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def resident_fraction(path: str | Path) -> float:
    """Fraction of the file's pages in the page cache (0.0 when it cannot be told)."""
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            return 0.0
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return 0.0
            return float((np.ctypeslib.as_array(vec) & 1).sum()) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_file_cache(path: str | Path) -> bool:
    """Evict one file from the page cache; True if it then looks cold (< 5% resident).

    POSIX_FADV_DONTNEED needs no privileges and touches only this file; if pages survive it (dirty,
    mapped), root may drop the whole cache through /proc.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if resident_fraction(path) < 0.05:
        return True
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        return False
    return resident_fraction(path) < 0.05


@dataclass
class ReadResult:
    nbytes: int
    seconds: float
    direct: bool

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


READER_THREADS = 4  # parallel preadv calls per blob
CHUNK_BYTES = 16 << 20  # bytes per preadv


class DiskReader:
    """Reads whole files (or prefixes) into a caller's buffer with a shared pool of threads."""

    def __init__(
        self, threads: int = READER_THREADS, chunk_bytes: int = CHUNK_BYTES, direct: DirectMode = "auto"
    ) -> None:
        if threads < 1:
            raise ConfigError(f"reader threads must be >= 1, got {threads}")
        if chunk_bytes < DIRECT_ALIGN or chunk_bytes % DIRECT_ALIGN:
            raise ConfigError(
                f"reader chunk size must be a positive multiple of {DIRECT_ALIGN}, got {chunk_bytes}"
            )
        if direct not in defaults.DIRECT_IO_MODES:
            raise ConfigError(
                f"direct I/O mode must be {', '.join(defaults.DIRECT_IO_MODES)}, got {direct!r}"
            )
        self.threads = threads
        self.chunk_bytes = chunk_bytes
        self.direct = direct
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wb-disk")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _want_direct(self, path: Path, dest: memoryview) -> bool:
        if self.direct == "off" or not _O_DIRECT:
            return False
        aligned = buffer_address(dest) % DIRECT_ALIGN == 0 and len(dest) % DIRECT_ALIGN == 0
        if not aligned:
            if self.direct == "on":
                raise ConfigError("direct I/O needs a 4 KiB-aligned buffer and length")
            return False
        if self.direct == "on":
            return True
        return resident_fraction(path) < 0.5

    def read(self, path: str | Path, dest: memoryview, offset: int = 0) -> ReadResult:
        """Fill `dest` with bytes [offset, offset+len(dest)) of the file."""
        path = Path(path)
        n = len(dest)
        t0 = time.perf_counter()
        direct = self._want_direct(path, dest)
        fd = -1
        if direct:
            try:
                fd = os.open(path, os.O_RDONLY | _O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise BundleError(f"cannot open {path}: {e.strerror}") from None
                direct = False  # the filesystem refuses O_DIRECT
        if fd < 0:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise BundleError(f"cannot open {path}: {e.strerror}") from None
        try:
            if not direct:
                os.posix_fadvise(fd, offset, n, os.POSIX_FADV_SEQUENTIAL)
            starts = range(0, n, self.chunk_bytes)
            if len(starts) <= 1 or self.threads == 1:
                for s in starts:
                    _read_exact(fd, dest[s : s + self.chunk_bytes], offset + s, path)
            else:
                futs = [
                    self._pool.submit(_read_exact, fd, dest[s : s + self.chunk_bytes], offset + s, path)
                    for s in starts
                ]
                for f in futs:
                    f.result()
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                os.close(fd)
                fd = -1
                buffered = DiskReader(self.threads, self.chunk_bytes, "off")
                try:
                    return buffered.read(path, dest, offset)
                finally:
                    buffered.close()
            raise BundleError(f"reading {path} failed: {e.strerror}") from None
        finally:
            if fd >= 0:
                os.close(fd)
        return ReadResult(n, time.perf_counter() - t0, direct)


def _read_exact(fd: int, dest: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(dest):
        got = os.preadv(fd, [dest[done:]], offset + done)
        if got == 0:
            raise BundleError(
                f"{path} ended early: wanted {len(dest) - done} more bytes at offset {offset + done}"
            )
        done += got


_default: DiskReader | None = None


def read_file(path: str | Path, dest: memoryview, offset: int = 0) -> ReadResult:
    """One-off reads with a shared default reader."""
    global _default
    if _default is None:
        _default = DiskReader()
    return _default.read(path, dest, offset)
