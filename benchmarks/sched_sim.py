"""What expert order alone can win: the serving bench's closed loop, simulated on the real
scheduler with measured step costs and free switches. Every figure it prints is a prediction.

    python benchmarks/step_table.py --bundle DIR --expert NAME --rows 1,2,3,4,8,16 --buckets > t.json
    python benchmarks/sched_sim.py --table t.json [--experts 16,150] [--concurrency 16,64]

`--concurrency` clients each send a request for an expert drawn by Zipf(`--zipf`) over `--experts`,
wait for its `--max-tokens` tokens, and send the next, until `--requests` have been answered, as
`wallbreak bench serve` does. The engine is modelled as `coe/engine/engine.py` runs it: the
scheduler (`coe/engine/scheduler.py`, the real class, on a simulated clock) chooses an expert, its
batch takes in waiting requests between steps, and a step of b rows costs what the step table
measured for b rows on the path the engine would take (the compiled step at one row and at the
`--compile-rows` sizes, eager otherwise; sizes between measured ones are interpolated). A request's
prefill costs `--prefill-s`. Switching experts costs nothing, so this is what the order of service
and batching alone can give: the part of a policy's lead that disk reads and copies do not explain.

Besides the named policies it runs `most-rows` variants: the next expert is the one with the most
rows, and an expert is overdue only after `--patience` seconds (a sweep), which trades tail latency
for batch size. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from wallbreak.coe.engine.request import Request
from wallbreak.coe.engine.scheduler import Scheduler
from wallbreak.coe.policy import POLICIES


@dataclass
class StepCosts:
    """Seconds per decode step by rows and path, from `step_table.py`'s JSON."""

    eager: dict[int, float]
    compiled: dict[int, float]

    @classmethod
    def from_table(cls, table: list[dict[str, Any]]) -> StepCosts:
        costs: dict[str, dict[int, float]] = {"eager": {}, "compiled": {}}
        for cell in table:
            rows, path, rate = int(cell["rows"]), str(cell["path"]), float(cell["tokens_per_s"])
            costs[path][rows] = rows / rate
        if 1 not in costs["eager"]:
            raise SystemExit("the step table has no one-row eager cell")
        return cls(costs["eager"], costs["compiled"])

    def step(self, rows: int, compile_rows: tuple[int, ...]) -> float:
        if rows in self.compiled and (rows == 1 or rows in compile_rows):
            return self.compiled[rows]
        known = sorted(self.eager)
        if rows in self.eager:
            return self.eager[rows]
        lo = max((k for k in known if k < rows), default=known[0])
        hi = min((k for k in known if k > rows), default=known[-1])
        if lo == hi:
            return self.eager[lo] * rows / lo
        return self.eager[lo] + (self.eager[hi] - self.eager[lo]) * (rows - lo) / (hi - lo)


@dataclass
class _Params:
    n: int = 1


@dataclass
class _Request:
    expert: str
    arrived: float
    left: int
    params: _Params = field(default_factory=_Params)
    alternatives: list[str] = field(default_factory=list)


class MostRows(Scheduler):
    """The next expert is the one with the most rows (waiting and running), unless one is overdue."""

    def _next_by_rank(
        self, work: set[str], active: dict[str, int], switch_cost: Callable[[str], float], now: float
    ) -> str:
        def rank(e: str) -> tuple[int, float]:
            t = self._oldest(e)
            return (len(self.waiting.get(e, ())) + active.get(e, 0), -(now if t is None else t))

        return max(work, key=rank)


@dataclass
class Workload:
    experts: int
    clients: int
    zipf: float
    requests: int
    max_tokens: int
    prefill_s: float


def simulate(
    sched: Scheduler, costs: StepCosts, compile_rows: tuple[int, ...], w: Workload, seed: int
) -> dict[str, float]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** w.zipf for i in range(w.experts)]
    now = [0.0]
    sched.clock = lambda: now[0]
    sent, steps, rows_run = [0], [0], [0]
    latencies: list[float] = []
    batches: dict[str, list[Any]] = {}  # the scheduler's requests are _Request here

    def send() -> None:
        if sent[0] < w.requests:
            sent[0] += 1
            # Arrivals a nanosecond apart in sending order: no two ages tie, so no choice falls to
            # the iteration order of a set of names, which string hashing changes from run to run.
            arrived = now[0] + sent[0] * 1e-9
            req = _Request(f"e{rng.choices(range(w.experts), weights)[0]}", arrived, w.max_tokens)
            sched.submit(cast(Request, req))  # the fields the scheduler reads, and a count of tokens left

    for _ in range(w.clients):
        send()
    current: str | None = None
    while len(latencies) < w.requests:
        current = sched.choose(current, {e: len(b) for e, b in batches.items()})
        if current is None:
            raise RuntimeError("the scheduler chose nothing while requests were waiting")
        sched.set_paused(current, False)
        batch = batches.setdefault(current, [])
        while True:
            for r in sched.take(current, len(batch)):
                now[0] += w.prefill_s
                batch.append(r)
            if not batch:
                break
            now[0] += costs.step(len(batch), compile_rows)
            steps[0] += 1
            rows_run[0] += len(batch)
            for r in batch:
                r.left -= 1
            for r in [r for r in batch if r.left == 0]:
                batch.remove(r)
                latencies.append(now[0] - r.arrived)
                send()
            if sched.choose(current, {e: len(b) for e, b in batches.items()}) != current:
                break
        if batch:
            sched.set_paused(current, True)
        else:
            batches.pop(current, None)
    latencies.sort()
    return {
        "req_per_s": len(latencies) / now[0],
        "p50_s": latencies[len(latencies) // 2],
        "p99_s": latencies[max(0, int(len(latencies) * 0.99) - 1)],
        "mean_rows_per_step": rows_run[0] / steps[0],
    }


def averaged(
    make: Callable[[], Scheduler], costs: StepCosts, rows: tuple[int, ...], w: Workload, seeds: int
) -> dict[str, float]:
    runs = [simulate(make(), costs, rows, w, seed) for seed in range(seeds)]
    return {k: round(statistics.mean(r[k] for r in runs), 3) for k in runs[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", required=True, type=Path, help="step_table.py's JSON")
    p.add_argument("--experts", default="16,150")
    p.add_argument("--concurrency", default="16,64")
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-wait", type=float, default=5.0)
    p.add_argument("--prefill-s", type=float, default=0.02, help="seconds per request's prefill (assumed)")
    p.add_argument("--compile-rows", default="2,3,4", help="compiled sizes above one (second run)")
    p.add_argument("--patience", default="2,10,30", help="most-rows variants: seconds before overdue")
    p.add_argument("--seeds", type=int, default=5)
    a = p.parse_args()
    costs = StepCosts.from_table(json.loads(a.table.read_text())["table"])
    with_rows = tuple(int(x) for x in a.compile_rows.split(",") if x)
    out: list[dict[str, object]] = []
    for experts in (int(x) for x in a.experts.split(",")):
        for clients in (int(x) for x in a.concurrency.split(",")):
            w = Workload(experts, clients, a.zipf, a.requests, a.max_tokens, a.prefill_s)
            for rows in ((), with_rows):
                cell: dict[str, object] = {"experts": experts, "clients": clients, "compile_rows": list(rows)}
                for name, policy in POLICIES.items():
                    make = functools.partial(Scheduler, policy, max_wait_s=a.max_wait)
                    cell[name] = averaged(make, costs, rows, w, a.seeds)
                for wait in (float(x) for x in a.patience.split(",")):
                    most = functools.partial(MostRows, POLICIES["ours"], max_wait_s=wait)
                    cell[f"most-rows patience {wait:g}s"] = averaged(most, costs, rows, w, a.seeds)
                out.append(cell)
    print(json.dumps({"prediction": True, "free_switches": True, "zipf": a.zipf, "cells": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
