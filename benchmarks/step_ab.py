"""One expert's decode step, eager against the ahead-of-time compiled one, interleaved in one process.

    WALLBREAK_CACHE=... python benchmarks/step_ab.py --bundle DIR --expert NAME [--rounds 6] [--steps 16]

The engine-level figures (`benchmarks/engine_compile.py`) swing by 20-30% between runs on this
shared 2-core machine, more than the difference being measured. This takes the engine away and
alternates: each round runs `--steps` one-row decode steps eagerly and then as many through the
compiled package, each on a fresh 128-token context, and reports the median milliseconds per step
of each and their ratio. The package must exist (`wallbreak bundle compile DIR`, or a
`serve` that built it, with the same WALLBREAK_CACHE). Prints one JSON object.
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
from wallbreak.coe.engine.step import forward, run_step
from wallbreak.coe.engine.kv import KVCache
from wallbreak.coe.tiers.device import load_standalone


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--expert", required=True)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=16)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    bundle = Bundle.open(a.bundle)
    path = aot.package_path(bundle.expert(a.expert).layout_key)
    if not path.is_file():
        raise SystemExit(f"no compiled step at {path}: run `wallbreak bundle compile {a.bundle}` first")
    model = load_standalone(bundle, a.expert)
    step = aot.AotStep(path)
    ids = torch.ones(1, 1, dtype=torch.long)

    def context() -> KVCache:
        cache = KVCache.for_model(model)
        cache.open_rows(1)
        forward(model, torch.ones(1, 128, dtype=torch.long), cache)
        return cache

    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(a.rounds):
        for mode in times:
            cache = context()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                if mode == "compiled":
                    step(model, ids, cache)
                else:
                    run_step(model, ids, cache, None)
            times[mode].append((time.perf_counter() - t0) / a.steps * 1e3)
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    out = {
        "expert": a.expert,
        "ms_per_step": med,
        "speedup": round(med["eager"] / med["compiled"], 2),
        "rounds_ms": {k: [round(x, 1) for x in v] for k, v in times.items()},
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
