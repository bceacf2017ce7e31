"""Tensor parallelism applied from outside the model, with torch.distributed.tensor.parallel.

Megatron's split per block: q, k, v and the first MLP layer by columns (each rank holds whole
heads), the attention output and the second MLP layer by rows (their outputs all-reduced). Layer
norms, the embedding and the head stay replicated. Checkpoints hold full tensors, gathered at save
time and sliced again at load time, so a shard file does not depend on the tensor-parallel degree.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

COLUMN = ("q", "k", "v", "fc")
ROW = ("proj", "out")


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
    for block in module.blocks:  # type: ignore[union-attr]
        parallelize_module(block, mesh, plan)


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor  # deferred: loads torch.distributed

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def full(t: Any) -> Any:
    """A whole tensor (a collective on the tensor-parallel group for sharded ones)."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_of(target: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `whole`, shaped like the sharded `target`."""
    if not is_dtensor(target):
        return whole
    place = target.placements[0]  # type: ignore[attr-defined]
    if not hasattr(place, "dim"):
        return whole
    mesh = target.device_mesh  # type: ignore[attr-defined]
    return whole.chunk(mesh.size(), dim=place.dim)[mesh.get_local_rank()]


def full_state(module: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    model = {k: full(v).detach().clone() for k, v in module.state_dict().items()}
    sd = opt.state_dict()
    for st in sd["state"].values():
        for key, val in list(st.items()):
            st[key] = full(val)
    return model, sd


def load_full_state(
    module: nn.Module, opt: torch.optim.Optimizer, model: dict[str, Any], optim: dict[str, Any]
) -> None:
    with torch.no_grad():
        for k, t in module.state_dict().items():
            local(t).copy_(shard_of(t, model[k]))
    opt.load_state_dict(optim)
    from torch.distributed.tensor import DTensor  # deferred: loads torch.distributed

    for p in (q for g in opt.param_groups for q in g["params"]):
        if not is_dtensor(p):
            continue
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st and not is_dtensor(st[key]):
                st[key] = DTensor.from_local(
                    shard_of(p, st[key]).to(p.device), p.device_mesh, p.placements, run_check=False
                )
