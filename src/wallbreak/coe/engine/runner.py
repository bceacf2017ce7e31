"""One expert's running batch: continuous admission, chunked prefill, sampling, log-probabilities.

Requests join between decode steps: newcomers are prefilled together into a cache of their own (in
chunks, so a 32k-token prompt never builds a 32k x 32k mask), then merged into the batch's cache
(`kv.KVCache.merge`). Finished or cancelled requests leave by selecting the remaining rows. The
batch deals in token ids only; each request's detokenizer turns them into text and spots stop
strings.

What one request brings (its seed, its sampling values, its detokenizer, its prompt) can fail only
that request: its setup and every per-token step run under a guard that ends it alone with an error
event. A forward that fails for the whole batch is retried once per row, alone, and only the rows
that fail alone are failed (ARCHITECTURE.md, "Failure rules").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wallbreak.coe.engine.compiled import CompiledSteps
from wallbreak.coe.engine.kv import KVCache, capacity_for, head_shape, layer_windows
from wallbreak.coe.engine.request import Event, FinishReason, Request, SamplingParams, TokenLogprob
from wallbreak.coe.engine.step import forward, run_step
from wallbreak.errors import first_line

log = logging.getLogger(__name__)

# Prompts this long or longer prefill one by one where a compiled prefill exists, shorter ones together.
# SmolLM2 int8 on a 2-core x86 CPU (`benchmarks/prefill_ab.py`): one row through the package ran 363 tokens/s
# at 16 tokens, 571 at 64, 833 at 128; eager's kernels 450-530 at 128 rows or more, which is what
# several short prompts padded into one batch make.
ALONE_FROM = 64


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0 (or one too small to divide by); otherwise temperature, nucleus
    (top_p), then a seeded draw."""
    if p.greedy:
        return int(logits.argmax())
    # On the host: the seeded generator lives there, and one vocabulary-sized vector is cheap to move.
    probs = F.softmax(logits.float().cpu() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def logprob_of(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The model's log-probability of `token` (before temperature, as OpenAI reports) and the top k."""
    lp = F.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        vals, idx = lp.topk(k)
        top = tuple((int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token, float(lp[token]), top)


def kv_bytes_per_row(config: Any, dtype: torch.dtype, columns: int) -> int:
    """KV bytes one row of a batch holds at `columns` time columns (the block rounds up to its
    capacity; sliding layers keep every column too, see `engine.kv`)."""
    kv_heads, head_dim = head_shape(config)
    per_column = 2 * kv_heads * head_dim * dtype.itemsize
    return per_column * capacity_for(columns) * len(layer_windows(config))


@dataclass
class Seq:
    req: Request
    tokens: list[int] = field(default_factory=list)
    gen: torch.Generator | None = None

    @property
    def length(self) -> int:
        return len(self.req.prompt_ids) + len(self.tokens)

    @property
    def remaining(self) -> int:
        return self.req.params.max_tokens - len(self.tokens)


class Batch:
    def __init__(
        self,
        expert: str,
        eos_ids: frozenset[int],
        context: int,
        prefill_chunk: int,
        layout: str = "",
        steps: CompiledSteps | None = None,
    ) -> None:
        self.expert = expert
        self.eos_ids = eos_ids
        self.context = context
        self.prefill_chunk = prefill_chunk
        self.seqs: list[Seq] = []
        self.cache: KVCache | None = None
        self.next: list[int] = []  # the token each sequence feeds next
        self.layout = layout  # the architecture key its compiled step is known by
        self.steps = steps
        self.kv_spec: tuple[Any, torch.dtype] | None = None  # its model's config and dtype, once seen

    def __len__(self) -> int:
        return len(self.seqs)

    # -- model calls --------------------------------------------------------------------------

    def admit(self, model: nn.Module, reqs: Sequence[Request]) -> None:
        """Prefill the new requests and merge them into the running batch. Every request gets an
        answer: a sampling setup or a prefill that fails ends that request alone."""
        live = []
        for req in reqs:
            if req.cancelled.is_set():
                self._end(req, "cancelled")
                continue
            try:
                live.append(new_seq(req))
            except Exception as e:  # a seed torch cannot take, say: this request's own fault
                self._fail_now(req, f"its sampling setup failed ({first_line(e)})", 400)
        for group in self._prefill_groups(live):
            self._admit_group(model, group)
        self._drop_finished()

    def _admit_group(self, model: nn.Module, group: list[Seq]) -> None:
        """Prefill `group` together and merge it in; if that fails, each member alone, once."""
        try:
            cache = KVCache.for_model(model)
            logits = self._prefill(model, cache, [s.req.prompt_ids for s in group])
        except Exception as e:
            if len(group) > 1:
                log.warning("prefill of %d rows of %s failed (%s); each alone", len(group), self.expert, e)
                for s in group:
                    self._admit_group(model, [s])
                return
            self._fail_now(group[0].req, f"the expert's forward failed on this prompt ({first_line(e)})", 500)
            return
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.merge(cache)
        first = len(self.seqs)
        self.seqs += group
        self.next += [-1] * len(group)
        self._take_all(logits, first)

    def _prefill_groups(self, seqs: list[Seq]) -> list[list[Seq]]:
        """Which requests prefill together: all of them, padded to the longest; except that where
        the architecture has a compiled prefill (one row at a time), each prompt of ALONE_FROM tokens
        or more goes alone through it, and the shorter ones together (eagerly, unless one is left)."""
        shortest = self.steps.prefill_from(self.layout) if self.steps is not None else None
        if shortest is None or len(seqs) < 2:
            return [seqs] if seqs else []
        cut = max(shortest, ALONE_FROM)
        alone = [[s] for s in seqs if len(s.req.prompt_ids) >= cut]
        rest = [s for s in seqs if len(s.req.prompt_ids) < cut]
        return alone + ([rest] if rest else [])

    def _prefill(self, model: nn.Module, cache: KVCache, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill new rows together, prompts right-padded to the longest, in chunks (so a 32k-token
        prompt never builds a 32k x 32k mask); each row's logits at its own last prompt token. A
        single row's chunks go through the compiled prefill where it has one (`CompiledSteps.prefill`)."""
        device = next(model.parameters()).device
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        ids = ids.to(device)
        cache.open_rows(len(prompts))
        last: list[torch.Tensor | None] = [None] * len(prompts)
        for c0 in range(0, width, self.prefill_chunk):
            q = min(self.prefill_chunk, width - c0)
            chunk = ids[:, c0 : c0 + q]
            fast = self.steps.prefill(self.layout, model, chunk, cache) if self.steps is not None else None
            if fast is not None:  # one row: its last column, which is the prompt's last token at the end
                last[0] = fast[0]
                continue
            ends = sorted({n - 1 - c0 for n in lengths if c0 <= n - 1 < c0 + q})
            logits = forward(model, chunk, cache, keep=ends or [-1])
            for i, n in enumerate(lengths):
                if c0 <= n - 1 < c0 + q:
                    last[i] = logits[i, ends.index(n - 1 - c0)]
        cache.set_lengths(lengths)
        return torch.stack([t for t in last if t is not None])

    def step(self, model: nn.Module) -> int:
        """One decode step for every live sequence; returns how many tokens were produced."""
        self._drop_finished()
        if not self.seqs:
            return 0
        assert self.cache is not None
        try:
            logits = self._decode(model, self.next, self.cache)
        except Exception as e:
            return self._step_each_alone(model, e)
        n = len(self.seqs)
        self._take_all(logits, 0)
        self._drop_finished()
        return n

    def _decode(self, model: nn.Module, next_ids: list[int], cache: KVCache) -> torch.Tensor:
        ids = torch.tensor(next_ids, device=next(model.parameters()).device)[:, None]
        if self.steps is None:
            return run_step(model, ids, cache, None)
        return self.steps.step(self.layout, model, ids, cache, self.expert)

    def _step_each_alone(self, model: nn.Module, error: Exception) -> int:
        """The batch's decode step raised: run it for each row alone, on a copy of its cache (the
        failed step wrote nothing the lengths count), and fail only the rows that fail alone."""
        assert self.cache is not None
        log.warning("decode of %s failed for %d rows (%s); each alone", self.expert, len(self), error)
        kept: list[tuple[Seq, int, KVCache, torch.Tensor]] = []
        for i, seq in enumerate(self.seqs):
            cache = self.cache.copy_rows([i])
            try:
                logits = self._decode(model, [self.next[i]], cache)
            except Exception as e:
                self._fail_now(seq.req, f"the expert's forward failed ({first_line(e)})", 500)
                continue
            kept.append((seq, self.next[i], cache, logits))
        self.seqs, self.next = [k[0] for k in kept], [k[1] for k in kept]
        self.cache = KVCache.for_model(model) if kept else None
        for _, _, cache, _ in kept:
            assert self.cache is not None
            self.cache.merge(cache)
        if kept:
            self._take_all(torch.cat([k[3] for k in kept]), 0)
        self._drop_finished()
        return len(kept)

    def projected_bytes(self, model: nn.Module, newcomers: Sequence[Request]) -> int:
        """KV bytes of the padded block if `newcomers` joined and every row ran to its max_tokens."""
        self.kv_spec = (model.config, next(model.parameters()).dtype)
        return self._projected(newcomers)

    def reserved_bytes(self) -> int:
        """KV bytes this batch's rows may grow to (0 before a model was seen)."""
        return self._projected(()) if self.seqs else 0

    def _projected(self, newcomers: Sequence[Request]) -> int:
        rows = [(s.length, s.remaining) for s in self.seqs]
        rows += [(len(r.prompt_ids), r.params.max_tokens) for r in newcomers]
        if not rows or self.kv_spec is None:
            return 0
        width = max(n for n, _ in rows) + max(m for _, m in rows)
        config, dtype = self.kv_spec
        return len(rows) * kv_bytes_per_row(config, dtype, min(width, self.context))

    # -- per token ------------------------------------------------------------------------------

    def _take_all(self, logits: torch.Tensor, first: int) -> None:
        """Row j of `logits` belongs to sequence first + j; each row's token is its own business."""
        greedy = logits.argmax(-1).tolist()  # one device sync for the whole batch
        for j, tok in enumerate(greedy):
            req = self.seqs[first + j].req
            try:
                self._take(first + j, logits[j], int(tok))
            except Exception as e:  # its sampling, detokenizer, stop strings or logprobs
                log.warning("request %d of %s failed alone: %s", req.rid, self.expert, first_line(e))
                self._fail(req, f"generating this request's next token failed ({first_line(e)})", 500)

    def _take(self, i: int, logits: torch.Tensor, greedy: int) -> None:
        """Choose sequence i's next token and stream it; mark the sequence done if it ends."""
        seq = self.seqs[i]
        req = seq.req
        if req.cancelled.is_set():
            req.finish_reason = "cancelled"
            return
        p = req.params
        tok = greedy if p.greedy else sample(logits, p, seq.gen)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        detok = req.detokenizer
        if tok in self.eos_ids:
            tail = detok.finish() if detok is not None else ""
            if tail:
                req.emit(Event(text=tail))
            req.finish_reason = "stop"
            return
        seq.tokens.append(tok)
        req.completion_tokens = len(seq.tokens)
        self.next[i] = tok
        lp = (logprob_of(logits, tok, p.logprobs),) if p.logprobs is not None else ()
        text = detok.push(tok) if detok is not None else ""
        if detok is not None and detok.stopped:
            req.finish_reason = "stop"
        elif len(seq.tokens) >= p.max_tokens or seq.length >= self.context:
            text += detok.finish() if detok is not None else ""
            req.finish_reason = "length"
        req.emit(Event(text=text, tokens=(tok,), logprobs=lp))

    # -- bookkeeping --------------------------------------------------------------------------

    def _fail(self, req: Request, message: str, status: int) -> None:
        """Mark one request failed; it leaves, with its error event, at the next `_drop_finished`."""
        req.error = (message, status)
        req.finish_reason = "error"

    def _fail_now(self, req: Request, message: str, status: int) -> None:
        """Fail one request that is not (or no longer) in `seqs`, and tell it at once."""
        self._fail(req, message, status)
        self._end(req, "error")

    def _end(self, req: Request, reason: FinishReason) -> None:
        req.finish_reason = reason
        req.finished_at = time.monotonic()
        if reason == "error":
            message, status = req.error or ("the request failed", 500)
            ev = Event(finish_reason="error", error=message, status=status)
        else:
            ev = Event(finish_reason=reason)
        try:
            req.emit(ev)
        except Exception as e:  # its client's side is gone (a closed event loop): nobody to tell
            log.warning("request %d of %s: its end could not be sent (%s)", req.rid, self.expert, e)

    def _drop_finished(self) -> None:
        keep = []
        for i, s in enumerate(self.seqs):
            if s.req.finish_reason is None and s.req.cancelled.is_set():
                s.req.finish_reason = "cancelled"
            if s.req.finish_reason is None:
                keep.append(i)
            else:
                self._end(s.req, s.req.finish_reason)
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        self.next = [self.next[i] for i in keep]
        if self.cache is not None:
            self.cache.select(keep)

    def fail(self, message: str, status: int = 503) -> None:
        for s in self.seqs:
            self._fail_now(s.req, message, status)
        self.seqs, self.next, self.cache = [], [], None


def new_seq(req: Request) -> Seq:
    """A request's sequence with its own seeded generator (raises for a seed torch cannot take)."""
    gen = None
    if req.params.seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(req.params.seed)
    return Seq(req, gen=gen)
