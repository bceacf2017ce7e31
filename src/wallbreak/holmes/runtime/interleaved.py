"""Interleaved 1F1B: each pipeline rank holds several model chunks, on torch.distributed.pipelining.

With v chunks per rank the model is cut into pp x v chunks; chunk c lives on pipeline rank c % pp
(torch's looped placement), so rank r holds chunks r, r + pp, ... and the pipeline fills and
drains in chunk-sized steps: the bubble shrinks by v (Narayanan et al., SC'21). A rank's planned
layer count is spread over its chunks (the first ones take the remainder), so Holmes' uneven,
per-cluster split is kept.

Here torch's own `ScheduleInterleaved1F1B` fits: it orders every send and receive the same way on
both sides (what NCCL needs), chunks the global batch, scales the loss and takes our stage
modules as they are. It cannot host our overlapped gradient sync (it runs every backward itself),
so the data-parallel all-reduce follows the schedule, unoverlapped; GPipe and 1F1B keep our own
layer (pipeline.py), which overlaps it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.plan_file import RunPlan


def chunk_layers(plan: RunPlan, virtual: int) -> list[range]:
    """The layers of each of the pp x v chunks, in model order (chunk c on rank c % pp)."""
    pp = plan.pp
    sizes = []
    for r, n in enumerate(plan.stage_layers):
        if n < virtual:
            raise ConfigError(
                f"--schedule interleaved with {virtual} chunks per rank: pipeline rank {r} holds "
                f"{n} layer(s); every rank needs at least {virtual} (use fewer --virtual-stages)"
            )
        sizes.append([n // virtual + (1 if j < n % virtual else 0) for j in range(virtual)])
    out, start = [], 0
    for c in range(pp * virtual):
        n = sizes[c % pp][c // pp]
        out.append(range(start, start + n))
        start += n
    return out


class Autocast(nn.Module):
    """A chunk run under torch.autocast (what the pipelining schedule calls)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.inner(x)
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.inner(x)


class Interleaved:
    """One rank's chunks under ScheduleInterleaved1F1B."""

    def __init__(self, chunks: list[tuple[int, nn.Module]], plan: RunPlan, group: Any,
                 device: torch.device, loss_fn: Any, autocast: torch.dtype | None) -> None:  # fmt: skip
        from torch.distributed.pipelining import (  # deferred: loads torch.distributed.pipelining
            PipelineStage,
            ScheduleInterleaved1F1B,
        )

        total = plan.pp * plan.training.virtual_stages
        stages: list[Any] = [
            PipelineStage(Autocast(m, autocast), c, total, device, group=group) for c, m in chunks
        ]
        m = plan.microbatches
        try:
            self.schedule = ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=loss_fn)
        except ValueError as e:
            raise ConfigError(f"--schedule interleaved: {e}") from None
        self.first = any(c == 0 for c, _ in chunks)
        self.last = any(c == total - 1 for c, _ in chunks)

    def run(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One iteration over this data-parallel rank's batch; the mean loss (on the last stage)."""
        losses: list[torch.Tensor] = []
        args = (x,) if self.first else ()
        self.schedule.step(*args, target=y if self.last else None, losses=losses if self.last else None,
                           return_outputs=False)  # fmt: skip
        return float(sum(float(t.detach()) for t in losses) / len(losses)) if losses else 0.0
