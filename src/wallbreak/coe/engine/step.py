"""One forward of a transformers module over a batch's KV blocks: the one function eager, dynamo and
ahead-of-time steps all call (`decode_logits`), the masks and positions it is given, and the logits
kept (`forward`, `run_step`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from wallbreak.coe.engine.kv import KVCache, forward_kwargs


def decode_logits(
    model: nn.Module, ids: torch.Tensor, masks: Any, positions: torch.Tensor, kw: dict[str, Any]
) -> Any:
    return model(input_ids=ids, attention_mask=masks, position_ids=positions, use_cache=True, **kw).logits


def marked_inputs(
    cache: KVCache, ids: torch.Tensor, dtype: torch.dtype, whole: bool
) -> tuple[Any, torch.Tensor]:
    """The masks and positions of the next ids [rows, q]; rows (and with `whole`, columns) marked
    dynamic for the compiler (a no-op when eager)."""
    masks, positions = cache.step_inputs(ids.shape[1], ids.device, dtype, whole=whole)
    for t in [ids, positions, *(masks.values() if isinstance(masks, dict) else [masks])]:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    for m in masks.values() if isinstance(masks, dict) else [masks]:
        torch._dynamo.maybe_mark_dynamic(m, 3)
    return masks, positions


def forward(
    model: nn.Module, ids: torch.Tensor, cache: KVCache, fn: Any = None, keep: Sequence[int] = (-1,)
) -> torch.Tensor:
    """Feed ids [rows, q] at each row's next columns through `fn` (None: eager); the logits at
    columns `keep` of these q, [rows, len(keep), vocab] (never a prompt x vocabulary tensor where
    the model can keep only what is asked)."""
    names = forward_kwargs(model)
    q = ids.shape[1]
    rel = [k % q for k in keep]
    kw: dict[str, Any] = {names["cache"]: cache}
    if "logits" in names:
        kw[names["logits"]] = 1 if rel == [q - 1] else torch.tensor(rel, device=ids.device)
    masks, positions = marked_inputs(cache, ids, next(model.parameters()).dtype, whole=fn is not None)
    with torch.inference_mode():
        logits = (fn or decode_logits)(model, ids, masks, positions, kw)
    cache.advance(q)
    return logits if "logits" in names else logits[:, rel]


def run_step(model: nn.Module, ids: torch.Tensor, cache: KVCache, fn: Any) -> torch.Tensor:
    """One decode step: ids [rows, 1] through `fn` (None: eager); logits [rows, vocab]."""
    return forward(model, ids, cache, fn)[:, -1]
