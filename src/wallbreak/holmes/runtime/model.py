"""Pipeline stages built from transformers' own modules, knowing nothing of parallelism.

A stage holds a contiguous run of decoder layers of a Llama-family model (Llama, Mistral, Qwen2,
Qwen3; SmolLM2 is a Llama with tied embeddings): the embedding on the first stage, the final norm
and the output layer on the last, and its own rotary embedding. The layers are the architecture's
own `*DecoderLayer` classes, found through transformers' AutoModelForCausalLM mapping, so a
stage computes exactly what `AutoModelForCausalLM` computes for those layers.

Parameter names are the Hugging Face names (`model.layers.7.self_attn.q_proj.weight`, with the
global layer index), so weights load from a model folder per stage, checkpoints reshard across
pipeline splits by name, and an export is a plain `save_pretrained` folder.

Seeded initialisation draws each parameter from a generator seeded by (seed, name): a stage of
any split holds exactly the weights a one-stage model of the same seed holds.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.spec import ModelSpec

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def hf_config(m: ModelSpec, attention: str = "sdpa") -> Any:
    """The transformers config object of `m`; sdpa attention (causal without a mask tensor) unless
    `attention` names another of transformers' implementations ("eager": plain matmuls)."""
    from transformers import AutoConfig  # deferred: loads transformers

    body = {k: v for k, v in m.config.items() if k not in ("model_type", "transformers_version")}
    try:
        c = AutoConfig.for_model(m.arch, **body)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {m.name}: transformers refuses its config: {e}") from None
    c._attn_implementation = attention
    return c


def module_classes(config: Any) -> tuple[type, type, type]:
    """The architecture's decoder layer, RMSNorm and rotary embedding classes."""
    from transformers.models.auto.modeling_auto import (  # deferred: loads transformers
        MODEL_FOR_CAUSAL_LM_MAPPING,
    )

    cls: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    mod = sys.modules[cls.__module__]
    prefix = cls.__name__.removesuffix("ForCausalLM")
    try:
        layer, norm, rotary = (
            getattr(mod, prefix + p) for p in ("DecoderLayer", "RMSNorm", "RotaryEmbedding")
        )
        return layer, norm, rotary
    except AttributeError as e:
        raise ConfigError(f"transformers' {mod.__name__} lacks a part a stage needs: {e}") from None


class Body(nn.Module):
    """transformers' `model.` level of a causal LM, holding only what one stage needs."""

    embed_tokens: nn.Embedding | None
    layers: nn.ModuleDict
    norm: nn.Module | None
    rotary_emb: nn.Module | None

    def __init__(self, embed: nn.Embedding | None, layers: nn.ModuleDict, norm: nn.Module | None) -> None:
        super().__init__()
        self.embed_tokens, self.layers, self.norm = embed, layers, norm
        self.rotary_emb = None


class Stage(nn.Module):
    """Layers `layers` of the model; with `first` the embedding, with `last` the norm and head."""

    model: Body
    lm_head: nn.Linear | None

    def __init__(
        self, m: ModelSpec, layers: Iterable[int], first: bool, last: bool, *, recompute: bool = False,
        device: torch.device | str = "cpu", attention: str = "sdpa",
    ) -> None:  # fmt: skip
        super().__init__()
        cfg = hf_config(m, attention)
        layer_cls, norm_cls, rotary_cls = module_classes(cfg)
        self.spec, self.first, self.last, self.recompute = m, first, last, recompute
        self.layer_ids = list(layers)
        with torch.device("meta"):
            self.model = Body(
                nn.Embedding(m.vocab, m.hidden, cfg.pad_token_id) if first else None,
                nn.ModuleDict({str(i): layer_cls(cfg, i) for i in self.layer_ids}),
                norm_cls(m.hidden, eps=cfg.rms_norm_eps) if last else None,
            )
            self.lm_head = nn.Linear(m.hidden, m.vocab, bias=False) if last else None
        self.to_empty(device=device)
        with torch.device(device):
            self.model.rotary_emb = rotary_cls(config=cfg)
        if self.lm_head is not None and self.model.embed_tokens is not None and m.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; hidden states or logits (last stage) out."""
        if self.model.embed_tokens is not None:
            x = self.model.embed_tokens(x)
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        assert self.model.rotary_emb is not None
        pe = self.model.rotary_emb(x, pos)
        for layer in self.model.layers.values():
            if self.recompute and self.training:
                from torch.utils.checkpoint import checkpoint  # deferred: loads torch.utils.checkpoint

                x = checkpoint(layer, x, position_embeddings=pe, position_ids=pos, use_reentrant=False)
            else:
                x = layer(x, position_embeddings=pe, position_ids=pos)
        if self.lm_head is not None and self.model.norm is not None:
            x = self.lm_head(self.model.norm(x))
        return x

    def tied_copy(self) -> torch.Tensor | None:
        """The embedding matrix this stage holds as one of two tied copies (first or last stage of a
        pipeline whose model ties them); None when it holds none or both are one parameter."""
        if not self.spec.tied or (self.first and self.last):
            return None
        if self.model.embed_tokens is not None:
            return self.model.embed_tokens.weight
        return self.lm_head.weight if self.lm_head is not None else None


def canonical(name: str, tied: bool) -> str:
    """The name whose value a parameter holds: a tied output layer holds the embedding's."""
    return EMBED if tied and name == HEAD else name


def init_weights(module: nn.Module, spec: ModelSpec, seed: int) -> None:
    """Seeded per parameter name: normal(0, initializer_range) for matrices and embeddings, ones
    for norm scales, zeros for biases (and the padding row), as transformers initialises them."""
    std = float(spec.config.get("initializer_range", 0.02))
    pad = spec.config.get("pad_token_id")
    with torch.no_grad():
        for name, p in module.named_parameters():
            key = canonical(name, spec.tied)
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            if name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                if key == EMBED and isinstance(pad, int) and 0 <= pad < p.shape[0]:
                    p[pad].zero_()


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model folder {folder} holds no .safetensors weights")
    return files


def load_weights(module: nn.Module, spec: ModelSpec, folder: Path) -> None:
    """This stage's tensors (by their Hugging Face names) from a model folder's safetensors; a tied
    output layer missing from the files takes the embedding's."""
    from safetensors import safe_open  # deferred: loads safetensors

    todo = dict(module.named_parameters())
    with torch.no_grad():
        for f in weight_files(folder):
            with safe_open(str(f), framework="pt") as st:
                keys = set(st.keys())
                for name in list(todo):
                    key = next((k for k in (name, canonical(name, spec.tied)) if k in keys), None)
                    if key is None:
                        continue
                    t, p = st.get_tensor(key), todo.pop(name)
                    if tuple(t.shape) != tuple(p.shape):
                        raise ConfigError(
                            f"{f}: {key} has shape {tuple(t.shape)}; the config gives {tuple(p.shape)}"
                        )
                    p.copy_(t.to(p.dtype))
    if todo:
        missing = sorted(todo)
        raise ConfigError(
            f"model folder {folder} lacks {len(missing)} tensor(s) this stage needs, e.g. {missing[0]}"
        )


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, in fp32 (what transformers' causal-LM loss computes)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def build_stage(
    m: ModelSpec, layers: Iterable[int], first: bool, last: bool, *, seed: int = 0,
    recompute: bool = False, device: torch.device | str = "cpu", attention: str = "sdpa",
) -> Stage:  # fmt: skip
    """A stage with its weights: from the source's model folder when it names one, else seeded."""
    st = Stage(m, layers, first, last, recompute=recompute, device=device, attention=attention)
    weights = m.source.get("weights")
    if weights:
        load_weights(st, m, Path(weights))
    else:
        init_weights(st, m, seed)
    return st
