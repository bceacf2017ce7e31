"""Checkpoints sharded per stage, written atomically, tied to the plan that wrote them.

Layout: DIR/step-00000005/stage-0.safetensors + stage-0.json ... stage-{pp-1}.*, meta.json, then
DIR/latest. One data-parallel replica per stage writes its shard under temp names and renames them;
after a barrier rank 0 writes meta.json and then `latest`, so a step is visible only once every
shard is complete. Tensors go to safetensors and everything else (the step, the optimizer's
hyperparameters) to JSON: nothing in a checkpoint directory is a pickle, so whoever can write it
cannot run code in the ranks that load it. Checkpoints of the old pickled form are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from wallbreak.common.atomic import atomic_open, atomic_write_json
from wallbreak.common.jsonfile import read_json
from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.plan_file import RunPlan


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save(
    root: Path, step: int, *, plan: RunPlan, stage: int, write: bool, rank: int, state: dict[str, Any]
) -> None:
    d = step_dir(root, step)
    if write:
        d.mkdir(parents=True, exist_ok=True)
        write_stage(d, stage, state)
    dist.barrier()
    if rank == 0:
        atomic_write_json(
            d / "meta.json",
            {"step": step, "fingerprint": plan.fingerprint(), **plan.layout.to_json(),
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
    return read_stage(d, stage)


def _split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A stage's state as named tensors and a JSON record of the rest (and of where each tensor goes)."""
    tensors = {f"model/{k}": v.detach().contiguous() for k, v in state["model"].items()}
    opt = state["optimizer"]
    per_param: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        plain, held = {}, []
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = val.detach().contiguous()
                held.append(key)
            else:
                plain[key] = val
        per_param[str(pid)] = {"tensors": held, "values": plain}
    record = {
        "step": state["step"],
        "model": list(state["model"]),
        "optimizer": {"param_groups": opt["param_groups"], "state": per_param},
    }
    return tensors, record


def write_stage(d: Path, stage: int, state: dict[str, Any]) -> None:
    tensors, record = _split(state)
    with atomic_open(d / f"stage-{stage}.safetensors", "wb") as f:
        f.write(save_tensors(tensors))
    atomic_write_json(d / f"stage-{stage}.json", record)


def read_stage(d: Path, stage: int) -> dict[str, Any]:
    """A stage's state as `write_stage` wrote it: {"step", "model", "optimizer"}."""
    tpath, jpath = d / f"stage-{stage}.safetensors", d / f"stage-{stage}.json"
    if not tpath.is_file() and (d / f"stage-{stage}.pt").is_file():
        raise ConfigError(
            f"checkpoint {d} is in the old pickled form (stage-{stage}.pt), which wallbreak no longer "
            "loads: a pickle can run code. Train again from the start, or into a new --checkpoint-dir"
        )
    if not tpath.is_file() or not jpath.is_file():
        raise ConfigError(f"checkpoint {d} has no shard for stage {stage}")
    try:
        tensors = load_tensors(tpath.read_bytes())
    except SafetensorError as e:
        raise ConfigError(f"checkpoint {tpath} is damaged: {e}") from None
    record = read_json(jpath, "checkpoint shard")
    try:
        model = {k: tensors[f"model/{k}"] for k in record["model"]}
        opt = record["optimizer"]
        state = {}
        for pid, entry in opt["state"].items():
            st = dict(entry["values"])
            st.update({key: tensors[f"optim/{pid}/{key}"] for key in entry["tensors"]})
            state[int(pid)] = st
        return {"step": int(record["step"]), "model": model,
                "optimizer": {"state": state, "param_groups": opt["param_groups"]}}  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"checkpoint {d}, stage {stage}: its record and tensors do not match ({e!r})"
        ) from None
