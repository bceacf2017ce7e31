"""A generation request as the engine sees it (token ids, typed fields), and the events it streams back."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

_ids = itertools.count()

FinishReason = Literal["stop", "length", "error", "cancelled"]

# A temperature or top_p below this samples as greedy (vLLM's rule): dividing logits by 1e-40
# overflows to inf and the draw has no distribution left.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # what torch.Generator.manual_seed takes (a signed 64-bit int)


MAX_CHOICES = 8  # n: choices one request may ask for (each a row of its expert's batch)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request's tokens are chosen. The logits of each row go through, in this order: the
    grammar's mask, logit_bias, repetition_penalty (over prompt and output, as transformers applies
    it), presence and frequency penalties (over the output, as OpenAI defines them), temperature,
    then top_k, top_p and min_p (`engine.sampling`)."""

    max_tokens: int = 128  # 0: no generated token (echo with prompt log-probabilities only)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)
    n: int = 1  # choices: the prompt is prefilled once and its KV copied into n rows
    ignore_eos: bool = False  # an end id is an ordinary token: the row runs to max_tokens (load tests)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_p < GREEDY_BELOW or self.top_k == 1

    @property
    def plain(self) -> bool:
        """Nothing changes the logits before the draw but temperature (the fast path)."""
        return (
            not self.logit_bias
            and self.repetition_penalty == 1.0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
        )

    def choice_seed(self, index: int) -> int | None:
        """Choice i's seed: the request's own for choice 0, one derived from (seed, i) for the rest,
        so a seeded answer with n choices is reproducible and its choices differ."""
        if self.seed is None or index == 0:
            return self.seed
        mixed = (self.seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        return mixed - (1 << 64) if mixed >> 63 else mixed


class Detokenizer(Protocol):
    """Turns generated ids into text and finds stop strings (see `coe.tokenization.TextStream`).
    The engine calls it without knowing anything of tokenizers."""

    stopped: bool

    def push(self, token: int) -> str: ...

    def finish(self) -> str: ...

    def fork(self) -> Detokenizer:
        """A fresh detokenizer with the same stop strings (for another choice of the request)."""
        ...


class RowGrammar(Protocol):
    """One row's constrained-decoding state (see `coe.grammar`): which ids may come next, and the
    ids taken. The engine calls it without knowing the grammar library."""

    def allowed(self, vocab: int) -> Any:
        """A bool tensor [vocab]: True where the id may come next."""
        ...

    def accept(self, token: int) -> None: ...

    @property
    def complete(self) -> bool:
        """Nothing may follow: the request ends with `stop`."""
        ...

    @property
    def accepting(self) -> bool:
        """The output so far is whole: an end-of-sequence id may end it here."""
        ...


class Constraint(Protocol):
    """What a request's grammar is; `start()` gives each choice its own row state."""

    def start(self) -> RowGrammar: ...


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the k most likely ids and their log-probabilities


@dataclass
class Event:
    """What the engine reports: generated ids with their text delta, or the end of one choice (with
    its reason; the request ends with its last choice's end), or an error (which ends them all)."""

    text: str = ""
    index: int = 0  # the choice (0 .. n-1)
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None
    status: int = 200  # the HTTP status an error maps to
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # once, before the first token


@dataclass
class Request:
    expert: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # thread-safe: called from the engine thread
    detokenizer: Detokenizer | None = None  # None: ids only, no text
    grammar: Constraint | None = None  # None: unconstrained
    alternatives: tuple[str, ...] = ()  # the router's ranked choices, for prefetch
    arrived: float = field(default_factory=time.monotonic)
    rid: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the engine:
    first_token_at: float | None = None
    finished_at: float | None = None
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: tuple[str, int] | None = None  # why it failed and the HTTP status: this request's alone

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        """Called when the client goes away: the engine drops the request at its next step."""
        self.cancelled.set()
