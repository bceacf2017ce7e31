"""The decode step table: tokens/s of one expert's decode step by rows in the batch and path (eager,
and the ahead-of-time compiled step where it runs), interleaved in one process.

    WALLBREAK_CACHE=... python benchmarks/step_table.py --bundle DIR --expert NAME [--rows 1,2,4,8,16]

Each round runs `--steps` decode steps of every (rows, path) cell in turn, each on a fresh
128-token context per row, and the cell's figure is the median over rounds of rows x steps /
seconds. The one-row compiled package is used where it exists (`wallbreak bundle compile DIR`).
With `--buckets`, a compiled package for each other row count in `--rows` is built first (fixed
rows, `aot` part "decode-rowsN", in a child process, kept in the cache) and measured too; each
cell also says how often its greedy token agrees with eager's on contexts of random tokens, and the
largest total variation between the two next-token distributions. Prints one JSON object: what the
choice between batching rows eagerly, compiled row buckets and one row at a time rests on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.engine import aot
from wallbreak.coe.engine.kv import KVCache
from wallbreak.coe.engine.step import forward, run_step
from wallbreak.coe.tiers.device import load_standalone


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--expert", required=True)
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--checks", type=int, default=4, help="random contexts per cell for agreement")
    p.add_argument("--buckets", action="store_true", help="build and measure compiled steps for --rows > 1")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    bundle = Bundle.open(a.bundle)
    entry = bundle.expert(a.expert)
    rows_list = [int(r) for r in a.rows.split(",")]
    steps: dict[int, aot.AotStep] = {}
    built_s: dict[int, float] = {}
    for rows in rows_list:
        part = "decode" if rows == 1 else f"decode-rows{rows}"
        path = aot.package_path(entry.layout_key, part)
        if rows > 1 and a.buckets and not path.is_file():
            t0 = time.perf_counter()
            aot.build_in_child(a.bundle, a.expert, path, part=part)  # the build seals it
            built_s[rows] = round(time.perf_counter() - t0, 1)
        if path.is_file():
            steps[rows] = aot.AotStep(path)
    model = load_standalone(bundle, a.expert)
    cells = [(r, "eager") for r in rows_list] + [(r, "compiled") for r in rows_list if r in steps]

    def context(rows: int, prompt: torch.Tensor | None = None) -> KVCache:
        cache = KVCache.for_model(model)
        cache.open_rows(rows)
        forward(model, torch.ones(rows, 128, dtype=torch.long) if prompt is None else prompt, cache)
        return cache

    def one(rows: int, kind: str, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return steps[rows](model, ids, cache) if kind == "compiled" else run_step(model, ids, cache, None)

    agree: dict[tuple[int, str], float] = {}
    distance: dict[tuple[int, str], float] = {}
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    for rows, kind in cells:  # each path against eager, same inputs: greedy token and distribution
        same, tv = [], []
        for _ in range(a.checks):
            # A context of random tokens, not of one repeated token: 128 copies of one token put
            # SmolLM2 where bf16 rounding alone moves logits by tens (eager int8 against the fp32
            # model too), so agreement there measures chaos, not the compiled step.
            prompt = torch.randint(0, vocab, (rows, 128), generator=gen)
            ids = torch.randint(0, vocab, (rows, 1), generator=gen)
            want = run_step(model, ids, context(rows, prompt), None)
            got = one(rows, kind, ids, context(rows, prompt))
            same += (got.argmax(-1) == want.argmax(-1)).tolist()
            tv += [aot.probe_distance(got[r], want[r]) for r in range(rows)]
        agree[(rows, kind)] = sum(same) / len(same)
        distance[(rows, kind)] = max(tv)
    rates: dict[tuple[int, str], list[float]] = {c: [] for c in cells}
    for _ in range(a.rounds):
        for rows, kind in cells:
            cache = context(rows)
            ids = torch.ones(rows, 1, dtype=torch.long)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                one(rows, kind, ids, cache)
            rates[(rows, kind)].append(rows * a.steps / (time.perf_counter() - t0))
    table = [
        {
            "rows": r,
            "path": k,
            "tokens_per_s": round(statistics.median(v), 1),
            "greedy_agrees_with_eager": round(agree[(r, k)], 3),
            "max_tv_from_eager": round(distance[(r, k)], 4),
            "rounds": [round(x, 1) for x in v],
        }
        for (r, k), v in rates.items()
    ]
    out = {"expert": a.expert, "form": entry.dtype, "threads": torch.get_num_threads(), "table": table}
    print(json.dumps(out | {"bucket_build_s": built_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
