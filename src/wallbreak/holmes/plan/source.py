"""`--model SRC`: a preset name, a Hugging Face model folder, or a GGUF file, as one `ModelSpec`.

Every source ends as a Hugging Face config plus, where there are weights, a folder of safetensors
the runtime loads per stage, and a tokenizer folder. A GGUF is converted once (transformers
dequantises it, 30-80 s for SmolLM2-135M) into a cached folder named by the file's path, size
and modification time; later plans reuse it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from wallbreak.coe.defaults import cache_dir
from wallbreak.common.atomic import atomic_dir
from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.spec import PRESETS, ModelSpec
from wallbreak.progress import say

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(folder: Path) -> bool:
    """Whether a folder holds a Hugging Face tokenizer (the files AutoTokenizer starts from)."""
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{folder / 'config.json'}: cannot read it ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{folder / 'config.json'} is not a JSON object")
    return config


def folder_source(folder: Path, kind: str = "folder", origin: Path | None = None) -> dict[str, str]:
    """Where a model folder's weights and tokenizer are (absent ones are left out)."""
    src = {"kind": kind, "path": str((origin or folder).resolve())}
    if any(folder.glob("*.safetensors")):
        src["weights"] = str(folder.resolve())
    elif any(folder.glob("*.bin")):
        raise ConfigError(
            f"{folder} holds its weights as pytorch_model*.bin (a pickle, which can run code); "
            "convert them to safetensors first"
        )
    if has_tokenizer(folder):
        src["tokenizer"] = str(folder.resolve())
    return src


def gguf_folder(path: Path) -> Path:
    """The cached Hugging Face folder of a GGUF file, converting it the first time."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "hf-from-gguf" / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from wallbreak.coe.bundle.importers import (  # deferred: loads transformers
        load_hf_model,
        save_sampling_defaults,
    )

    say(f"converting {path.name} from GGUF to safetensors once (30-80 s); cached in {out}")
    model, tok, _ = load_hf_model(path)
    with atomic_dir(out) as tmp:
        # transformers will not save_pretrained a model it dequantised from GGUF: write the tensors
        # and the config (without the GGUF quantization note) the way save_pretrained would.
        from safetensors.torch import save_file  # deferred: loads safetensors

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(str(tmp))
        save_sampling_defaults(model, tmp)
    return out


def resolve_model(src: str, seq_len: int = 2048, vocab: int | None = None) -> ModelSpec:
    """The model `--model SRC` names; `vocab` overrides only a preset's vocabulary."""
    if src in PRESETS:
        return ModelSpec.preset(src, seq_len, vocab)
    path = Path(src)
    if vocab is not None:
        raise ConfigError("--vocab applies to presets only; a model folder or GGUF has its own")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {src}: the folder has no config.json")
        return ModelSpec(path.resolve().name, _read_config(path), seq_len, folder_source(path))
    if path.is_file() and path.suffix == ".gguf":
        folder = gguf_folder(path)
        return ModelSpec(path.stem, _read_config(folder), seq_len, folder_source(folder, "gguf", path))
    raise ConfigError(
        f"--model {src}: not a preset ({', '.join(PRESETS)}), a model folder with config.json, "
        "or a .gguf file"
    )
