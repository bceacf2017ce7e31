"""Eviction policies, one instance per tier. The manager asks only for a victim among candidates
that nobody is using; a policy never sees (and so can never evict) an expert in use."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import ClassVar

from wallbreak.coe.bundle.manifest import ExpertEntry
from wallbreak.errors import CapacityError, ConfigError
from wallbreak.units import format_bytes


class EvictionPolicy:
    name: ClassVar[str] = "base"

    def __init__(self) -> None:
        self._clock = itertools.count()
        self.last: dict[str, int] = {}

    def on_access(self, expert: str) -> None:
        self.last[expert] = next(self._clock)

    def on_insert(self, expert: str, load_s: float, nbytes: int) -> None:
        self.on_access(expert)

    def on_evict(self, expert: str) -> None:
        self.last.pop(expert, None)

    def victim(self, candidates: Sequence[str], upcoming: Sequence[str] = ()) -> str:
        raise NotImplementedError


class LRU(EvictionPolicy):
    """The baseline: evict the least recently used (Samba-CoE keeps HBM as an LRU of experts)."""

    name = "lru"

    def victim(self, candidates: Sequence[str], upcoming: Sequence[str] = ()) -> str:
        return min(candidates, key=lambda e: self.last.get(e, -1))


class CostAware(EvictionPolicy):
    """GreedyDual-Size-Frequency plus lookahead over requests already known to be coming.

    Known future uses come first (Belady: keep what is needed soonest, evict what is not needed at
    all). Among the rest, priority = clock + frequency x load cost / size, so popular experts and
    those that are slow to bring back stay, and the clock ages out experts that were popular once.
    """

    name = "cost"

    def __init__(self) -> None:
        super().__init__()
        self.freq: dict[str, int] = {}
        self.cost: dict[str, float] = {}
        self.size: dict[str, int] = {}
        self.prio: dict[str, float] = {}
        self.age = 0.0

    def _reprioritise(self, expert: str) -> None:
        per_byte = self.cost.get(expert, 1.0) / max(self.size.get(expert, 1), 1)
        self.prio[expert] = self.age + self.freq.get(expert, 0) * per_byte * 1e9

    def on_access(self, expert: str) -> None:
        super().on_access(expert)
        self.freq[expert] = self.freq.get(expert, 0) + 1
        self._reprioritise(expert)

    def on_insert(self, expert: str, load_s: float, nbytes: int) -> None:
        self.cost[expert] = max(load_s, 1e-6)
        self.size[expert] = nbytes
        self.on_access(expert)

    def on_evict(self, expert: str) -> None:
        self.age = max(self.age, self.prio.pop(expert, self.age))
        self.last.pop(expert, None)

    def victim(self, candidates: Sequence[str], upcoming: Sequence[str] = ()) -> str:
        if upcoming:
            first_use: dict[str, int] = {}
            for i, e in enumerate(upcoming):
                first_use.setdefault(e, i)
            unneeded = [c for c in candidates if c not in first_use]
            if not unneeded:
                return max(candidates, key=lambda c: first_use[c])
            candidates = unneeded
        return min(candidates, key=lambda e: (self.prio.get(e, self.age), self.last.get(e, -1)))


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "cost": CostAware}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; choose one of: {', '.join(POLICIES)}") from None


class ResidencyRules:
    """What an operator asks of residency, beside the eviction policy: pins and keep-alive.

    - A pinned expert is never evicted from its tier (a device pin holds its host extent too where
      slots alias the host arena).
    - An expert with running, paused or queued requests is never evicted to make room for a
      prefetch (a demand load may still take it: it would otherwise wait on itself).
    - An idle expert within its keep-alive is evicted only when nothing else can be; once idle
      past it, the tier manager unloads it (`expired`).
    The tier manager holds its lock while it asks.
    """

    def __init__(self) -> None:
        self.pins: dict[str, str] = {}  # expert -> "host" | "device"
        self.keep_alive: dict[str, float] = {}  # expert -> idle seconds it stays (inf: always)
        self.used_at: dict[str, float] = {}  # expert -> monotonic time of its last use
        self.loaded_at: dict[str, float] = {}  # expert -> wall time it reached its current tier

    def pinned(self, expert: str, tier: str, host_of_alias: bool = False) -> bool:
        pin = self.pins.get(expert)
        return pin == tier or (host_of_alias and pin == "device")

    def check_pin_room(
        self,
        entries: Mapping[str, ExpertEntry],
        entry: ExpertEntry,
        tier: str,
        alias: bool,
        host_budget: int,
        slots: int,
    ) -> None:
        """CapacityError, naming the pins that hold the space, when pinning `entry` to `tier` would
        leave no room for the other experts: on the host, the pinned bytes and the largest unpinned
        expert must fit the budget; on the device, the `slots` of its layout must keep one for the
        others of that layout."""
        name = entry.name
        others = [e for e in entries.values() if e.name != name and e.name not in self.pins]
        if tier == "host" or alias:
            pinned = {
                n: entries[n].total_bytes for n in self.pins if n != name and self.pinned(n, "host", alias)
            }
            spare = max((e.total_bytes for e in others), default=0)
            if sum(pinned.values()) + entry.total_bytes + spare > host_budget:
                held = ", ".join(f"{n} ({format_bytes(b)})" for n, b in pinned.items()) or "no other pins"
                raise CapacityError(
                    f"pinning {name!r} ({format_bytes(entry.total_bytes)}) in host memory leaves no room "
                    f"for the other experts (the largest needs {format_bytes(spare)}) within the host "
                    f"budget {format_bytes(host_budget)}; pinned: {held}"
                )
        if tier == "device":
            layout = entry.layout_key
            here = [
                n
                for n, t in self.pins.items()
                if t == "device" and n != name and entries[n].layout_key == layout
            ]
            rest = [e for e in others if e.layout_key == layout]
            if len(here) + 1 + (1 if rest else 0) > slots:
                keep = f", and one must stay for the {len(rest)} other expert(s) like it" if rest else ""
                raise CapacityError(
                    f"the device has {slots} slot(s) for {name!r}'s architecture; pinned there: "
                    f"{', '.join(here) or 'none'}{keep}; unpin one or raise --device-budget"
                )

    def set_keep_alive(self, expert: str, seconds: float | None, now: float) -> None:
        """None: the eviction policy alone decides; a negative number: always."""
        if seconds is None:
            self.keep_alive.pop(expert, None)
            return
        self.keep_alive[expert] = float("inf") if seconds < 0 else seconds
        self.used_at.setdefault(expert, now)

    def unpin(self, expert: str) -> str | None:
        return self.pins.pop(expert, None)

    def forget(self, expert: str) -> None:
        for d in (self.pins, self.keep_alive, self.used_at, self.loaded_at):
            d.pop(expert, None)

    def kept(self, expert: str, now: float) -> bool:
        ka = self.keep_alive.get(expert)
        return ka is not None and now - self.used_at.get(expert, now) < ka

    def evictable(
        self,
        names: Sequence[str],
        tier: str,
        prefetch: bool,
        wanted: set[str],
        host_of_alias: bool,
        now: float,
    ) -> list[str]:
        free = [n for n in names if not self.pinned(n, tier, host_of_alias)]
        if prefetch:
            free = [n for n in free if n not in wanted]
        unkept = [n for n in free if not self.kept(n, now)]
        return unkept or free

    def expired(self, now: float) -> list[str]:
        """Idle past their keep-alive (and not pinned): the tier manager unloads them."""
        return [
            n
            for n, ka in self.keep_alive.items()
            if ka != float("inf") and n not in self.pins and now - self.used_at.get(n, now) >= ka
        ]
