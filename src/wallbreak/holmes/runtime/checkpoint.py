"""Checkpoints with torch.distributed.checkpoint (DCP): sharded per rank, resharded on load.

Layout: DIR/step-00000005/shards/*.safetensors (DCP's Hugging Face storage: every rank writes its
own tensors, tensor-parallel shards with their offsets), DIR/step-00000005/meta.json (the step,
the model's config, and the layout of the plan that wrote it), then DIR/latest. A step is visible
only once meta.json is written after every rank finished, and `latest` after it.

Tensors are keyed by their Hugging Face names with global layer indices, and the optimizer's
moments by `optim.NAME.exp_avg[_sq]`. A run on another plan (other pp, dp or tp, another split)
asks DCP for the tensors its own stage holds, and DCP reads the overlapping pieces: that is the
resharding. The last stage's copy of a tied embedding is saved and loaded under the embedding's
name. Nothing here is a pickle: DCP's usual `.metadata` file is one, so this uses its safetensors
storage, whose reader rebuilds the metadata from the safetensors headers; the rest is JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from wallbreak.common.atomic import atomic_write_json
from wallbreak.common.jsonfile import read_json
from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.plan_file import RunPlan
from wallbreak.holmes.runtime.model import canonical

FORMAT = "wallbreak-checkpoint"
VERSION = 2  # 1: per-stage safetensors of whole tensors, bound to one plan
MOMENTS = ("exp_avg", "exp_avg_sq")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def latest(root: Path) -> int | None:
    try:
        step = int(json.loads((root / "latest").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if (step_dir(root, step) / "meta.json").is_file() else None


def _state(modules: list[nn.Module], opt: torch.optim.Optimizer | None, tied: bool) -> dict[str, Any]:
    """The tensors this rank holds (its stage, or its chunks), by checkpoint key; views of the live
    tensors, so a load writes in place."""
    out: dict[str, Any] = {}
    for name, p in ((n, q) for m in modules for n, q in m.named_parameters()):
        key = canonical(name, tied)
        out[key] = p.detach()
        if opt is not None:
            st = opt.state.setdefault(p, {})
            for m in MOMENTS:
                if m not in st:
                    st[m] = torch.zeros_like(p, memory_format=torch.preserve_format)
                out[f"optim.{key}.{m}"] = st[m]
    return out


def save(root: Path, step: int, *, modules: list[nn.Module], opt: torch.optim.Optimizer, plan: RunPlan,
         rank: int, extra: dict[str, Any]) -> None:  # fmt: skip
    """Every rank calls this; DCP drops the copies that data-parallel replicas hold."""
    import torch.distributed.checkpoint as dcp  # deferred: loads torch.distributed.checkpoint

    d = step_dir(root, step)
    dcp.save(
        _state(modules, opt, plan.model.tied),
        storage_writer=dcp.HuggingFaceStorageWriter(str(d / "shards"), save_distributed=True),
    )
    dist.barrier()
    if rank == 0:
        meta = {
            "format": FORMAT, "version": VERSION, "step": step,
            "model": {"name": plan.model.name, "seq_len": plan.model.seq_len, "config": plan.model.config,
                      "source": plan.model.source},
            "layout": {**plan.layout.to_json(), "stage_layers": list(plan.stage_layers),
                       "fingerprint": plan.fingerprint()},
        } | extra  # fmt: skip
        atomic_write_json(d / "meta.json", meta)
        atomic_write_json(root / "latest", {"step": step})
    dist.barrier()


def last_line(e: BaseException) -> str:
    """The cause of a DCP failure: its message's last line (DCP wraps every rank's traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def read_meta(d: Path) -> dict[str, Any]:
    """A step's meta.json, checked; old and foreign checkpoints get one clear message."""
    if any(d.glob("stage-*.pt")) or any(d.glob("stage-*.safetensors")):
        raise ConfigError(
            f"checkpoint {d} is in an old form (one file per stage, bound to its plan), which "
            "wallbreak no longer loads; train again into a new --checkpoint-dir"
        )
    meta = read_json(d / "meta.json", "checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(f"{d / 'meta.json'} is not a wallbreak checkpoint of version {VERSION}")
    return meta


def load(root: Path, step: int, *, modules: list[nn.Module], opt: torch.optim.Optimizer | None,
         plan_config: dict[str, Any], tied: bool) -> dict[str, Any]:  # fmt: skip
    """Fill this rank's parameters (and optimizer moments) from step `step`, on whatever plan; the
    step's meta.json back. The model's config must be the one the checkpoint holds."""
    import torch.distributed.checkpoint as dcp  # deferred: loads torch.distributed.checkpoint

    d = step_dir(root, step)
    meta = read_meta(d)
    if meta["model"].get("config") != plan_config:
        raise ConfigError(
            f"checkpoint {d} holds another model ({meta['model'].get('name')}); resume with a plan "
            "of the same model (any layout)"
        )
    state = _state(modules, opt, tied)
    try:
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(d / "shards")))
    except (dcp.CheckpointException, RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint {d} cannot fill this stage: {last_line(e)}") from None
    if opt is not None:
        for p in (q for g in opt.param_groups for q in g["params"]):
            opt.state[p]["step"] = torch.tensor(float(meta["step"]))
    return meta
