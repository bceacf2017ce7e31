"""How one row's next token is chosen from its logits: the grammar's mask, logit_bias, penalties,
temperature, top_k, top_p, min_p, then a seeded draw; and the log-probabilities OpenAI reports
(before any of that, as the model gave them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wallbreak.coe.engine.request import SamplingParams, TokenLogprob


@dataclass
class Penalties:
    """What the penalties of one row need: how often each id was generated (presence, frequency),
    and which ids were seen in prompt or output (repetition). Kept only for rows that use them."""

    counts: torch.Tensor  # float32 [vocab]
    seen: torch.Tensor  # bool [vocab]

    @classmethod
    def start(cls, vocab: int, prompt: Sequence[int]) -> Penalties:
        seen = torch.zeros(vocab, dtype=torch.bool)
        ids = torch.tensor([t for t in prompt if 0 <= t < vocab], dtype=torch.long)
        seen[ids] = True
        return cls(torch.zeros(vocab), seen)

    def add(self, token: int) -> None:
        if 0 <= token < self.counts.shape[0]:
            self.counts[token] += 1
            self.seen[token] = True


def shaped(
    logits: torch.Tensor, p: SamplingParams, pen: Penalties | None, allowed: torch.Tensor | None
) -> torch.Tensor:
    """The row's logits, float32 on the host, after the mask, logit_bias and penalties (not temperature)."""
    x = logits.float().cpu().clone()
    if allowed is not None:
        x.masked_fill_(~allowed, float("-inf"))
    for token, bias in p.logit_bias:
        if token < x.shape[0]:
            x[token] += bias
    if pen is not None:
        if p.repetition_penalty != 1.0:
            rp = p.repetition_penalty
            x = torch.where(pen.seen, torch.where(x > 0, x / rp, x * rp), x)
        if p.frequency_penalty or p.presence_penalty:
            x -= pen.counts * p.frequency_penalty + (pen.counts > 0).float() * p.presence_penalty
    return x


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0 (or one too small to divide by, or top_k 1); otherwise temperature,
    top_k, nucleus (top_p), min_p, then a seeded draw."""
    if p.greedy:
        return int(logits.argmax())
    # On the host: the seeded generator lives there, and one vocabulary-sized vector is cheap to move.
    x = logits.float().cpu() / p.temperature
    if 0 < p.top_k < x.shape[0]:
        kth = x.topk(p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = F.softmax(x, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=gen))


def logprob_of(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The model's log-probability of `token` (before temperature, as OpenAI reports) and the top k."""
    lp = F.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        vals, idx = lp.topk(k)
        top = tuple((int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token, float(lp[token]), top)


def prompt_logprobs(logits: torch.Tensor, following: torch.Tensor, k: int) -> list[TokenLogprob]:
    """For one chunk of a prompt: logits [q, vocab] at q positions, and the ids that follow each
    [q]; each following id's log-probability and the top k there. One chunk at a time, so no
    prompt x vocabulary tensor is ever whole."""
    lp = F.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, following[:, None]).squeeze(1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(chosen)
    if k > 0:
        vals, idx = lp.topk(k, dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]
    return [
        TokenLogprob(int(t), float(c), top)
        for t, c, top in zip(following.tolist(), chosen, tops, strict=True)
    ]
