"""Decode throughput of one lane on every core against one lane per core, in one process.

    WALLBREAK_CACHE=... python benchmarks/lanes_step.py --bundle DIR --experts A,B [--rows 1,2]

A lane is a thread that runs one expert's decode steps. "one lane" runs expert A with torch's
intra-op threads on every core; "N lanes" runs experts A, B, ... at once, each lane on
cores / N intra-op threads. Each cell runs for `--seconds` after a warm-up, and counts every
lane's tokens. Paths: eager and, where its package exists for that thread count
(`OMP_NUM_THREADS=T wallbreak bundle compile DIR --rows ...`), compiled. Prints one JSON object:
tokens/s per cell and the ratio of the lanes' sum to the one lane's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.engine import aot
from wallbreak.coe.engine.kv import KVCache
from wallbreak.coe.engine.step import forward, run_step
from wallbreak.coe.tiers.device import load_standalone


def lane(
    bundle: Bundle,
    expert: str,
    rows: int,
    path: str,
    threads: int,
    seconds: float,
    start: threading.Barrier,
    out: list[float],
) -> None:
    torch.set_num_threads(threads)  # this thread's OpenMP team
    torch.set_grad_enabled(False)
    entry = bundle.expert(expert)
    part = "decode" if rows == 1 else f"decode-rows{rows}"
    step = None
    if path == "compiled":
        pkg = aot.package_path(entry.layout_key, part)
        if not pkg.is_file():
            out.append(float("nan"))
            start.wait()
            return
        step = aot.AotStep(pkg)
    model = load_standalone(bundle, expert)
    cache = KVCache.for_model(model)
    cache.open_rows(rows)
    forward(model, torch.ones(rows, 128, dtype=torch.long), cache)
    ids = torch.ones(rows, 1, dtype=torch.long)

    def one() -> None:
        if step is not None:
            step(model, ids, cache)
        else:
            run_step(model, ids, cache, None)

    for _ in range(4):
        one()
    start.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        one()
        n += 1
    out.append(rows * n / (time.perf_counter() - t0))


def cell(bundle: Bundle, experts: list[str], rows: int, path: str, seconds: float) -> float:
    cores = os.cpu_count() or 1
    threads = max(1, cores // len(experts))
    start = threading.Barrier(len(experts))
    out: list[float] = []
    ts = [
        threading.Thread(target=lane, args=(bundle, e, rows, path, threads, seconds, start, out))
        for e in experts
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--experts", required=True, help="one per lane of the many-lane cells")
    p.add_argument("--rows", default="1,2")
    p.add_argument("--paths", default="eager,compiled")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    bundle = Bundle.open(a.bundle)
    experts = a.experts.split(",")
    res: dict[str, list[float]] = {}
    for _ in range(a.rounds):  # interleaved, so drift falls on every cell alike
        for rows in [int(r) for r in a.rows.split(",")]:
            for path in a.paths.split(","):
                for lanes in (1, len(experts)):
                    key = f"rows={rows} path={path} lanes={lanes}"
                    res.setdefault(key, []).append(cell(bundle, experts[:lanes], rows, path, a.seconds))
    table = {k: round(statistics.median(v), 1) for k, v in res.items()}
    ratio = {}
    for k, v in table.items():
        if k.endswith("lanes=1") and len(experts) > 1:
            many = table[k.replace("lanes=1", f"lanes={len(experts)}")]
            ratio[k.removesuffix(" lanes=1")] = round(many / v, 3) if v == v and v else None
    print(
        json.dumps(
            {
                "cores": os.cpu_count(),
                "tokens_per_s": table,
                "lanes_over_one": ratio,
                "rounds": {k: [round(x, 1) for x in v] for k, v in res.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
