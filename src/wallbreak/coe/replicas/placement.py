"""Which replica serves which expert: a static spread by expected load, then hot experts replicated.

The ingress owns this table (one owner: replicas never decide placement). Rules:
1. **Start**: experts are spread over the replicas greedily, heaviest load first, each to the
   replica with the least load so far (ties: fewest experts, then lowest index). The load is
   measured: `--expert-load FILE` reads the requests per expert that an earlier deployment's
   /health reported (`requests_by_expert`, counted by this table), or any {expert: weight} JSON.
   Without it every expert counts the same, which deals them round-robin.
2. **Route**: a request goes to the expert's holder with the fewest requests in flight.
3. **Replicate when hot**: if every holder of an expert has at least `hot_queue` requests *for that
   expert* in flight (a batch's worth is waiting) and some other live replica has at most half as
   many requests of any kind in flight, that replica becomes a holder too (it loads the expert from
   the shared bundle on its first request). Busy replicas alone are not a reason: copying an
   expert to a replica that is busy with others only adds switches there. The table only grows this
   way; replicas keep their own tier policies for what stays on their device.
4. **Live changes** (the admin API, or a `bundle import` the ingress picks up): an added expert
   goes to the live replica with the fewest experts placed (ties: fewest in flight, lowest index);
   a replaced one keeps its holders; a removed one leaves the table once its last request ended.
5. **Faults**: a replica that failed a call is marked down; its experts are routed to their other
   holders, or, where none is left, to the least-busy live replica, which becomes a holder. A
   replica is marked up again when it answers a status call (Ray restarts it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wallbreak.common.jsonfile import read_json
from wallbreak.errors import ConfigError


def read_load(path: Path, experts: Sequence[str]) -> dict[str, float]:
    """An --expert-load file: {expert: requests or weight}, or a saved /health answer (its
    `requests_by_expert`). Experts it does not name weigh 0; names the bundle lacks are an error."""
    data = read_json(Path(path), "--expert-load file")
    if isinstance(data, dict) and isinstance(data.get("requests_by_expert"), dict):
        data = data["requests_by_expert"]
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"--expert-load {path}: want a JSON object {{expert: requests}}, or a saved /health answer"
        )
    unknown = sorted(set(data) - set(experts))
    if unknown:
        raise ConfigError(
            f"--expert-load {path}: {len(unknown)} expert(s) not in the bundle, e.g. {unknown[:3]}; "
            f"the bundle has {', '.join(list(experts)[:5])}{'...' if len(experts) > 5 else ''}"
        )
    bad = [k for k, v in data.items() if isinstance(v, bool) or not isinstance(v, int | float) or v < 0]
    if bad:
        first = bad[0]
        raise ConfigError(f"--expert-load {path}: loads must be numbers >= 0; {first!r} has {data[first]!r}")
    return {e: float(data.get(e, 0.0)) for e in experts}


@dataclass
class Placement:
    replicas: int
    holders: dict[str, list[int]]  # expert -> replica indices that serve it, first placed first
    hot_queue: int = 8
    inflight: list[int] = field(default_factory=list)  # per replica, all experts
    per_expert: dict[tuple[str, int], int] = field(default_factory=dict)  # (expert, replica) -> in flight
    down: set[int] = field(default_factory=set)
    requests: dict[str, int] = field(default_factory=dict)  # expert -> requests routed (measured load)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        if not self.inflight:
            self.inflight = [0] * self.replicas

    @staticmethod
    def spread(
        experts: Sequence[str], replicas: int, expected: Mapping[str, float] | None = None, hot_queue: int = 8
    ) -> Placement:
        if replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {replicas}")
        weight = {e: float((expected or {}).get(e, 1.0)) for e in experts}
        total = [0.0] * replicas
        count = [0] * replicas
        holders: dict[str, list[int]] = {}
        for e in sorted(experts, key=lambda e: (-weight[e], list(experts).index(e))):
            r = min(range(replicas), key=lambda i: (total[i], count[i], i))
            holders[e] = [r]
            total[r] += weight[e]
            count[r] += 1
        return Placement(replicas, holders, hot_queue)

    def add(self, expert: str) -> int:
        """Place a new expert (rule 4); returns its replica. One already placed keeps its holders."""
        if self.holders.get(expert):
            return self.holders[expert][0]
        pool = self.live() or list(range(self.replicas))
        r = min(pool, key=lambda r: (len(self.experts_of(r)), self.inflight[r], r))
        self.holders[expert] = [r]
        return r

    def remove(self, expert: str) -> None:
        self.holders.pop(expert, None)
        self.requests.pop(expert, None)

    def experts_of(self, replica: int) -> list[str]:
        return sorted(e for e, rs in self.holders.items() if replica in rs)

    def live(self) -> list[int]:
        return [r for r in range(self.replicas) if r not in self.down]

    def choose(self, expert: str, exclude: set[int] | frozenset[int] = frozenset()) -> int | None:
        """The replica for the next request of `expert` (None: no live replica is left to try)."""
        self._replicate_if_hot(expert)
        held = [r for r in self.holders.setdefault(expert, []) if r not in self.down and r not in exclude]
        if held:
            return min(held, key=lambda r: (self.inflight[r], r))
        spare = [r for r in self.live() if r not in exclude]
        if not spare:
            return None
        r = min(spare, key=lambda r: (self.inflight[r], len(self.experts_of(r)), r))
        self.holders[expert].append(r)  # it loads the expert from the shared bundle
        return r

    def _replicate_if_hot(self, expert: str) -> None:
        held = [r for r in self.holders.get(expert, []) if r not in self.down]
        if not held:
            return
        queued = min(self.per_expert.get((expert, r), 0) for r in held)
        if queued < self.hot_queue:
            return
        idle = [r for r in self.live() if r not in held and self.inflight[r] <= queued // 2]
        if idle:
            self.holders[expert].append(min(idle, key=lambda r: (self.inflight[r], r)))

    def requested(self, expert: str) -> None:
        """One request arrived for `expert` (retries are not counted again)."""
        self.requests[expert] = self.requests.get(expert, 0) + 1

    def started(self, replica: int, expert: str) -> None:
        self.inflight[replica] += 1
        self.per_expert[(expert, replica)] = self.per_expert.get((expert, replica), 0) + 1

    def finished(self, replica: int, expert: str) -> None:
        self.inflight[replica] -= 1
        self.per_expert[(expert, replica)] -= 1

    def mark_down(self, replica: int) -> None:
        self.down.add(replica)

    def mark_up(self, replica: int) -> None:
        self.down.discard(replica)
