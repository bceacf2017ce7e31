"""The decode ceiling of one expert on the machine it runs on: its linear layers alone, at one row.

    python benchmarks/matmul_ceiling.py --bundle DIR --expert NAME [--repeats 20]

A decode step at batch size 1 must at least run every linear layer of the model once on a one-row
input (in the expert's stored form: fp32/bf16 matmuls, or the int8/int4 kernels of `coe.compact`),
and for a small model those read every weight byte once. This times exactly that, layer by layer,
with nothing else (no attention, norms, sampling or Python around them), best of `--repeats`.
`ceiling_tps` = 1 / that time is the most tokens/s any decode step built on these kernels can reach
here, compiled or not; `gb_s` is the weight bytes read per second. The target of compiled fp32 >=
1.5x eager at batch 1 is checked against it in docs/benchmarks.md. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from wallbreak.coe.bundle import compact
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.tiers.device import load_standalone


def linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, compact.QuantLinear))]


def weight_bytes(layer: nn.Module) -> int:
    src = getattr(layer, "table", None) or layer
    return sum(
        b.numel() * b.element_size() for b in [*src.parameters(recurse=False), *src.buffers(recurse=False)]
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--expert", required=True)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    model = load_standalone(Bundle.open(a.bundle), a.expert)
    layers = linears(model)
    dtype = next(model.parameters()).dtype
    inputs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in layers]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for m, x in zip(layers, inputs, strict=True):
                m(x)
            best = min(best, time.perf_counter() - t0)
    nbytes = sum(weight_bytes(m) for m in layers)
    out = {
        "expert": a.expert,
        "linear_layers": len(layers),
        "weight_bytes": nbytes,
        "matmul_ms": round(best * 1e3, 2),
        "ceiling_tps": round(1 / best, 1),
        "gb_s": round(nbytes / best / 1e9, 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
