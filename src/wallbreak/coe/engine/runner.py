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
from torch import nn

from wallbreak.coe.engine.compiled import CompiledSteps
from wallbreak.coe.engine.kv import KVCache, capacity_for, head_shape, layer_windows
from wallbreak.coe.engine.request import Detokenizer, Event, FinishReason, Request, RowGrammar, TokenLogprob
from wallbreak.coe.engine.sampling import Penalties, logprob_of, prompt_logprobs, sample, shaped
from wallbreak.coe.engine.step import forward, run_step
from wallbreak.errors import first_line

log = logging.getLogger(__name__)

# Prompts this long or longer prefill one by one where a compiled prefill exists, shorter ones together.
# SmolLM2 int8 on a 2-core x86 CPU (`benchmarks/prefill_ab.py`): one row through the package ran 363 tokens/s
# at 16 tokens, 571 at 64, 833 at 128; eager's kernels 450-530 at 128 rows or more, which is what
# several short prompts padded into one batch make.
ALONE_FROM = 64


def kv_bytes_per_row(config: Any, dtype: torch.dtype, columns: int) -> int:
    """KV bytes one row of a batch holds at `columns` time columns (the block rounds up to its
    capacity; sliding layers keep every column too, see `engine.kv`)."""
    kv_heads, head_dim = head_shape(config)
    per_column = 2 * kv_heads * head_dim * dtype.itemsize
    return per_column * capacity_for(columns) * len(layer_windows(config))


@dataclass
class Seq:
    """One row of the batch: one choice of a request (a request with n choices has n rows)."""

    req: Request
    index: int = 0  # the choice
    tokens: list[int] = field(default_factory=list)
    gen: torch.Generator | None = None
    detok: Detokenizer | None = None
    grammar: RowGrammar | None = None
    penalties: Penalties | None = None
    finish: FinishReason | None = None  # this choice ended (stop or length)

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
        live: list[list[Seq]] = []  # per request, its choices' rows
        for req in reqs:
            if req.cancelled.is_set():
                self._end(req, "cancelled")
                continue
            try:
                live.append(new_seqs(req))
            except Exception as e:  # a seed torch cannot take, say: this request's own fault
                self._fail_now(req, f"its sampling setup failed ({first_line(e)})", 400)
        for group in self._prefill_groups(live):
            self._admit_group(model, group)
        self._drop_finished()

    def _admit_group(self, model: nn.Module, group: list[list[Seq]]) -> None:
        """Prefill `group` together (a row per request) and merge it in, each request's row copied
        into one row per choice; if the prefill fails, each request alone, once."""
        try:
            cache = KVCache.for_model(model)
            logits = self._prefill(model, cache, [rows[0].req for rows in group])
        except Exception as e:
            if len(group) > 1:
                log.warning("prefill of %d rows of %s failed (%s); each alone", len(group), self.expert, e)
                for rows in group:
                    self._admit_group(model, [rows])
                return
            self._fail_now(
                group[0][0].req, f"the expert's forward failed on this prompt ({first_line(e)})", 500
            )
            return
        copies = [j for j, rows in enumerate(group) for _ in rows]
        if len(copies) > len(group):  # n > 1: the prompt's KV, prefilled once, copied into n rows
            cache.select(copies)
            logits = logits[copies]
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.merge(cache)
        first = len(self.seqs)
        self.seqs += [s for rows in group for s in rows]
        self.next += [-1] * len(copies)
        self._take_all(logits, first)

    def _prefill_groups(self, live: list[list[Seq]]) -> list[list[list[Seq]]]:
        """Which requests prefill together: all of them, padded to the longest; except that a
        request asking for its prompt's log-probabilities goes alone, and that where the
        architecture has a compiled prefill (one row at a time), each prompt of ALONE_FROM tokens or
        more goes alone through it, and the shorter ones together (eagerly, unless one is left)."""
        echo = [[rows] for rows in live if rows[0].req.params.prompt_logprobs is not None]
        live = [rows for rows in live if rows[0].req.params.prompt_logprobs is None]
        shortest = self.steps.prefill_from(self.layout) if self.steps is not None else None
        if shortest is None or len(live) < 2:
            return echo + ([live] if live else [])
        cut = max(shortest, ALONE_FROM)
        alone = [[rows] for rows in live if len(rows[0].req.prompt_ids) >= cut]
        rest = [rows for rows in live if len(rows[0].req.prompt_ids) < cut]
        return echo + alone + ([rest] if rest else [])

    def _prefill(self, model: nn.Module, cache: KVCache, reqs: Sequence[Request]) -> torch.Tensor:
        """Prefill new rows together, prompts right-padded to the longest, in chunks (so a 32k-token
        prompt never builds a 32k x 32k mask); each row's logits at its own last prompt token. A
        single row's chunks go through the compiled prefill where it has one (`CompiledSteps.prefill`).
        A request that asks for its prompt's log-probabilities (alone in its group) gets them here,
        chunk by chunk, as one event before its first token."""
        device = next(model.parameters()).device
        prompts = [r.prompt_ids for r in reqs]
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        echo_k = reqs[0].params.prompt_logprobs if len(reqs) == 1 else None
        echoed: list[TokenLogprob | None] = [None]  # the first token has no log-probability
        ids = ids.to(device)
        cache.open_rows(len(prompts))
        last: list[torch.Tensor | None] = [None] * len(prompts)
        for c0 in range(0, width, self.prefill_chunk):
            q = min(self.prefill_chunk, width - c0)
            chunk = ids[:, c0 : c0 + q]
            if echo_k is not None:  # every column's logits, this chunk's only
                logits = forward(model, chunk, cache, keep=range(q))
                following = ids[0, c0 + 1 : c0 + q + 1]
                echoed += prompt_logprobs(logits[0, : following.shape[0]], following.cpu(), echo_k)
                last[0] = logits[0, -1]
                continue
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
        if echo_k is not None:
            reqs[0].emit(Event(prompt_logprobs=tuple(echoed)))
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
        failed step wrote nothing the lengths count), and fail only the requests whose rows fail alone."""
        assert self.cache is not None
        log.warning("decode of %s failed for %d rows (%s); each alone", self.expert, len(self), error)
        kept: list[tuple[Seq, int, KVCache, torch.Tensor]] = []
        failed: list[Request] = []
        for i, seq in enumerate(self.seqs):
            cache = self.cache.copy_rows([i])
            try:
                logits = self._decode(model, [self.next[i]], cache)
            except Exception as e:
                self._fail(seq.req, f"the expert's forward failed ({first_line(e)})", 500)
                failed.append(seq.req)
                continue
            kept.append((seq, self.next[i], cache, logits))
        self.seqs, self.next = [k[0] for k in kept], [k[1] for k in kept]
        self.cache = KVCache.for_model(model) if kept else None
        for _, _, cache, _ in kept:
            assert self.cache is not None
            self.cache.merge(cache)
        for req in {r.rid: r for r in failed}.values():  # told now unless a choice of it is still a row
            if not any(s.req is req for s in self.seqs):
                self._end(req, "error")
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
        rows += [(len(r.prompt_ids), r.params.max_tokens) for r in newcomers for _ in range(r.params.n)]
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
            if req.error is not None:  # another choice of it failed this step
                continue
            try:
                self._take(first + j, logits[j], int(tok))
            except Exception as e:  # its sampling, grammar, detokenizer, stop strings or logprobs
                log.warning("request %d of %s failed alone: %s", req.rid, self.expert, first_line(e))
                self._fail(req, f"generating this request's next token failed ({first_line(e)})", 500)

    def _choose(self, seq: Seq, logits: torch.Tensor, greedy: int) -> int:
        """Row `seq`'s next id: the batch's argmax where nothing reshapes its logits, otherwise
        through its grammar's mask, logit_bias and penalties, then the draw."""
        p = seq.req.params
        if p.plain and seq.grammar is None:
            return greedy if p.greedy else sample(logits, p, seq.gen)
        allowed = None
        if seq.grammar is not None:
            allowed = seq.grammar.allowed(logits.shape[-1])
            if not bool(allowed.any()):
                raise RuntimeError("the grammar allows no next token")
        if not p.plain and seq.penalties is None:
            seq.penalties = Penalties.start(logits.shape[-1], seq.req.prompt_ids)
        return sample(shaped(logits, p, seq.penalties, allowed), p, seq.gen)

    def _take(self, i: int, logits: torch.Tensor, greedy: int) -> None:
        """Choose sequence i's next token and stream it; mark the sequence done if it ends."""
        seq = self.seqs[i]
        req = seq.req
        if req.cancelled.is_set() or seq.finish is not None:
            return
        p = req.params
        if seq.remaining <= 0:  # max_tokens 0: the prompt's log-probabilities were all it asked
            seq.finish = "length"
            return
        tok = self._choose(seq, logits, greedy)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        detok = seq.detok
        # An end id ends the row unless its grammar is mid-way (where a model's end id is also an
        # ordinary token the grammar allowed, it is taken as that token).
        if tok in self.eos_ids and not p.ignore_eos and (seq.grammar is None or seq.grammar.accepting):
            tail = detok.finish() if detok is not None else ""
            if tail:
                req.emit(Event(text=tail, index=seq.index))
            seq.finish = "stop"
            return
        seq.tokens.append(tok)
        req.completion_tokens += 1
        self.next[i] = tok
        if seq.penalties is not None:
            seq.penalties.add(tok)
        if seq.grammar is not None:
            seq.grammar.accept(tok)
        lp = (logprob_of(logits, tok, p.logprobs),) if p.logprobs is not None else ()
        text = detok.push(tok) if detok is not None else ""
        if detok is not None and detok.stopped:
            seq.finish = "stop"
        elif seq.grammar is not None and seq.grammar.complete:
            text += detok.finish() if detok is not None else ""
            seq.finish = "stop"
        elif len(seq.tokens) >= p.max_tokens or seq.length >= self.context:
            text += detok.finish() if detok is not None else ""
            seq.finish = "length"
        req.emit(Event(text=text, tokens=(tok,), logprobs=lp, index=seq.index))

    # -- bookkeeping --------------------------------------------------------------------------

    def _fail(self, req: Request, message: str, status: int) -> None:
        """Mark one request failed (all its choices); it leaves, with its error event, at the next
        `_drop_finished`."""
        req.error = (message, status)

    def _fail_now(self, req: Request, message: str, status: int) -> None:
        """Fail one request that is not (or no longer) in `seqs`, and tell it at once."""
        self._fail(req, message, status)
        self._end(req, "error")

    def _end(self, req: Request, reason: FinishReason) -> None:
        """The request is over: all its choices ended, or it failed or was cancelled."""
        req.finish_reason = reason
        req.finished_at = time.monotonic()
        if reason == "error":
            message, status = req.error or ("the request failed", 500)
            ev = Event(finish_reason="error", error=message, status=status)
        else:
            ev = Event(finish_reason=reason)
        self._tell(req, ev)

    def _tell(self, req: Request, ev: Event) -> None:
        try:
            req.emit(ev)
        except Exception as e:  # its client's side is gone (a closed event loop): nobody to tell
            log.warning("request %d of %s: its end could not be sent (%s)", req.rid, self.expert, e)

    def _drop_finished(self) -> None:
        """Rows whose choice ended leave (its end told with its index); a failed or cancelled
        request's rows all leave, told once. A request is over with its last row."""
        keep: list[int] = []
        gone: dict[int, tuple[Request, FinishReason]] = {}  # request id -> (request, its end)
        for i, s in enumerate(self.seqs):
            req = s.req
            if req.error is not None:
                gone[req.rid] = (req, "error")
            elif req.cancelled.is_set():
                gone[req.rid] = (req, "cancelled")
            elif s.finish is None:
                keep.append(i)
            else:
                gone.setdefault(req.rid, (req, s.finish))
                if req.params.n > 1:
                    self._tell(req, Event(finish_reason=s.finish, index=s.index))
        if len(keep) == len(self.seqs):
            return
        still = {self.seqs[i].req.rid for i in keep}
        for rid, (req, reason) in gone.items():
            if rid in still:
                continue
            if req.params.n > 1 and reason in ("stop", "length"):  # each choice's end was told
                req.finish_reason, req.finished_at = reason, time.monotonic()
            else:
                self._end(req, reason)
        self.seqs = [self.seqs[i] for i in keep]
        self.next = [self.next[i] for i in keep]
        if self.cache is not None:
            self.cache.select(keep)

    def fail(self, message: str, status: int = 503) -> None:
        for req in {id(s.req): s.req for s in self.seqs}.values():
            self._fail_now(req, message, status)
        self.seqs, self.next, self.cache = [], [], None


def new_seqs(req: Request) -> list[Seq]:
    """A request's rows, one per choice, each with its own seeded generator, detokenizer and
    grammar state (raises for a seed torch cannot take)."""
    out = []
    for i in range(req.params.n):
        seed = req.params.choice_seed(i)
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        detok = req.detokenizer if i == 0 or req.detokenizer is None else req.detokenizer.fork()
        grammar = req.grammar.start() if req.grammar is not None else None
        out.append(Seq(req, index=i, gen=gen, detok=detok, grammar=grammar))
    return out
