"""Checkpoints sharded per stage, written atomically, tied to the plan that wrote them.

Layout: DIR/step-00000005/stage-0.pt ... stage-{pp-1}.pt and meta.json, then DIR/latest. One
data-parallel replica per stage writes its shard under a temp name and renames it; after a barrier
rank 0 writes meta.json and then `latest`, so a step is visible only once every shard is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from wallbreak.common.atomic import atomic_open, atomic_write_json
from wallbreak.errors import ConfigError
from wallbreak.holmes.plan_file import RunPlan


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save(
    root: Path, step: int, plan: RunPlan, stage: int, write: bool, rank: int, state: dict[str, Any]
) -> None:
    d = step_dir(root, step)
    if write:
        d.mkdir(parents=True, exist_ok=True)
        with atomic_open(d / f"stage-{stage}.pt", "wb") as f:
            torch.save(state, f)
    dist.barrier()
    if rank == 0:
        atomic_write_json(
            d / "meta.json",
            {"step": step, "fingerprint": plan.fingerprint(), "pp": plan.pp, "tp": plan.tp, "dp": plan.dp,
             "stage_layers": list(plan.stage_layers)},
        )  # fmt: skip
        atomic_write_json(root / "latest", {"step": step})
    dist.barrier()


def latest(root: Path) -> int | None:
    try:
        step = int(json.loads((root / "latest").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None
    return step if (step_dir(root, step) / "meta.json").is_file() else None


def load(root: Path, step: int, plan: RunPlan, stage: int) -> dict[str, Any]:
    d = step_dir(root, step)
    meta = json.loads((d / "meta.json").read_text())
    if meta.get("fingerprint") != plan.fingerprint():
        raise ConfigError(
            f"checkpoint {d} was written by a different plan (tp={meta.get('tp')} pp={meta.get('pp')} "
            f"dp={meta.get('dp')} layers={meta.get('stage_layers')}; this plan: tp={plan.tp} pp={plan.pp} "
            f"dp={plan.dp} layers={list(plan.stage_layers)}); resume with the plan that wrote it"
        )
    path = d / f"stage-{stage}.pt"
    if not path.is_file():
        raise ConfigError(f"checkpoint {d} has no shard for stage {stage}")
    state: dict[str, Any] = torch.load(path, weights_only=False)
    return state
