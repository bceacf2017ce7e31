"""A generation request as the engine sees it, and the events it streams back."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Event:
    """What the engine reports: a text delta, or the end (with its reason) or an error."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "error", "cancelled"
    error: str | None = None
    status: int = 200  # the HTTP status an error maps to


@dataclass
class Request:
    expert: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # thread-safe: called from the engine thread
    arrived: float = field(default_factory=time.monotonic)
    rid: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the engine:
    first_token_at: float | None = None
    finished_at: float | None = None
    completion_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        """Called when the client goes away: the engine drops the request at its next step."""
        self.cancelled.set()
