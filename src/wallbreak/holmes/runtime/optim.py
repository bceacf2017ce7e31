"""The optimizer as people run it: AdamW with decoupled weight decay on matrices only, gradient
clipping by the global norm across every stage and tensor-parallel shard, and a linear warm-up
followed by a cosine decay of the learning rate. One owner for these rules and their defaults.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from wallbreak.errors import ConfigError
from wallbreak.holmes.runtime.tensor_parallel import is_sharded, local


@dataclass(frozen=True)
class OptimSpec:
    lr: float = 3e-4
    min_lr: float = 3e-5  # where the cosine ends
    warmup_steps: int = 0
    decay_steps: int = 0  # where the cosine reaches min_lr (0: the run's --steps)
    weight_decay: float = 0.1  # on matrices and embeddings, never on norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient norm cap (0: no clipping)

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr", "weight_decay", "eps", "clip_grad"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("warmup_steps", "decay_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of optimizer step `step` (0-based) of a run of `total` steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        horizon = (self.decay_steps or total) - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, horizon))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


def decays(p: torch.Tensor) -> bool:
    """Weight decay applies to matrices and embeddings (2-D), not to norm scales or biases."""
    return p.dim() >= 2


def adamw(params: Iterable[nn.Parameter], spec: OptimSpec) -> torch.optim.AdamW:
    ps = list(params)
    groups = [
        {"params": [p for p in ps if decays(p)], "weight_decay": spec.weight_decay},
        {"params": [p for p in ps if not decays(p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps
    )


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def global_grad_norm(
    module: nn.Module, *, tp_index: int, skip: Iterable[torch.Tensor] = (), dp: int = 1, group: Any = None
) -> float:
    """The L2 norm of the whole model's gradient, every rank's answer the same.

    Each rank adds the squares it alone holds: its shard of a tensor-parallel weight, and a
    replicated tensor only on tensor-parallel rank 0; `skip` names tensors counted elsewhere (the
    last stage's copy of a tied embedding). The sum runs over all ranks (`group`: the world), and
    the data-parallel replicas, whose gradients are equal after the sync, are divided out.
    """
    skipped = {id(t) for t in skip}
    total = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        if p.grad is None or id(p) in skipped:
            continue
        if is_sharded(p.grad) or tp_index == 0:
            total += local(p.grad).detach().double().pow(2).sum().cpu()
    if dist.is_initialized():
        t = total.to(next(module.parameters()).device)
        dist.all_reduce(t, group=group)
        total = t.cpu() / dp
    return float(total.sqrt())


def clip_(module: nn.Module, norm: float, max_norm: float) -> None:
    """Scale every gradient by max_norm / norm when the norm is above it (torch's clip_grad_norm_ rule)."""
    if max_norm <= 0:
        return
    coef = max_norm / (norm + 1e-6)
    if coef >= 1.0:
        return
    for p in module.parameters():
        if p.grad is not None:
            local(p.grad).mul_(coef)
