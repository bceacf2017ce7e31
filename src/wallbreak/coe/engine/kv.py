"""The KV layout of one expert's running batch, owned here rather than by transformers' cache classes.

Rows are sequences; columns are one shared time axis, right-aligned: every row's tokens occupy the
last columns, and row b's first real token sits at column `start[b]` (left padding before it).
Full-attention layers hold every column; sliding-window layers hold only the last `window - 1`
columns, which is all a future query can see. Rows join (`merge`) and leave (`select`) between
steps, and the masks for each step are built here from `start`, the column count and each layer
kind's window, so there is one source of truth for what a query may attend to. That is what the
earlier layout lacked: it patched transformers' caches, whose sliding layers keep a length counter
of their own, and the two disagreed after a merge (the 503 "size of tensor a must match b").

Why padding and not per-sequence or paged caches: on the CPU and for the small experts we serve,
one batched SDPA call per layer over a padded block is faster than a call per sequence, and it
needs no attention kernel of our own. Its cost is padding when lengths differ: rows are padded up
to the longest row in the batch (memory and attention work ~ rows x longest), which the engine
bounds with a KV budget per batch (it stops admitting before the block would pass it), and the
leading all-padding columns are trimmed whenever a long row leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin


class PaddedLayer(CacheLayerMixin):
    """One layer's keys and values, [rows, kv_heads, columns, head_dim], right-aligned in time."""

    is_compileable = False
    is_croppable = False

    def __init__(self, window: int | None) -> None:
        super().__init__()
        self.window = window
        self.is_sliding = window is not None

    def keep(self, columns: int) -> int:
        """How many of the last `columns` time columns this layer stores."""
        return columns if self.window is None else min(columns, self.window - 1)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (*key_states.shape[:2], 0, key_states.shape[-1])
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        n = self.keep(keys.shape[-2])
        self.keys, self.values = keys[:, :, keys.shape[-2] - n :], values[:, :, values.shape[-2] - n :]
        return keys, values  # this step's queries see every column they may need

    def stored(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored() + query_length, 0

    def get_seq_length(self) -> int:
        return self.stored()

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window - 1

    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.numel() * self.keys.element_size() * 2


def layer_windows(config: Any) -> list[int | None]:
    """Per layer: its sliding window, or None for full attention (transformers' `layer_types`)."""
    n = int(config.num_hidden_layers)
    kinds = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not kinds or not window:
        return [None] * n
    return [int(window) if k == "sliding_attention" else None for k in kinds[:n]]


class KVCache(Cache):
    """A batch's KV cache plus the row geometry (`start`, `columns`) that its masks come from."""

    def __init__(self, config: Any, attn_impl: str) -> None:
        self.windows = layer_windows(config)
        super().__init__(layers=[PaddedLayer(w) for w in self.windows])
        kinds = getattr(config, "layer_types", None)
        self.kinds: list[str] | None = list(kinds[: len(self.windows)]) if kinds else None
        self.attn_impl = attn_impl
        self.columns = 0  # time columns seen so far (the width of a full-attention layer)
        self.start: list[int] = []  # per row: its first real column

    @property
    def rows(self) -> int:
        return len(self.start)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self._layers())

    def _layers(self) -> list[PaddedLayer]:
        return self.layers  # type: ignore[return-value]

    # -- what the next forward needs --------------------------------------------------------------

    def open_rows(self, lengths: Sequence[int]) -> None:
        """Start an empty cache for new rows of these prompt lengths, right-aligned to the longest."""
        width = max(lengths)
        self.start = [width - n for n in lengths]

    def step_inputs(
        self, q: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
        """For the next q columns: the attention masks (one per layer kind when the model has
        several) and the position ids [rows, q] (each row counts from its own first token)."""
        start = torch.tensor(self.start, device=device)
        qcol = torch.arange(self.columns, self.columns + q, device=device)
        positions = (qcol[None, :] - start[:, None]).clamp(min=0)
        if self.kinds is None:
            return self._mask(None, qcol, start, dtype), positions
        by_kind = dict(zip(self.kinds, self.windows, strict=True))
        return {k: self._mask(w, qcol, start, dtype) for k, w in by_kind.items()}, positions

    def _mask(
        self, window: int | None, qcol: torch.Tensor, start: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        stored = self.columns if window is None else min(self.columns, window - 1)
        kcol = torch.arange(self.columns - stored, self.columns + qcol.numel(), device=qcol.device)
        allowed = (kcol[None, None, :] >= start[:, None, None]) & (kcol[None, None, :] <= qcol[None, :, None])
        if window is not None:
            allowed &= qcol[None, :, None] - kcol[None, None, :] < window
        # A padding query sees itself, so no row of the softmax is empty (an empty one gives NaN,
        # and NaN in a padding column's values would leak into real rows through 0 * NaN).
        allowed |= kcol[None, None, :] == qcol[None, :, None]
        allowed = allowed[:, None]  # [rows, 1, q, keys]
        if self.attn_impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=qcol.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )

    def advance(self, q: int) -> None:
        self.columns += q

    # -- rows joining and leaving -------------------------------------------------------------------

    def merge(self, other: KVCache) -> None:
        """Append `other`'s rows, right-aligning both blocks on one time axis (left padding)."""
        if not self.rows:
            self.columns, self.start = other.columns, list(other.start)
            for mine, theirs in zip(self._layers(), other._layers(), strict=True):
                mine.keys, mine.values, mine.is_initialized = (
                    theirs.keys,
                    theirs.values,
                    theirs.is_initialized,
                )
            return
        width = max(self.columns, other.columns)
        shift_a, shift_b = width - self.columns, width - other.columns
        for a, b in zip(self._layers(), other._layers(), strict=True):
            n = a.keep(width)
            assert a.keys is not None and a.values is not None and b.keys is not None and b.values is not None
            a.keys = torch.cat([_pad_left(a.keys, n), _pad_left(b.keys, n)])
            a.values = torch.cat([_pad_left(a.values, n), _pad_left(b.values, n)])
        self.start = [s + shift_a for s in self.start] + [s + shift_b for s in other.start]
        self.columns = width

    def select(self, keep: Sequence[int]) -> None:
        """Keep only these rows, and trim the columns that are padding in every remaining row."""
        if not keep:
            self.start, self.columns = [], 0
            for layer in self._layers():
                layer.keys = layer.values = None
                layer.is_initialized = False
            return
        start = [self.start[i] for i in keep]
        lead = min(start)
        width = self.columns - lead
        idx = torch.tensor(list(keep))
        for layer in self._layers():
            if layer.keys is None or layer.values is None:
                continue
            n = layer.keep(width)
            rows = idx.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, rows)[:, :, layer.keys.shape[-2] - n :]
            layer.values = layer.values.index_select(0, rows)[:, :, layer.values.shape[-2] - n :]
        self.start = [s - lead for s in start]
        self.columns = width


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero columns on the left of a [rows, heads, columns, dim] block until it has n columns."""
    return F.pad(t, (0, 0, n - t.shape[-2], 0))
