"""The transformers module of an architecture, built from a manifest's config with no weights of its
own: the tiers bind it to a slot's bytes, the compact forms classify its linears on the meta device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from wallbreak.errors import BundleError


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip random init of weights we are about to overwrite (a 10x faster skeleton build)."""
    try:
        from transformers.initialization import no_init_weights  # deferred: loads transformers
    except ImportError:  # transformers 4.x kept it here
        try:
            from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]  # deferred: loads transformers
        except ImportError:
            yield
            return
    with no_init_weights():
        yield


def skeleton_on(
    model_type: str, config: dict[str, Any], device: torch.device, dtype: torch.dtype, name: str
) -> nn.Module:
    """The transformers module for an architecture, on `device`, weights uninitialised."""
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: loads transformers

    cfg = dict(config)
    cfg.pop("model_type", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise BundleError(
            f"expert {name!r}: architecture {model_type!r} is unknown to this transformers: {e}"
        ) from None
    with _no_init(), torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    return model
