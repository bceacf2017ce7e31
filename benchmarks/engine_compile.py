"""Would torch.compile pay off inside the serving engine as it is? (issue 12's open part)

    python benchmarks/engine_compile.py --bundle DIR --expert NAME [--mode eager|compiled] [--tokens 32]

Runs the real engine (tiers, continuous batching, its own padded KV layout) on one expert, and
measures aggregate decode tokens/s for 1 and then 8 concurrent greedy requests, twice each (the
first pass includes compilation). `--mode compiled` wraps each slot's module in
`torch.compile(dynamic=True)` at the engine's forward, the cheapest way in: the KV layout keeps
changing shapes, so fixed shapes would need the fixed-capacity KV rewrite the issue describes.
Prints one line per pass, then Dynamo's graph and graph-break counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import wallbreak.coe.engine.runner as runner
from helpers import make_engine, run


def compile_at_forward() -> None:
    original = runner.Batch._forward
    compiled: dict[int, Any] = {}

    def forward(self: runner.Batch, model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        fn = compiled.setdefault(id(model), torch.compile(model, dynamic=True))
        return original(self, fn, ids, cache)

    runner.Batch._forward = forward  # type: ignore[method-assign]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--expert", required=True)
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    if a.mode == "compiled":
        compile_at_forward()
    eng, tiers = make_engine(a.bundle, max_batch=8)
    eng.start()
    try:
        ids = eng.tokenizers[a.expert].encode_text(
            "The history of the printing press begins in the fifteenth century, when"
        )
        for n in (1, 8, 1, 8):
            t0 = time.perf_counter()
            done = [run(eng, a.expert, ids, a.tokens) for _ in range(n)]
            for c in done:
                c.done.wait(900)
            dt = time.perf_counter() - t0
            print(f"{a.mode} batch {n}: {n * a.tokens / dt:.1f} tok/s aggregate ({len(ids)}-token prompt)")
        from torch._dynamo.utils import counters

        breaks = sum(counters["graph_break"].values())
        print(f"graphs {counters['stats']['unique_graphs']}, graph breaks {breaks}")
    finally:
        eng.stop()
        tiers.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
