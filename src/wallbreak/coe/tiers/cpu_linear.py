"""fp32 linear layers at a few rows on the CPU, split across the cores.

torch's fp32 `linear` of a handful of rows (decode) runs on one core (measured on a 2-core x86 CPU):
the BLAS treats a matrix-vector product as too small to thread, so streaming SmolLM2's weights from
memory ran at 10.5 GB/s with one thread or two. Viewing the weight as `parts` stacked blocks of rows
and multiplying them with one `bmm` puts a block on each core: 24.7 GB/s over 200 [1536, 576]
weights at one row. Per row count, for SmolLM2's layer shapes (linear -> split, ms for 250
weights): 1: 55.6 -> 24.0, 2: 85.4 -> 24.6, 4: 76.0 -> 40.8, 8: 79.9
-> 57.9, 16: 80.8 -> 67.4, 32: 103.1 -> 94.0; past `MAX_ROWS` (prefill) the threaded GEMM is the
better kernel and runs as before. Only fp32: bf16's and the compact formats' kernels already use
every core (`coe/bundle/compact.py`), and bf16 through `bmm` was slower.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from wallbreak.coe.cores import intra_op_threads

MAX_ROWS = 32  # up to this many rows the split product wins (measured above); past it, plain linear


class SplitLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same names) whose few-row products use every core."""

    parts: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        many = not isinstance(rows, int) or rows > MAX_ROWS  # or a trace whose rows vary (a prefill)
        if many or x.device.type != "cpu" or self.parts < 2 or not self.weight.is_contiguous():
            return F.linear(x, self.weight, self.bias)
        w = self.weight.view(self.parts, self.out_features // self.parts, self.in_features)
        x2 = x.reshape(rows, self.in_features)
        y = torch.bmm(w, x2.T.expand(self.parts, -1, -1))  # [parts, out / parts, rows]
        y = y.permute(2, 0, 1).reshape(rows, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def parts_for(out_features: int, threads: int) -> int:
    """One block of rows per core, as many as divide the output evenly (1: leave it alone)."""
    for p in range(max(threads, 1), 1, -1):
        if out_features % p == 0:
            return p
    return 1


def split_linears(model: nn.Module) -> int:
    """Make every fp32 `nn.Linear` of a CPU model a `SplitLinear`, in place; returns how many."""
    threads = intra_op_threads()  # the engine thread's, which runs the model (coe/cores.py)
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu":
            parts = parts_for(mod.out_features, threads)
            if parts > 1:
                mod.__class__ = SplitLinear
                cast(SplitLinear, mod).parts = parts
                n += 1
    return n
