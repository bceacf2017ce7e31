"""The KV layout of one expert's running batch, owned here rather than by transformers' cache classes.

Rows are sequences; columns are time, left-aligned: row b's tokens sit in columns 0..length[b]-1,
so a token's column is its position. Each layer holds a block of fixed capacity,
[rows, kv_heads, capacity, head_dim], and every forward writes its q new columns at each row's own
length (`scatter_`), never concatenating. The capacity grows by doubling when a row would pass it,
so between growths every decode step has the same shapes: that is what lets the compiled decode
step (`engine.compiled`) run without recompiling, and it makes an eager step O(1) in the context
instead of the O(context) copy a concatenating cache pays per layer per step.

The masks for each step are built here from the row lengths and each layer kind's window, so there
is one source of truth for what a query may attend to (an earlier layout patched transformers'
caches, whose sliding layers kept a length counter of their own; the two disagreed after a merge,
the 503 "size of tensor a must match b"). Sliding-window layers keep every column too and the mask
hides what the window excludes: simpler than a ring buffer, at the cost of memory for long prompts
on sliding models (`kv_bytes_per_row` counts it, so the KV budget stays honest).

Prefill feeds every new row the same columns (prompts right-padded to the longest); the padding
columns a short prompt wrote are never visible, because a row's decode writes column length[b]
before any query may see it, and queries see only columns up to their own. Rows join (`merge`) and
leave (`select`) between steps. Why padded blocks and not paged caches: on the CPU and for the
small experts we serve, one batched SDPA call per layer over a padded block is faster than a call
per sequence, and it needs no attention kernel of our own.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

MIN_CAPACITY = 64  # columns: the smallest block a batch starts with
DECODE_ATTENTION = "wallbreak_decode"  # the attention the compiled decode step is traced with
BOOL_MASKS = ("sdpa", DECODE_ATTENTION)  # attention kinds that take boolean masks (others: additive)


def capacity_for(columns: int) -> int:
    """The block width that holds `columns`: a power of two, at least MIN_CAPACITY."""
    cap = MIN_CAPACITY
    while cap < columns:
        cap *= 2
    return cap


def layer_windows(config: Any) -> list[int | None]:
    """Per layer: its sliding window, or None for full attention (transformers' `layer_types`)."""
    n = int(config.num_hidden_layers)
    kinds = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not kinds or not window:
        return [None] * n
    return [int(window) if k == "sliding_attention" else None for k in kinds[:n]]


def head_shape(config: Any) -> tuple[int, int]:
    """(key/value heads, head width) of a transformers config: a block's dims 1 and 3."""
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return kv_heads, head_dim


_KWARGS: dict[type, dict[str, str]] = {}


def forward_kwargs(model: Any) -> dict[str, str]:
    """What this transformers version calls the cache and logits-to-keep arguments of `forward`."""
    kw = _KWARGS.get(type(model))
    if kw is None:
        params = inspect.signature(model.forward).parameters
        kw = {"cache": "cache" if "cache" in params else "past_key_values"}
        if "logits_to_keep" in params:
            kw["logits"] = "logits_to_keep"
        _KWARGS[type(model)] = kw
    return kw


def decode_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a one-token query over grouped key/value heads is
    folded onto those heads ([rows, heads, 1, dim] -> [rows, kv_heads, groups, dim]) even while
    traced. transformers folds it only in eager mode; traced, it expands every block to all heads
    (`repeat_kv`) and copies it, per layer per step. The ahead-of-time step (`engine.aot`) is exported
    with this: int4 SmolLM2, 18.9 -> 11.4 ms per step, the same tokens."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    plain = not kwargs.get("dropout") and all(kwargs.get(k) is None for k in ("position_bias", "softcap"))
    shared_mask = mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1)
    if query.shape[2] != 1 or groups == 1 or not plain or not shared_mask:
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    rows, heads, _, dim = query.shape
    folded = query.reshape(rows, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=kwargs.get("scaling"))
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)


class BlockLayer(CacheLayerMixin):
    """One layer's keys and values, [rows, kv_heads, capacity, head_dim], written in place."""

    is_compileable = False
    is_croppable = False

    def __init__(self, owner: KVCache, window: int | None) -> None:
        super().__init__()
        self.owner = owner
        self.window = window
        self.is_sliding = window is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, cap = key_states.shape[0], self.owner.capacity
        self.keys = key_states.new_zeros((rows, key_states.shape[1], cap, key_states.shape[-1]))
        self.values = value_states.new_zeros((rows, value_states.shape[1], cap, value_states.shape[-1]))
        mark_dynamic(self.keys, self.values)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        idx = self.owner.write_index  # [rows, 1, q, 1]: each row's next q columns
        write_columns(self.keys, idx, key_states)
        write_columns(self.values, idx, value_states)
        width = self.owner.width
        if width is None:  # compiled: the whole block, whose width is symbolic
            return self.keys, self.values
        return self.keys[:, :, :width], self.values[:, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.owner.capacity if self.keys is None else self.keys.shape[2]), 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.numel() * self.keys.element_size() * 2


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def write_columns(block: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> None:
    """block[b, :, index[b, 0, j, 0]] = new[b, :, j]: each row's new columns at its own positions.

    Written through an integer view of the same width, because it is a pure byte move: the CPU's
    scatter into a bf16 tensor upcasts the whole block to fp32 and back (two block-sized copies per
    layer per step: 75 us against 6 us for an [8, 3, 256, 64] block, about 6 ms of a 45 ms int4
    step at 8 rows)."""
    bits = _BITS[block.element_size()]
    where = index.expand(-1, new.shape[1], -1, new.shape[-1])
    block.view(bits).scatter_(2, where, new.to(block.dtype).view(bits))


def mark_dynamic(*blocks: torch.Tensor) -> None:
    """Rows and capacity vary between steps: tell the compiler not to bake them in."""
    for t in blocks:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 2)


class KVCache(Cache):
    """A batch's KV blocks plus the row lengths that its masks and write positions come from."""

    def __init__(self, config: Any, attn_impl: str) -> None:
        self.config = config
        self.windows = layer_windows(config)
        super().__init__(layers=[BlockLayer(self, w) for w in self.windows])
        kinds = getattr(config, "layer_types", None)
        self.kinds: list[str] | None = list(kinds[: len(self.windows)]) if kinds else None
        self.attn_impl = attn_impl
        self.lengths: list[int] = []  # per row: columns holding its tokens (its next write column)
        self.capacity = MIN_CAPACITY
        self.write_index = torch.zeros(0, 1, 1, 1, dtype=torch.long)
        self.width: int | None = None  # columns the attention reads; None: the whole block

    @classmethod
    def for_model(cls, model: Any) -> KVCache:
        """An empty cache for a transformers module (its attention kind decides the masks' form)."""
        return cls(model.config, getattr(model.config, "_attn_implementation", None) or "eager")

    @classmethod
    def over(
        cls, model: Any, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], write_index: torch.Tensor
    ) -> KVCache:
        """A cache whose layers write into the given (keys, values) blocks at `write_index` and
        attend over all of them (the ahead-of-time step, `engine.aot`, is traced over one)."""
        cache = cls.for_model(model)
        cache.capacity = blocks[0][0].shape[2]
        cache.write_index = write_index
        cache._hold(blocks)
        return cache

    def _hold(self, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k, v) in zip(self._layers(), blocks, strict=True):
            layer.keys, layer.values, layer.is_initialized = k, v, True

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every layer's (keys, values), or None before the first forward made them."""
        out = [(layer.keys, layer.values) for layer in self._layers()]
        if any(k is None or v is None for k, v in out):
            return None
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def ensure_blocks(self, model: Any) -> None:
        """Make every layer's empty block now, as the first forward would (in the dtype of the
        model's parameters, which the keys and values come out in), for code that writes into given
        blocks: the compiled prefill."""
        if self.blocks() is not None:
            return
        p = next(model.parameters())
        kv_heads, head_dim = head_shape(model.config)
        empty = torch.empty(self.rows, kv_heads, 0, head_dim, dtype=p.dtype, device=p.device)
        for layer in self._layers():
            layer.lazy_initialization(empty, empty)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._layers()[layer_idx].get_seq_length()

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self._layers())

    def _layers(self) -> list[BlockLayer]:
        return self.layers  # type: ignore[return-value]

    def _blocks(self) -> list[BlockLayer]:
        return [layer for layer in self._layers() if layer.keys is not None and layer.values is not None]

    # -- what the next forward needs --------------------------------------------------------------

    def open_rows(self, rows: int) -> None:
        """Start an empty cache for `rows` new rows (prefill feeds them the same columns)."""
        self.lengths = [0] * rows

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """After a padded prefill: each row's real length (columns past it are never seen)."""
        assert len(lengths) == self.rows
        self.lengths = list(lengths)

    def step_inputs(
        self, q: int, device: torch.device, dtype: torch.dtype, whole: bool = False
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
        """Prepare the next q columns of every row: grow the blocks if needed, set the write
        positions, and return the attention masks (one per layer kind when the model has several)
        and the position ids [rows, q]. `whole`: attend over the whole block (the compiled step,
        whose shapes must not change per step) rather than just the columns in use."""
        self._grow(max(self.lengths) + q)
        qcol = torch.tensor(self.lengths, device=device)[:, None] + torch.arange(q, device=device)
        self.write_index = qcol[:, None, :, None]
        self.width = None if whole else max(self.lengths) + q
        width = self.capacity if whole else max(self.lengths) + q
        if self.kinds is None:
            return self._mask(None, qcol, width, dtype), qcol
        by_kind = dict(zip(self.kinds, self.windows, strict=True))
        return {k: self._mask(w, qcol, width, dtype) for k, w in by_kind.items()}, qcol

    def _mask(self, window: int | None, qcol: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        kcol = torch.arange(width, device=qcol.device)
        allowed = kcol[None, None, :] <= qcol[:, :, None]  # every query sees at least itself
        if window is not None:
            allowed &= qcol[:, :, None] - kcol[None, None, :] < window
        allowed = allowed[:, None]  # [rows, 1, q, keys]
        if self.attn_impl in BOOL_MASKS:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=qcol.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )

    def advance(self, q: int) -> None:
        self.lengths = [n + q for n in self.lengths]

    def _grow(self, columns: int) -> None:
        if columns <= self.capacity:
            return
        self._resize(capacity_for(columns))

    # Blocks are always made under inference mode, as the forward makes them: a block made outside it
    # carries another dispatch key, and the compiled step would recompile for it.

    @torch.inference_mode()
    def _resize(self, capacity: int) -> None:
        for layer in self._blocks():
            assert layer.keys is not None and layer.values is not None
            layer.keys, layer.values = _fit(layer.keys, capacity), _fit(layer.values, capacity)
            mark_dynamic(layer.keys, layer.values)
        self.capacity = capacity

    # -- rows joining and leaving -------------------------------------------------------------------

    @torch.inference_mode()
    def merge(self, other: KVCache) -> None:
        """Append `other`'s rows (both blocks widened to the larger capacity)."""
        if not self.rows:
            self.lengths, self.capacity = list(other.lengths), other.capacity
            for mine, theirs in zip(self._layers(), other._layers(), strict=True):
                mine.keys, mine.values, mine.is_initialized = (
                    theirs.keys,
                    theirs.values,
                    theirs.is_initialized,
                )
            return
        cap = max(self.capacity, other.capacity)
        self._resize(cap)
        other._resize(cap)
        for a, b in zip(self._blocks(), other._blocks(), strict=True):
            assert a.keys is not None and a.values is not None and b.keys is not None and b.values is not None
            a.keys, a.values = torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values])
            mark_dynamic(a.keys, a.values)
        self.lengths += other.lengths

    @torch.inference_mode()
    def row_views(self, sizes: Sequence[int], q: int = 1) -> list[KVCache]:
        """Caches over consecutive runs of this cache's rows, `sizes` rows each, sharing its blocks:
        what a step writes through one lands here. The blocks are grown for `q` more columns first,
        so no view ever resizes (that would leave this cache's blocks behind). This cache's
        lengths stay as they are: `advance` it once every view has run."""
        if sum(sizes) != self.rows or min(sizes, default=0) < 1:
            raise ValueError(f"row views of {list(sizes)} rows do not split a cache of {self.rows}")
        self._grow(max(self.lengths) + q)
        blocks = self.blocks()
        if blocks is None:
            raise ValueError("a cache has no rows to view before its first forward")
        views, start = [], 0
        for n in sizes:
            view = KVCache(self.config, self.attn_impl)
            view.lengths, view.capacity = self.lengths[start : start + n], self.capacity
            view._hold([(k[start : start + n], v[start : start + n]) for k, v in blocks])
            views.append(view)
            start += n
        return views

    @torch.inference_mode()
    def copy_rows(self, keep: Sequence[int]) -> KVCache:
        """A new cache holding copies of these rows (this one is left as it is)."""
        out = KVCache(self.config, self.attn_impl)
        out.lengths, out.capacity = [self.lengths[i] for i in keep], self.capacity
        for mine, theirs in zip(self._layers(), out._layers(), strict=True):
            if mine.keys is not None and mine.values is not None:
                rows = torch.tensor(list(keep), device=mine.keys.device)
                theirs.keys = mine.keys.index_select(0, rows)
                theirs.values = mine.values.index_select(0, rows)
                theirs.is_initialized = True
                mark_dynamic(theirs.keys, theirs.values)
        return out

    @torch.inference_mode()
    def select(self, keep: Sequence[int]) -> None:
        """Keep only these rows; shrink the blocks when the longest remaining row needs a quarter."""
        if not keep:
            self.lengths, self.capacity = [], MIN_CAPACITY
            for layer in self._layers():
                layer.keys = layer.values = None
                layer.is_initialized = False
            return
        self.lengths = [self.lengths[i] for i in keep]
        for layer in self._blocks():
            assert layer.keys is not None and layer.values is not None
            rows = torch.tensor(list(keep), device=layer.keys.device)
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
            mark_dynamic(layer.keys, layer.values)
        need = capacity_for(max(self.lengths) + 1)
        if need * 4 <= self.capacity:
            self._resize(need * 2)


def _fit(t: torch.Tensor, columns: int) -> torch.Tensor:
    """A [rows, heads, columns, dim] block cut or zero-padded on the right to `columns`."""
    if t.shape[2] >= columns:
        return t[:, :, :columns].contiguous()
    return F.pad(t, (0, 0, 0, columns - t.shape[2]))
