"""Compact experts: weight-only int8 and int4, stored in the bundle and run by torch's own kernels.

One owner for the compact formats: how weights are quantized at import, how they are laid out in a
blob, which modules of the skeleton become quantized ones at load, and which kernel runs them.

- **int8**: every linear weight and the input embedding are int8 with one bf16 scale per output row
  (`w = q * scale`). Linear layers run `aten._weight_int8pack_mm`; the embedding gathers rows and
  scales them. A tied LM head reads the embedding's own int8 table, so nothing is stored twice.
- **int4**: every linear weight whose input width divides into groups of `INT4_GROUP` is 4-bit,
  asymmetric per group (`w = (q - 8) * scale + zero`, bf16 scale and zero per group and row),
  stored already packed in the layout `aten._convert_weight_to_int4pack_for_cpu` produces, so a
  switch is a plain copy and `aten._weight_int4pack_mm_for_cpu` reads the slot's bytes directly. The
  embedding is int8 as above (a gather needs whole rows); a tied LM head gets its own int4 copy.
  The packing is torch's, so the bundle records a fingerprint of it and a torch that packs
  differently is refused with a clear message instead of producing garbage.

Everything else (norms, biases) is bf16, and activations are bf16: that is what both kernels take on
the CPU (with fp32 activations the int8 kernel is ~5x slower than the fp32 matmul here).
Measured on a 2-core x86 CPU (AVX-512), one token through SmolLM2's 49152 x 576 LM head: fp32 11.9 ms, bf16
6.4 ms, int8 2.9 ms, int4 0.9 ms (`aten` calls, 200 repeats).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wallbreak.coe.bundle.skeleton import skeleton_on
from wallbreak.errors import BundleError, ConfigError

FORMS = ("int8", "int4")
COMPUTE_DTYPE = torch.bfloat16
INT4_GROUP = 32
SCALE = "weight_scale"  # int8: [rows] bf16
SCALES_ZEROS = "weight_sz"  # int4: [in // group, rows, 2] bf16, as the int4 kernel takes them
ATEN: Any = torch.ops.aten


def int4_layout() -> str:
    """A fingerprint of how this torch packs int4 for its CPU kernel (a fixed probe, hashed)."""
    probe = (torch.arange(64 * 64, dtype=torch.int32).view(64, 64) * 7) % 16
    packed = ATEN._convert_weight_to_int4pack_for_cpu(probe, 2)
    return "cpu-int4pack-" + hashlib.sha256(packed.numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Quantizing (at import)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per row: (int8 [rows, cols], bf16 scale [rows])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(COMPUTE_DTYPE)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per group: packed uint8 [rows, cols / 2], bf16 scales and zeros [cols / group, rows, 2]."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(rows, cols)
    zero = lo + 8 * scale  # so that (q - 8) * scale + zero == q * scale + lo
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)
    return ATEN._convert_weight_to_int4pack_for_cpu(q, 2), sz


def _classify(model_type: str, config: dict[str, Any]) -> tuple[set[str], str | None, bool]:
    """(names of linear weights, name of the input embedding weight, whether the head is tied)."""
    model: Any = skeleton_on(model_type, config, torch.device("meta"), torch.float32, name=model_type)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    emb = model.get_input_embeddings()
    emb_name = next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return linear, emb_name, tied


def compact_tensors(
    model_type: str, config: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]], form: str
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Any]]:
    """The expert's tensors in `form`, in blob order, and the quant record its manifest entry keeps."""
    if form not in FORMS:
        raise ConfigError(f"unknown compact form {form!r}; use {', '.join(FORMS)}")
    linear, emb_name, tied = _classify(model_type, config)
    out: list[tuple[str, torch.Tensor]] = []
    stored: set[tuple[int, int]] = set()
    head_source = None
    for name, t in tensors:
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if t.numel() and key in stored:
            continue  # a tied weight (the head): stored once, below or through the embedding table
        stored.add(key)
        t = t.detach().to("cpu")
        if name == emb_name:
            q, s = quantize_int8(t)
            out += [(name, q), (name[: -len("weight")] + SCALE, s)]
            head_source = t
        elif name in linear and t.dim() == 2:
            out += _quantize_linear(name, t, form)
        elif t.is_floating_point():
            out.append((name, t.to(COMPUTE_DTYPE)))
        else:
            out.append((name, t))
    if tied and form == "int4" and head_source is not None and all(n != "lm_head.weight" for n, _ in out):
        out += _quantize_linear("lm_head.weight", head_source, form)  # the int8 table serves int8 heads
    quant: dict[str, Any] = {"form": form, "int8": "per-row"}
    if form == "int4":
        quant |= {"group": INT4_GROUP, "layout": int4_layout()}
    return out, quant


def _quantize_linear(name: str, w: torch.Tensor, form: str) -> list[tuple[str, torch.Tensor]]:
    stem = name[: -len("weight")]
    if form == "int4" and w.shape[1] % INT4_GROUP == 0:
        packed, sz = quantize_int4(w)
        return [(name, packed), (stem + SCALES_ZEROS, sz)]
    q, s = quantize_int8(w)  # int4 falls back to int8 for widths the groups do not divide
    return [(name, q), (stem + SCALE, s)]


# ----------------------------------------------------------------------------------------------
# Dense matmuls for the compiled prefill

INT4_BLOCK = 64  # output rows per block in torch's CPU int4 packing (see `unpack_int4`)
_dense = False  # set while the compiled prefill is traced (`dequantized_matmuls`)


def form_of(model: nn.Module) -> str | None:
    """A loaded expert's compact form (int4 where any layer is, as a bundle's int4 expert keeps
    int8 layers where groups do not fit), or None for a float one."""
    kinds = {m.kind for m in model.modules() if isinstance(m, QuantLinear)}
    return "int4" if "int4" in kinds else ("int8" if kinds else None)


@contextlib.contextmanager
def dequantized_matmuls() -> Iterator[None]:
    """While this is open, compact linear layers over more than one row dequantize their weight to
    bf16 and run a dense matmul instead of torch's compact kernel. Only worth it where a compiler
    fuses the dequantization into one pass per weight: the ahead-of-time prefill (`engine.aot`) is
    traced under this. At a 512-token prefill of SmolLM2 on a 2-core x86 CPU, the int4 kernel took 78% of
    the forward; one MLP weight at 512 rows took 5.4 ms through it, 2.1 ms as a bf16 matmul.
    Eagerly, the dequantization's own passes ate the gain (596 against 533 tokens/s at 512, a loss
    below 256 tokens), so eager serving keeps the kernels."""
    global _dense
    int4_unpacks()  # probed now, on real tensors: a tracer could not compare its fake ones
    before, _dense = _dense, True
    try:
        yield
    finally:
        _dense = before


def unpack_int4(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The 4-bit values [rows, cols] (0..15) of a weight packed by torch's CPU int4 packing: blocks
    of 64 output rows, [rows / 64, cols, 32] bytes, the low nibble holding row j of its block and the
    high nibble row j + 32. Written with indexing rather than a concatenation, so a compiler fuses it
    with the scaling into one pass. `int4_unpacks` checks this layout against this torch."""
    block = torch.arange(INT4_BLOCK, device=packed.device)  # a row's place in its block
    half = INT4_BLOCK // 2
    byte = packed.view(rows // INT4_BLOCK, cols, half)[:, :, block % half]
    nibble = (byte >> ((block >= half).to(torch.uint8) * 4)) & 0xF  # [rows / 64, cols, 64]
    return nibble.transpose(1, 2).reshape(rows, cols)


@functools.cache
def int4_unpacks() -> bool:
    """Whether `unpack_int4` reads this torch's packing (a fixed probe, packed and read back)."""
    probe = (torch.arange(2 * INT4_BLOCK * 64, dtype=torch.int32).view(2 * INT4_BLOCK, 64) * 7) % 16
    packed = ATEN._convert_weight_to_int4pack_for_cpu(probe, 2)
    if packed.dtype != torch.uint8 or packed.numel() * 2 != probe.numel():
        return False
    return torch.equal(unpack_int4(packed, *probe.shape).to(torch.int32), probe)


# ----------------------------------------------------------------------------------------------
# Running (at load)


class QuantLinear(nn.Module):
    """A linear layer whose weight stays in its compact bytes; buffers are bound into the slot."""

    def __init__(self, src: nn.Linear, kind: str, group: int, table: nn.Module | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = src.in_features, src.out_features
        self.kind, self.group = kind, group
        self.table = table  # a tied head: read the embedding's int8 table instead of buffers of its own
        n, k = self.out_features, self.in_features
        if table is None:
            if kind == "int8":
                self.register_buffer("weight", torch.empty(n, k, dtype=torch.int8, device="meta"))
                self.register_buffer(SCALE, torch.empty(n, dtype=COMPUTE_DTYPE, device="meta"))
            else:
                self.register_buffer("weight", torch.empty(n, k // 2, dtype=torch.uint8, device="meta"))
                self.register_buffer(
                    SCALES_ZEROS, torch.empty(k // group, n, 2, dtype=COMPUTE_DTYPE, device="meta")
                )
        self.bias = src.bias

    def dequantized(self) -> torch.Tensor:
        """The float weight [out, in] this layer computes with (for checks and reference runs)."""
        src = self.table if self.table is not None else self
        w: torch.Tensor = src.weight  # type: ignore[assignment]
        if self.kind == "int8":
            return w.float() * getattr(src, SCALE).float()[:, None]
        eye = torch.eye(self.in_features, dtype=COMPUTE_DTYPE, device=w.device)
        return ATEN._weight_int4pack_mm_for_cpu(eye, w, self.group, getattr(src, SCALES_ZEROS)).float().T

    def dense_product(self, x2: torch.Tensor) -> torch.Tensor | None:
        """x2 [rows, in] times the weight, through a bf16 matmul over the weight read from its
        compact bytes (`dequantized_matmuls`); None where this layer's layout has no such reading."""
        src = self.table if self.table is not None else self
        w: torch.Tensor = src.weight  # type: ignore[assignment]
        if self.kind == "int8":
            # int8 values are exact in bf16: scaling the product, not the weight, rounds once less
            return F.linear(x2, w.to(COMPUTE_DTYPE)) * getattr(src, SCALE)
        n, k = self.out_features, self.in_features
        if n % INT4_BLOCK or not int4_unpacks():
            return None
        sz = getattr(src, SCALES_ZEROS)  # [k / group, n, 2]: w = (q - 8) * scale + zero
        q = unpack_int4(w, n, k).to(COMPUTE_DTYPE).view(n, k // self.group, self.group)
        return F.linear(x2, ((q - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(n, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        no_kernel = self.kind == "int8" and x2.device.type != "cpu"  # no int8 kernel assumed off the CPU
        y = self.dense_product(x2) if no_kernel or (_dense and x2.shape[0] > 1) else None
        if y is None:
            src = self.table if self.table is not None else self
            w: torch.Tensor = src.weight  # type: ignore[assignment]
            if self.kind == "int4":
                y = ATEN._weight_int4pack_mm_for_cpu(x2, w, self.group, getattr(src, SCALES_ZEROS))
            else:
                y = ATEN._weight_int8pack_mm(x2, w, getattr(src, SCALE))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class QuantEmbedding(nn.Module):
    """An int8 embedding table with a scale per row (and the model's own embedding multiplier)."""

    def __init__(self, src: nn.Embedding) -> None:
        super().__init__()
        self.padding_idx = src.padding_idx
        n, d = src.num_embeddings, src.embedding_dim
        self.register_buffer("weight", torch.empty(n, d, dtype=torch.int8, device="meta"))
        self.register_buffer(SCALE, torch.empty(n, dtype=COMPUTE_DTYPE, device="meta"))
        es = getattr(src, "scalar_embed_scale", getattr(src, "embed_scale", None))  # Gemma: sqrt(hidden)
        self.multiplier = float(es) if es is not None else 1.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale: torch.Tensor = getattr(self, SCALE)
        table: torch.Tensor = self._buffers["weight"]  # type: ignore[assignment]
        rows = F.embedding(ids, table).to(COMPUTE_DTYPE) * scale[ids].unsqueeze(-1)
        return rows * self.multiplier if self.multiplier != 1.0 else rows


def make_compact(model: Any, entry: Any, device: torch.device) -> None:
    """Swap the skeleton's linear and embedding modules for the compact ones the entry's tensors name."""
    quant = entry.quant or {}
    stored = {t.name: t.dtype for t in entry.tensors}
    if quant.get("form") == "int4":
        if device.type != "cpu":
            raise BundleError(
                f"expert {entry.name!r} is int4, which runs on the CPU kernel in this version; "
                "re-import it as int8 or bf16 for a CUDA device"
            )
        if quant.get("layout") != int4_layout():
            raise BundleError(
                f"expert {entry.name!r}: its int4 weights were packed by a torch whose CPU layout differs "
                f"from this torch {torch.__version__}'s; re-import the expert with this torch"
            )
    emb = model.get_input_embeddings()
    table = None
    for name, mod in list(model.named_modules()):
        kind = {"int8": "int8", "uint8": "int4"}.get(stored.get(f"{name}.weight", ""))
        if mod is emb and kind == "int8":
            table = QuantEmbedding(mod)
            _replace(model, name, table)
        elif isinstance(mod, nn.Linear) and kind is not None:
            _replace(model, name, QuantLinear(mod, kind, int(quant.get("group", 0))))
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and table is not None and "lm_head.weight" not in stored:
        _replace(model, "lm_head", QuantLinear(head, "int8", 0, table=table))  # tied: read the table


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
