"""Tensor parallelism applied from outside the model, with torch.distributed.tensor.parallel.

Megatron's split of a Llama-family layer, as torchtitan applies it: q, k, v and SwiGLU's gate and
up projections by columns (each rank holds whole heads: q heads and their key/value heads stay
together, since a contiguous chunk of heads/tp query heads uses exactly the chunk of kv_heads/tp
key/value heads), the attention output and the down projection by rows (their outputs
all-reduced). Norms, the embedding and the output layer stay replicated. transformers' attention
reshapes with -1 heads, so it runs on its shard unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


def apply_tp(module: nn.Module, group: Any, tp: int, device_type: str) -> None:
    if tp <= 1:
        return
    from torch.distributed.device_mesh import DeviceMesh  # deferred: loads torch.distributed
    from torch.distributed.tensor.parallel import (  # deferred: loads torch.distributed
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = DeviceMesh.from_group(group, device_type)
    plan: dict[str, Any] = {n: ColwiseParallel() for n in COLUMN} | {n: RowwiseParallel() for n in ROW}
    for layer in module.model.layers.values():  # type: ignore[union-attr, operator]
        parallelize_module(layer, mesh, plan)


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor  # deferred: loads torch.distributed

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def is_sharded(t: Any) -> bool:
    """A DTensor split across its mesh (not replicated)."""
    return is_dtensor(t) and any(hasattr(p, "dim") for p in t.placements)


def full(t: Any) -> Any:
    """A whole tensor (a collective on the tensor-parallel group for sharded ones)."""
    return t.full_tensor() if is_dtensor(t) else t
