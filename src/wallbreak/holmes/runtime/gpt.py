"""A GPT-style decoder that knows nothing of parallelism.

Every part is initialised from its own seed (embedding, each layer, the head), so a pipeline stage
can build just its layers and still hold exactly the weights a single-process model of the same
seed holds: that is what makes a distributed run comparable, bit for bit, with one process.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wallbreak.errors import ConfigError


@dataclass(frozen=True)
class GPTConfig:
    vocab: int
    layers: int
    hidden: int
    heads: int
    seq_len: int

    def __post_init__(self) -> None:
        for name in ("vocab", "layers", "hidden", "heads", "seq_len"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ConfigError(f"model hidden {self.hidden} must be divisible by heads {self.heads}")


class Block(nn.Module):
    # q, k and v are separate projections so that a column split of each gives whole heads
    # (what tensor parallelism applied from outside needs); the forward works with whatever
    # number of heads its projections hold.
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.head_dim = c.hidden // c.heads
        self.ln1 = nn.LayerNorm(c.hidden)
        self.q = nn.Linear(c.hidden, c.hidden)
        self.k = nn.Linear(c.hidden, c.hidden)
        self.v = nn.Linear(c.hidden, c.hidden)
        self.proj = nn.Linear(c.hidden, c.hidden)
        self.ln2 = nn.LayerNorm(c.hidden)
        self.fc = nn.Linear(c.hidden, 4 * c.hidden)
        self.out = nn.Linear(4 * c.hidden, c.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        y = self.ln1(x)
        q, k, v = (p(y) for p in (self.q, self.k, self.v))
        q, k, v = (z.reshape(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Embedding(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(c.vocab, c.hidden)
        self.pos = nn.Embedding(c.seq_len, c.hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))


class Head(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c.hidden)
        self.proj = nn.Linear(c.hidden, c.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln(x))


def _seeded(seed: int, build: type[nn.Module], c: GPTConfig) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = build(c)
        for name, p in m.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
    return m


class GPT(nn.Module):
    """Layers `layers` (default: all) of the model; with `first`/`last` the embedding and the head."""

    def __init__(
        self,
        c: GPTConfig,
        seed: int = 0,
        layers: Iterable[int] | None = None,
        first: bool = True,
        last: bool = True,
    ) -> None:
        super().__init__()
        self.config = c
        idx = list(range(c.layers) if layers is None else layers)
        self.layer_ids = idx
        self.embed = _seeded(seed * 1000 + 1, Embedding, c) if first else None
        self.blocks = nn.ModuleList([_seeded(seed * 1000 + 10 + i, Block, c) for i in idx])
        self.head = _seeded(seed * 1000 + 2, Head, c) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; hidden states or logits (last stage) out."""
        if self.embed is not None:
            x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        if self.head is not None:
            x = self.head(x)
        return x


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
