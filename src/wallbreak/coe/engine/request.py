"""A generation request as the engine sees it (token ids, typed fields), and the events it streams back."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

_ids = itertools.count()

FinishReason = Literal["stop", "length", "error", "cancelled"]

# A temperature or top_p below this samples as greedy (vLLM's rule): dividing logits by 1e-40
# overflows to inf and the draw has no distribution left.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # what torch.Generator.manual_seed takes (a signed 64-bit int)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_p < GREEDY_BELOW


class Detokenizer(Protocol):
    """Turns generated ids into text and finds stop strings (see `coe.tokenization.TextStream`).
    The engine calls it without knowing anything of tokenizers."""

    stopped: bool

    def push(self, token: int) -> str: ...

    def finish(self) -> str: ...


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the k most likely ids and their log-probabilities


@dataclass
class Event:
    """What the engine reports: generated ids with their text delta, or the end (with its reason)."""

    text: str = ""
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None
    status: int = 200  # the HTTP status an error maps to


@dataclass
class Request:
    expert: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # thread-safe: called from the engine thread
    detokenizer: Detokenizer | None = None  # None: ids only, no text
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
