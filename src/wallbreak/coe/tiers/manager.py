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
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from wallbreak.coe.bundle.manifest import Bundle, ExpertEntry
from wallbreak.coe.tiers.config import SwitchRecord, TierConfig, TierStats
from wallbreak.coe.tiers.device import DevicePool, Slot, bind_to_flat
from wallbreak.coe.tiers.disk import DiskReader
from wallbreak.coe.tiers.host import Extent, HostArena
from wallbreak.coe.tiers.policy import ResidencyRules, make_policy
from wallbreak.errors import CapacityError, ConfigError
from wallbreak.units import format_bytes

log = logging.getLogger(__name__)


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
        names = experts if experts is not None else bundle.names
        # What is served, by key: an expert's name, or a later version's key (coe/live.py); each
        # with its blob's path (a live server reads a replaced version through the file it holds open).
        self._entries: dict[str, ExpertEntry] = {n: bundle.expert(n) for n in names}
        self._paths: dict[str, Path] = {n: bundle.blob_path(n) for n in names}
        if not self._entries:
            raise ConfigError("a tier manager needs at least one expert to serve")
        biggest = max(self.entries, key=lambda e: e.total_bytes)
        if biggest.total_bytes > config.host_budget:
            raise CapacityError(
                f"host budget {format_bytes(config.host_budget)} is smaller than expert {biggest.name!r} "
                f"({format_bytes(biggest.total_bytes)}); raise --host-budget"
            )
        cuda = self.device.type == "cuda"
        self.arena = HostArena(config.host_budget, pin=cuda, huge_pages=config.huge_pages)
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
        self._wanted: set[str] = set()  # experts with running, paused or queued requests
        self.rules = ResidencyRules()
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

    def set_upcoming(self, experts: list[str], wanted: set[str] | None = None) -> None:
        """Experts that known pending requests will need, soonest first (the policy looks ahead);
        `wanted`: every expert with running, paused or queued requests (a prefetch never evicts one)."""
        with self._cv:
            self._upcoming = list(experts)
            if wanted is not None:
                self._wanted = set(wanted)

    @property
    def entries(self) -> list[ExpertEntry]:
        return list(self._entries.values())

    def entry(self, expert: str) -> ExpertEntry:
        """The manifest entry a served key reads (ConfigError when it is not served)."""
        return self._entry(expert)

    def blob_path(self, expert: str) -> Path:
        self._entry(expert)
        return self._paths[expert]

    def set_blob_path(self, expert: str, path: Path) -> None:
        """Read `expert` from `path` from now on (the same bytes: a live server's open file)."""
        self._entry(expert)
        with self._cv:
            self._paths[expert] = path

    def add_expert(self, entry: ExpertEntry, path: Path) -> None:
        """Serve one more expert (a key not served yet), read from `path`. Its architecture gets a
        device slot if none of its layout exists (CapacityError when the device budget cannot hold one)."""
        if entry.name in self._entries:
            raise ConfigError(f"expert {entry.name!r} is already served")
        if entry.total_bytes > self.arena.budget:
            raise CapacityError(
                f"expert {entry.name!r} ({format_bytes(entry.total_bytes)}) is larger than the host budget "
                f"({format_bytes(self.arena.budget)}); raise --host-budget"
            )
        new = None if self.pool.slots_for(entry.layout_key) else self.pool.new_slot(entry)  # slow: unlocked
        with self._cv:
            if new is not None and not self.pool.slots_for(entry.layout_key):
                self._install_slot(new, entry)
            self._entries[entry.name] = entry
            self._paths[entry.name] = path

    def _install_slot(self, slot: Slot, entry: ExpertEntry) -> None:
        """Add a slot for a new architecture, giving up idle slots of architectures that have more
        than one when the device budget is short (under the lock)."""
        need = 0 if slot.flat is None else slot.flat.numel()
        while self.pool.bytes + need > self.pool.budget:
            spare = [
                s
                for s in self.pool.slots
                if not s.busy
                and len(self.pool.slots_for(s.layout)) > 1
                and (s.expert is None or self.rules.pins.get(s.expert) != "device")
            ]
            if not spare:
                held = ", ".join(f"{s.expert or 'empty'} ({format_bytes(s.flat.numel())})"
                                 for s in self.pool.slots if s.flat is not None)  # fmt: skip
                raise CapacityError(
                    f"the device budget ({format_bytes(self.pool.budget)}) has no room for a slot for "
                    f"expert {entry.name!r}'s architecture ({format_bytes(need)}); its slots hold: {held}; "
                    "raise --device-budget"
                )
            victim = min(spare, key=lambda s: (s.expert is not None, s.index))
            if victim.expert is not None:
                self._drop_from_slot(victim)
            self.pool.remove(victim)
        self.pool.add(slot)

    def remove_expert(self, expert: str) -> bool:
        """Stop serving an idle expert and free what it holds; False (nothing changed) while in use."""
        self._entry(expert)
        with self._cv:
            self.rules.unpin(expert)
            if not self._evict_locked(expert, "all"):
                return False
            del self._entries[expert], self._paths[expert]
            self.rules.forget(expert)
            return True

    def evict(self, expert: str, tier: Literal["host", "device", "all"] = "all") -> bool:
        """Drop an idle expert from a tier (benchmarks use this to force a cold switch).

        Returns False, and changes nothing, when the expert is in use or loading there."""
        self._entry(expert)
        with self._cv:
            return self._evict_locked(expert, tier)

    def _evict_locked(self, expert: str, tier: str) -> bool:
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

    # -- what an operator asks: pins, keep-alive, loads and unloads ---------------------------------

    def pin(self, expert: str, tier: Literal["host", "device"], timeout: float | None = None) -> None:
        """Keep `expert` in `tier` until unpinned, loading it there now. CapacityError (and no pin)
        when the pins already made would leave no room for it, or for the other experts."""
        entry = self._entry(expert)
        if tier not in ("host", "device"):
            raise ConfigError(f"pin tier must be 'host' or 'device', got {tier!r}")
        with self._cv:
            slots = len(self.pool.slots_for(entry.layout_key))
            self.rules.check_pin_room(self._entries, entry, tier, self.alias, self.arena.budget, slots)
            before = self.rules.pins.get(expert)
            self.rules.pins[expert] = tier
        try:
            self.load(expert, tier, timeout)
        except BaseException:
            with self._cv:
                if before is None:
                    self.rules.pins.pop(expert, None)
                else:
                    self.rules.pins[expert] = before
            raise

    def unpin(self, expert: str) -> bool:
        """Let eviction take `expert` again; False when it was not pinned."""
        self._entry(expert)
        with self._cv:
            return self.rules.unpin(expert) is not None

    def load(self, expert: str, tier: Literal["host", "device"], timeout: float | None = None) -> None:
        """Bring `expert` up to `tier` now and wait for it (an operator's preload)."""
        entry = self._entry(expert)
        if tier == "device":
            self.acquire(expert, timeout).release()
            return
        deadline = time.monotonic() + (timeout if timeout is not None else self.config.wait_timeout_s)
        self._get_host(entry, deadline, prefetch=False)
        with self._cv:
            self._host[expert].pins -= 1
            self._cv.notify_all()

    def unload(self, expert: str) -> bool:
        """Drop `expert` from host and device; False when it is in use (it stays). A pinned expert
        is refused: unpin it first."""
        self._entry(expert)
        with self._cv:
            if expert in self.rules.pins:
                raise ConfigError(f"expert {expert!r} is pinned to {self.rules.pins[expert]}; unpin it first")
            ok = self._evict_locked(expert, "all")
            if ok:
                self.rules.loaded_at.pop(expert, None)
            return ok

    def set_keep_alive(self, expert: str, seconds: float | None) -> None:
        """How long `expert` stays resident once idle (None: as the eviction policy decides;
        negative: always)."""
        self._entry(expert)
        with self._cv:
            self.rules.set_keep_alive(expert, seconds, time.monotonic())

    def expire_idle(self) -> list[str]:
        """Unload the experts idle past their keep-alive; returns those unloaded."""
        out = []
        with self._cv:
            for n in self.rules.expired(time.monotonic()):
                resident = n in self._host or n in self._on_device
                if resident and self._evict_locked(n, "all"):
                    self.rules.loaded_at.pop(n, None)
                    out.append(n)
        return out

    def state(self, expert: str) -> dict[str, Any]:
        """Where `expert` is and what holds it there (for /v1/models and the admin API)."""
        self._entry(expert)
        with self._cv:
            h, s = self._host.get(expert), self._on_device.get(expert)
            tier = "device" if s is not None and not s.loading else "host" if h and not h.loading else "disk"
            ka = self.rules.keep_alive.get(expert)
            at = self.rules.loaded_at.get(expert) if tier != "disk" else None
            return {
                "tier": tier,
                "loading": bool((h and h.loading) or (s and s.loading)),
                "pinned": self.rules.pins.get(expert),
                "keep_alive_s": None if ka is None else (-1 if ka == float("inf") else ka),
                "loaded_at": None if at is None else int(at),
            }

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

    def host_memory(self) -> dict[str, Any]:
        """The host arena for /health (`HostArena.summary`)."""
        return self.arena.summary()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.reader.close()
        self.arena.close()

    def __enter__(self) -> TierManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _entry(self, expert: str) -> ExpertEntry:
        entry = self._entries.get(expert)
        if entry is None:
            served = ", ".join(self._entries)
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
                            self.rules.used_at[name] = time.monotonic()
                        self.device_policy.on_access(name)
                        return slot, 0
                    slot.pending += 1  # coalesce: wait for the load someone else is doing
                    self._cv.wait(max(deadline - time.monotonic(), 0.001))
                    slot.pending -= 1
                    if time.monotonic() > deadline and slot.loading:
                        raise CapacityError(f"timed out waiting for expert {name!r} to load")
                    continue
                slot = self._reserve_slot(entry, prefetch)
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
            if not prefetch:
                self.rules.used_at[name] = time.monotonic()
            return slot, moved

    def _reserve_slot(self, entry: ExpertEntry, prefetch: bool = False) -> Slot | None:
        candidates = self.pool.slots_for(entry.layout_key)
        for s in candidates:
            if s.expert is None and not s.busy:
                slot = s
                break
        else:
            idle = {s.expert: s for s in candidates if not s.busy and s.expert is not None}
            names = self._evictable(list(idle), "device", prefetch)
            if not names:
                return None
            victim = self.device_policy.victim(names, self._upcoming)
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
            self.rules.loaded_at[entry.name] = time.time()
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
            if slot.expert is not None:
                self.rules.used_at[slot.expert] = time.monotonic()
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
                ext = self._alloc_host(entry.total_bytes, prefetch)
                if ext is not None:
                    break
                self._wait_or_fail(deadline, prefetch, f"the host arena has no room for expert {name!r}")
            h = _HostEntry(ext, loading=True, pins=1)
            self._host[name] = h
            if not prefetch:
                self.stats.misses["host"] += 1
        try:
            res = self.reader.read(self._paths[name], self.arena.memoryview(ext)[: entry.total_bytes])
        except BaseException:
            with self._cv:
                del self._host[name]
                self.arena.free(ext)
                self._cv.notify_all()
            raise
        with self._cv:
            h.loading = False
            self.rules.loaded_at[entry.name] = time.time()
            self.host_policy.on_insert(name, res.seconds, entry.total_bytes)
            self.stats.bytes_disk_to_host += res.nbytes
            self.stats.bytes_disk_to_host_prefetch += res.nbytes if prefetch else 0
            self.stats.disk_to_host_s += res.seconds
            self._cv.notify_all()
        return ext, res.seconds

    def _alloc_host(self, nbytes: int, prefetch: bool = False) -> Extent | None:
        ext = self.arena.alloc(nbytes)
        while ext is None:
            idle = [n for n, h in self._host.items() if not h.loading and h.pins == 0]
            idle = self._evictable(idle, "host", prefetch)
            if not idle:
                # Idle alias slots hold host extents too: give one up before failing.
                held = {s.expert: s for s in self.pool.slots if s.flat is None and s.expert and not s.busy}
                names = self._evictable(list(held), "device", prefetch)
                if not names:
                    return None
                self._drop_from_slot(held[self.device_policy.victim(names, self._upcoming)])
                self.stats.evictions["device"] += 1
                continue
            victim = self.host_policy.victim(idle, self._upcoming)
            self.arena.free(self._host.pop(victim).extent)
            self.host_policy.on_evict(victim)
            self.stats.evictions["host"] += 1
            ext = self.arena.alloc(nbytes)
        return ext

    # -- shared ---------------------------------------------------------------------------------

    def _evictable(self, names: list[str], tier: str, prefetch: bool) -> list[str]:
        """The candidates the rules allow evicting from `tier` (ResidencyRules; under the lock)."""
        host_of_alias = self.alias and tier == "host"
        return self.rules.evictable(names, tier, prefetch, self._wanted, host_of_alias, time.monotonic())

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
