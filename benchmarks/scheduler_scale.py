"""The scheduler's cost per choice as the expert count grows: `Scheduler.choose`, and `upcoming`
(the prefetch's question), with W requests waiting, Zipf 1.0 over N experts, for each policy.
Prints one JSON object: microseconds per call, median of 2,000.

    python benchmarks/scheduler_scale.py [--experts 8,16,32,64,150] [--waiting 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from wallbreak.coe.bench.serve import zipf_sequence
from wallbreak.coe.engine import POLICIES, Request, SamplingParams
from wallbreak.coe.engine.scheduler import Scheduler


def per_call_us(fn: object, n: int = 2000) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", default="8,16,32,64,150")
    ap.add_argument("--waiting", type=int, default=64)
    args = ap.parse_args()
    out: dict[str, object] = {"waiting": args.waiting, "us_per_call": {}}
    for n in (int(x) for x in args.experts.split(",")):
        names = [f"e{i:03d}" for i in range(n)]
        for policy in POLICIES:
            s = Scheduler(POLICIES[policy], max_batch=8, max_wait_s=2.0)
            for e in zipf_sequence("zipf:1.0", names, args.waiting, seed=0):
                s.submit(Request(e, [1, 2, 3], SamplingParams(max_tokens=4), lambda ev: None))
            first = names[0]
            active: dict[str, int] = {}  # nothing running: the full ranking over every waiting expert
            cost = {e: (0.0 if i < 8 else 0.1) for i, e in enumerate(names)}
            out["us_per_call"][f"{n} experts, {policy}"] = {  # type: ignore[index]
                "choose": per_call_us(lambda s=s, a=active, c=cost: s.choose(None, a, c.__getitem__)),
                "upcoming": per_call_us(lambda s=s, f=first: s.upcoming(f)),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
