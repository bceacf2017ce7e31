"""A trained checkpoint out as a Hugging Face model folder, or straight into a CoE bundle.

`export` reads a DCP checkpoint in one process (DCP reassembles every stage's and shard's pieces
into whole tensors), puts them into transformers' own AutoModelForCausalLM for the checkpoint's
config, and writes it with `save_pretrained` (config.json, model.safetensors) plus the tokenizer,
under a temporary name then renamed. `AutoModelForCausalLM.from_pretrained` loads the result, and
`wallbreak bundle import` takes it like any other folder; `export_to_bundle` does both in one go.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from wallbreak.common.atomic import atomic_dir
from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.spec import ModelSpec
from wallbreak.holmes.runtime import checkpoint
from wallbreak.holmes.runtime.data import load_tokenizer
from wallbreak.holmes.runtime.model import canonical, hf_config


def checkpoint_step(root: Path, step: int | None) -> int:
    if not root.is_dir():
        raise ConfigError(f"checkpoint folder {root} does not exist")
    found = checkpoint.latest(root) if step is None else step
    if found is None or not (checkpoint.step_dir(root, found) / "meta.json").is_file():
        raise ConfigError(f"{root} holds no complete checkpoint" + (f" for step {step}" if step else ""))
    return found


def load_model(root: Path, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """transformers' model for a checkpoint's config, holding its weights; and its meta.json."""
    import torch.distributed.checkpoint as dcp  # deferred: loads torch.distributed.checkpoint
    from transformers import AutoModelForCausalLM  # deferred: loads transformers

    d = checkpoint.step_dir(root, checkpoint_step(root, step))
    meta = checkpoint.read_meta(d)
    m = meta["model"]
    spec = ModelSpec(str(m["name"]), m["config"], int(m["seq_len"]), m.get("source") or {})
    model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.float32)
    state = {canonical(n, spec.tied): p.detach() for n, p in model.named_parameters()}
    try:
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(d / "shards")), no_dist=True)
    except (dcp.CheckpointException, RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint {d} cannot be read: {checkpoint.last_line(e)}") from None
    model.eval()
    return model, meta


def tokenizer_of(root: Path, step: int | None, tokenizer: Path | None) -> Path | None:
    """The tokenizer an export carries: `--tokenizer`, else the model source's, else none."""
    if tokenizer is not None:
        return tokenizer
    meta = checkpoint.read_meta(checkpoint.step_dir(root, checkpoint_step(root, step)))
    named = (meta["model"].get("source") or {}).get("tokenizer")
    return Path(named) if named else None


def export(root: Path, out: Path, *, step: int | None = None, tokenizer: Path | None = None) -> Path:
    """Write the checkpoint as a Hugging Face folder at `out` (which must not exist)."""
    if out.exists():
        raise ConfigError(f"--out {out} exists; give a new folder")
    tok_dir = tokenizer_of(root, step, tokenizer)
    model, _ = load_model(root, step)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        if tok_dir is not None:
            load_tokenizer(tok_dir).save_pretrained(str(tmp))
            for extra in ("generation_config.json",):  # the sampling defaults the importer kept
                if (tok_dir / extra).is_file() and not (tmp / extra).is_file():
                    shutil.copy(tok_dir / extra, tmp / extra)
    return out


def export_to_bundle(
    root: Path, bundle: Path, name: str, *, step: int | None = None, tokenizer: Path | None = None,
    dtype: str | None = None, description: str = "", examples: Sequence[str] = (),
) -> None:  # fmt: skip
    """Export, then import into `bundle` as expert `name` in form `dtype` (int8, int4, bf16, ...)."""
    from wallbreak.coe.bundle.importers import import_expert  # deferred: loads transformers

    if tokenizer_of(root, step, tokenizer) is None:  # before the weights are read and written
        raise ConfigError(
            "the checkpoint's model names no tokenizer (it was planned from a preset or a folder "
            "without one), and an expert needs one: give --tokenizer DIR"
        )
    with tempfile.TemporaryDirectory(prefix="wallbreak-export-") as tmp:
        folder = export(root, Path(tmp) / "model", step=step, tokenizer=tokenizer)
        import_expert(folder, name, bundle, description=description, examples=examples, dtype=dtype)
