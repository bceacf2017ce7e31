"""The decode step table: tokens/s of one expert's decode step by rows in the batch and path (eager,
and the ahead-of-time compiled step where it runs), interleaved in one process.

    WALLBREAK_CACHE=... python benchmarks/step_table.py --bundle DIR --expert NAME [--rows 1,2,4,8,16]

Each round runs `--steps` decode steps of every (rows, path) cell in turn, each on a fresh
128-token context per row, and the cell's figure is the median over rounds of rows x steps /
seconds. The compiled package is used where it exists (`wallbreak bundle compile DIR`); it is
built for one row, so other rows show the eager path only. Prints one JSON object: what the
scheduler's choice between batching rows eagerly and running rows one at a time compiled rests on.
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
    a = p.parse_args()
    torch.set_grad_enabled(False)
    bundle = Bundle.open(a.bundle)
    entry = bundle.expert(a.expert)
    path = aot.package_path(entry.layout_key)
    step = aot.AotStep(path) if path.is_file() else None
    model = load_standalone(bundle, a.expert)
    rows_list = [int(r) for r in a.rows.split(",")]
    cells = [(r, "eager") for r in rows_list] + ([(1, "compiled")] if step is not None else [])

    def context(rows: int) -> KVCache:
        cache = KVCache.for_model(model)
        cache.open_rows(rows)
        forward(model, torch.ones(rows, 128, dtype=torch.long), cache)
        return cache

    rates: dict[tuple[int, str], list[float]] = {c: [] for c in cells}
    for _ in range(a.rounds):
        for rows, path_kind in cells:
            cache = context(rows)
            ids = torch.ones(rows, 1, dtype=torch.long)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                if path_kind == "compiled":
                    assert step is not None
                    step(model, ids, cache)
                else:
                    run_step(model, ids, cache, None)
            rates[(rows, path_kind)].append(rows * a.steps / (time.perf_counter() - t0))
    table = [
        {
            "rows": r,
            "path": k,
            "tokens_per_s": round(statistics.median(v), 1),
            "rounds": [round(x, 1) for x in v],
        }
        for (r, k), v in rates.items()
    ]
    print(
        json.dumps(
            {"expert": a.expert, "form": entry.dtype, "threads": torch.get_num_threads(), "table": table}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
