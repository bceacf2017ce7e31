"""One expert's running batch: a shared KV cache, continuous admission, sampling, stop handling.

Requests join between decode steps: a new request is prefilled alone, and its KV cache is merged
into the batch's by left-padding the shorter side along the sequence axis; the attention mask
hides the padding and explicit position ids keep each sequence's positions its own. Finished or
cancelled requests leave by selecting the remaining rows, and all-padding columns at the left are
trimmed, so a batch's memory follows its live requests.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wallbreak.coe.engine.request import Event, Request, SamplingParams


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise temperature, nucleus (top_p), then a seeded draw."""
    if p.temperature <= 0:
        return int(logits.argmax())
    # On the host: the seeded generator lives there, and one vocabulary-sized vector is cheap to move.
    probs = F.softmax(logits.float().cpu() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@dataclass
class Seq:
    req: Request
    pos: int  # position id of the next token fed to the model
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    gen: torch.Generator | None = None


class Batch:
    def __init__(self, expert: str, tokenizer: Any, eos_ids: set[int], context: int) -> None:
        self.expert = expert
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context = context
        self.seqs: list[Seq] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 = real token
        self.next: list[int] = []  # the token each sequence feeds next
        self._cache_kw: str | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    # -- model calls --------------------------------------------------------------------------

    def _forward(self, model: nn.Module, ids: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, Any]:
        if self._cache_kw is None:
            params = inspect.signature(model.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
        if "cache" in kw:
            kw[self._cache_kw] = kw.pop("cache")
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, **kw)
        cache = out.get("cache", None)
        if cache is None:
            cache = out.get("past_key_values", None)
        return out.logits[:, -1], cache

    def admit(self, model: nn.Module, reqs: Sequence[Request]) -> None:
        """Prefill the new requests together (left-padded to one length) and merge them in."""
        device = next(model.parameters()).device
        live = []
        for req in reqs:
            if req.cancelled.is_set():
                req.emit(Event(finish_reason="cancelled"))
            else:
                live.append(req)
        if not live:
            return
        t = max(len(r.prompt_ids) for r in live)
        ids = torch.zeros(len(live), t, dtype=torch.long, device=device)
        mask = torch.zeros(len(live), t, dtype=torch.long, device=device)
        for i, r in enumerate(live):
            n = len(r.prompt_ids)
            ids[i, t - n :] = torch.tensor(r.prompt_ids, device=device)
            mask[i, t - n :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(model, ids, attention_mask=mask, position_ids=pos)
        self._merge(cache, mask)
        for i, req in enumerate(live):
            gen = None
            if req.params.seed is not None:
                gen = torch.Generator(device="cpu").manual_seed(req.params.seed)
            self.seqs.append(Seq(req, pos=len(req.prompt_ids), gen=gen))
            self.next.append(-1)
            self._take(len(self.seqs) - 1, logits[i])
        self._drop_finished()

    def step(self, model: nn.Module) -> int:
        """One decode step for every live sequence; returns how many tokens were produced."""
        self._drop_finished()
        if not self.seqs:
            return 0
        assert self.mask is not None
        device = self.mask.device
        ids = torch.tensor(self.next, device=device)[:, None]
        self.mask = torch.cat(
            [self.mask, torch.ones(len(self.seqs), 1, dtype=self.mask.dtype, device=device)], 1
        )
        pos = torch.tensor([s.pos for s in self.seqs], device=device)[:, None]
        logits, self.cache = self._forward(
            model, ids, cache=self.cache, attention_mask=self.mask, position_ids=pos
        )
        n = len(self.seqs)
        for i in range(n):
            self.seqs[i].pos += 1
            self._take(i, logits[i])
        self._drop_finished()
        return n

    # -- bookkeeping --------------------------------------------------------------------------

    def _layers(self, cache: Any) -> list[Any]:
        return list(cache.layers)

    def _merge(self, cache: Any, new_mask: torch.Tensor) -> None:
        """Append rows to the batch: pad the shorter of (batch, newcomers) on the left in time."""
        if self.cache is None or not self.seqs:
            self.cache, self.mask = cache, new_mask
            return
        assert self.mask is not None
        t_old, t_new = self.mask.shape[1], new_mask.shape[1]
        t = max(t_old, t_new)
        for old, new in zip(self._layers(self.cache), self._layers(cache), strict=True):
            old.keys = torch.cat(
                [F.pad(old.keys, (0, 0, t - t_old, 0)), F.pad(new.keys, (0, 0, t - t_new, 0))]
            )
            old.values = torch.cat(
                [F.pad(old.values, (0, 0, t - t_old, 0)), F.pad(new.values, (0, 0, t - t_new, 0))]
            )
        self.mask = torch.cat([F.pad(self.mask, (t - t_old, 0)), F.pad(new_mask, (t - t_new, 0))])

    def _take(self, i: int, logits: torch.Tensor) -> None:
        """Sample the next token of sequence i and stream it; mark the sequence done if it ends."""
        seq = self.seqs[i]
        req = seq.req
        if req.cancelled.is_set():
            req.meta["finish"] = "cancelled"
            return
        tok = sample(logits, req.params, seq.gen)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        if tok in self.eos_ids:
            self._finish(seq, "stop")
            return
        seq.tokens.append(tok)
        req.completion_tokens = len(seq.tokens)
        self.next[i] = tok
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        for s in req.params.stop:
            at = text.find(s, max(0, seq.sent - len(s)))
            if at >= 0:
                self._emit(seq, text[:at])
                self._finish(seq, "stop", flush=False)
                return
        if len(seq.tokens) >= req.params.max_tokens or seq.pos + 1 >= self.context:
            self._emit(seq, text)
            self._finish(seq, "length", flush=False)
            return
        # Hold back what could still turn into a stop string, and half-decoded characters.
        hold = max((len(s) - 1 for s in req.params.stop), default=0)
        safe = len(text) - hold
        while safe > seq.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        self._emit(seq, text[:safe])

    def _emit(self, seq: Seq, text: str) -> None:
        if len(text) > seq.sent:
            seq.req.emit(Event(text=text[seq.sent :]))
            seq.sent = len(text)

    def _finish(self, seq: Seq, reason: str, flush: bool = True) -> None:
        if flush:
            self._emit(seq, self.tokenizer.decode(seq.tokens, skip_special_tokens=True))
        seq.req.meta["finish"] = reason

    def _drop_finished(self) -> None:
        keep = []
        for i, s in enumerate(self.seqs):
            reason = s.req.meta.get("finish")
            if s.req.cancelled.is_set() and reason is None:
                reason = s.req.meta["finish"] = "cancelled"
            if reason is None:
                keep.append(i)
            else:
                s.req.finished_at = time.monotonic()
                s.req.emit(Event(finish_reason=reason))
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        self.next = [self.next[i] for i in keep]
        if not self.seqs:
            self.cache, self.mask = None, None
            return
        assert self.mask is not None
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        lead = int((mask.sum(0) == 0).long().cumprod(0).sum())  # all-padding columns at the left
        self.mask = mask[:, lead:]
        for layer in self._layers(self.cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]

    def fail(self, message: str, status: int = 503) -> None:
        for s in self.seqs:
            s.req.emit(Event(finish_reason="error", error=message, status=status))
        self.seqs, self.next, self.cache, self.mask = [], [], None, None
