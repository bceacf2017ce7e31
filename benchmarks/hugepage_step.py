"""The decode step with an expert's weights on 4 KiB pages against 2 MiB (transparent huge) pages,
interleaved in one process.

    WALLBREAK_CACHE=... python benchmarks/hugepage_step.py --bundle DIR --expert NAME [--rounds 12]

On the CPU the serving engine decodes straight from the host arena (alias slots), an anonymous
mapping. This loads one expert into two such mappings, the second advised MADV_HUGEPAGE before it
is touched, as `HostArena(huge_pages=True)` does, and times the same steps on each: the one-row
step eager and compiled (the package `wallbreak bundle compile` built), and the compiled row
steps whose packages are in the cache (`serve --compile-rows`). Rounds alternate which mapping
goes first. Prints one JSON object: tokens/s per (pages, rows, path) as the median over rounds,
every round, how many rounds the huge pages won, and the huge-page bytes the kernel gave each mapping.
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
from wallbreak.coe.tiers.device import bind_to_flat, build_skeleton
from wallbreak.coe.tiers.host import HostArena


def expert_in(arena: HostArena, bundle: Bundle, name: str) -> torch.nn.Module:
    entry = bundle.expert(name)
    ext = arena.alloc(entry.total_bytes)
    assert ext is not None
    flat = arena.view(ext)[: entry.total_bytes]
    flat.copy_(bundle.read_blob(name))
    model = build_skeleton(entry, torch.device("cpu"))
    bind_to_flat(model, flat, entry)
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--expert", required=True)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=24)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    bundle = Bundle.open(a.bundle)
    entry = bundle.expert(a.expert)
    size = entry.total_bytes + (4 << 20)
    arenas = {"4k": HostArena(size, huge_pages=False), "2m": HostArena(size, huge_pages=True)}
    models = {k: expert_in(v, bundle, a.expert) for k, v in arenas.items()}
    steps: dict[int, aot.AotStep] = {}
    for rows in range(1, aot.MAX_ROWS + 1):
        path = aot.package_path(entry.layout_key, "decode" if rows == 1 else f"decode-rows{rows}")
        if path.is_file():
            steps[rows] = aot.AotStep(path)
    if 1 not in steps:
        print(
            f"no compiled one-row step for {a.expert}: run `wallbreak bundle compile {a.bundle}`",
            file=sys.stderr,
        )
        return 2
    cells = [(1, "eager")] + [(r, "compiled") for r in sorted(steps)]
    rates: dict[str, list[float]] = {}
    for rnd in range(a.rounds):
        for pages in ("4k", "2m") if rnd % 2 == 0 else ("2m", "4k"):
            model = models[pages]
            for rows, path in cells:
                cache = KVCache.for_model(model)
                cache.open_rows(rows)
                forward(model, torch.ones(rows, 128, dtype=torch.long), cache)
                ids = torch.ones(rows, 1, dtype=torch.long)
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    steps[rows](model, ids, cache) if path == "compiled" else run_step(
                        model, ids, cache, None
                    )
                rates.setdefault(f"{pages} {rows}/{path}", []).append(
                    rows * a.steps / (time.perf_counter() - t0)
                )
    table = []
    for rows, path in cells:
        small, huge = rates[f"4k {rows}/{path}"], rates[f"2m {rows}/{path}"]
        table.append(
            {
                "rows": rows,
                "path": path,
                "tokens_per_s_4k": round(statistics.median(small), 1),
                "tokens_per_s_2m": round(statistics.median(huge), 1),
                "ratio": round(statistics.median(huge) / statistics.median(small), 3),
                "rounds_2m_won": sum(h > s for h, s in zip(huge, small, strict=True)),
                "rounds": [[round(s, 1), round(h, 1)] for s, h in zip(small, huge, strict=True)],
            }
        )
    huge_bytes = {k: v.huge_bytes() for k, v in arenas.items()}
    out = {"expert": a.expert, "form": entry.dtype, "threads": torch.get_num_threads(), "rounds": a.rounds}
    print(json.dumps(out | {"huge_bytes": huge_bytes, "table": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
