"""The engine thread: scheduler -> tiers -> batch, with prefetch of what comes next.

While one expert's batch decodes, the next experts (queue heads, then the router's second choices)
move up the tiers in the tier manager's background threads; on CUDA the copy runs on a side stream,
on CPU the disk reads run in threads that release the GIL. Batches of preempted experts keep their
KV caches and resume where they stopped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wallbreak.coe.bundle import Bundle
from wallbreak.coe.engine.request import Event, Request
from wallbreak.coe.engine.runner import Batch
from wallbreak.coe.engine.scheduler import POLICIES, Scheduler
from wallbreak.coe.tiers import TierManager
from wallbreak.errors import ConfigError, WallbreakError

log = logging.getLogger(__name__)


class QueueFull(WallbreakError):
    """The bounded queue is full: the client should retry later (HTTP 429)."""


class ExpertUnavailable(WallbreakError):
    """The expert's weights failed to load (HTTP 503); the other experts keep serving."""


@dataclass(frozen=True)
class EngineConfig:
    policy: str = "ours"
    max_batch: int = 16
    max_wait_s: float = 5.0
    max_queue: int = 256
    prefetch: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown serving policy {self.policy!r}; choose one of: {', '.join(POLICIES)}")
        if self.max_batch < 1 or self.max_queue < 1:
            raise ConfigError("max batch and max queue must be at least 1")
        if self.max_wait_s <= 0:
            raise ConfigError(f"max wait must be positive, got {self.max_wait_s}")


@dataclass
class EngineStats:
    switches: int = 0
    switch_seconds: float = 0.0
    switch_bytes: int = 0
    steps: int = 0
    tokens: int = 0


def eos_ids(tokenizer: Any, config: dict[str, Any]) -> set[int]:
    ids: set[int] = set()
    for v in (tokenizer.eos_token_id, config.get("eos_token_id")):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(int(x) for x in v)
    for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if isinstance(tid, int):
            ids.add(tid)
    return ids


class Engine:
    def __init__(
        self,
        bundle: Bundle,
        tiers: TierManager,
        config: EngineConfig,
        on_switch: Callable[[str, float], None] | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.bundle, self.tiers, self.config = bundle, tiers, config
        self.scheduler = Scheduler(config.policy, config.max_batch, config.max_wait_s)
        self.on_switch, self.on_batch = on_switch, on_batch
        self.tokenizers: dict[str, Any] = {}
        self.contexts: dict[str, int] = {}
        self.eos: dict[str, set[int]] = {}
        for e in tiers.entries:
            tok_dir = bundle.tokenizer_path(e.name)
            if tok_dir is None:
                raise ConfigError(f"expert {e.name!r} has no tokenizer in the bundle; it cannot be served")
            self.tokenizers[e.name] = AutoTokenizer.from_pretrained(str(tok_dir))
            limit = int(e.config.get("max_position_embeddings", 2048))
            if e.config.get("sliding_window"):
                # Batches merge KV caches by padding; past a sliding window that would need per-layer masks.
                limit = min(limit, int(e.config["sliding_window"]))
            self.contexts[e.name] = limit
            self.eos[e.name] = eos_ids(self.tokenizers[e.name], e.config)
        self.batches: dict[str, Batch] = {}
        self.broken: dict[str, str] = dict(bundle.damaged)
        self.stats = EngineStats()
        self.current: str | None = None
        self._last_upcoming: list[str] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="wb-engine", daemon=True)

    # -- API for the server ---------------------------------------------------------------------

    @property
    def experts(self) -> list[str]:
        return [e.name for e in self.tiers.entries]

    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> None:
        if req.expert in self.broken:
            raise ExpertUnavailable(f"expert {req.expert!r} is unavailable: {self.broken[req.expert]}")
        if self.scheduler.pending() >= self.config.max_queue:
            raise QueueFull(f"the queue is full ({self.config.max_queue} waiting requests)")
        self.scheduler.submit(req)
        with self._wake:
            self._wake.notify()

    def queue_depth(self) -> int:
        return self.scheduler.pending()

    def active(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is in flight (up to `timeout`), fail the rest, stop the thread."""
        deadline = time.monotonic() + timeout
        while (
            (self.active() or self.queue_depth()) and time.monotonic() < deadline and self._thread.is_alive()
        ):
            time.sleep(0.05)
        self._stop = True
        with self._wake:
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for r in self.scheduler.drain():
            r.emit(Event(finish_reason="error", error="the server is shutting down", status=503))
        for b in self.batches.values():
            b.fail("the server is shutting down")

    # -- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            active = {e: len(b) for e, b in self.batches.items()}
            resident = {e for e in self.experts if self.tiers.where(e).get("device")}
            expert = self.scheduler.choose(self.current, active, resident)
            if expert is None:
                with self._wake:
                    self._wake.wait(timeout=0.1)
                continue
            try:
                self._run(expert)
            except Exception as e:  # an engine bug must not take the server down silently
                log.exception("engine error while serving %s", expert)
                self._fail_expert(expert, f"internal error: {e}", mark_broken=False)

    def _run(self, expert: str) -> None:
        t0 = time.perf_counter()
        switched = expert != self.current
        try:
            lease = self.tiers.acquire(expert)
        except (WallbreakError, OSError, RuntimeError, ValueError) as e:
            log.error("cannot load expert %s: %s", expert, e)
            self._fail_expert(expert, f"its weights failed to load ({e})", mark_broken=True)
            return
        if switched:
            dt = time.perf_counter() - t0
            self.stats.switches += 1
            self.stats.switch_seconds += dt
            self.stats.switch_bytes += self.bundle.expert(expert).total_bytes
            if self.on_switch:
                self.on_switch(expert, dt)
        self.current = expert
        self.scheduler.set_paused(expert, False)
        batch = self.batches.get(expert)
        if batch is None:
            batch = self.batches[expert] = Batch(
                expert, self.tokenizers[expert], self.eos[expert], self.contexts[expert]
            )
        with lease:
            self._prefetch(expert)
            while not self._stop:
                new = self.scheduler.take(expert, len(batch))
                if new:
                    batch.admit(lease.model, new)
                if not len(batch):
                    break
                n = batch.step(lease.model)
                self.stats.steps += 1
                self.stats.tokens += n
                if self.on_batch:
                    self.on_batch(expert, n)
                self._prefetch(expert)  # new arrivals for other experts start moving up now
                active = {e: len(b) for e, b in self.batches.items()}
                nxt = self.scheduler.choose(expert, active, {expert})
                if nxt != expert:
                    break
        if len(batch):
            self.scheduler.set_paused(expert, True)
        else:
            self.batches.pop(expert, None)

    def _prefetch(self, expert: str) -> None:
        if not self.config.prefetch:
            return
        nxt = [e for e in self.scheduler.upcoming(exclude=expert) if e not in self.broken]
        if nxt == self._last_upcoming:
            return
        self._last_upcoming = nxt
        self.tiers.set_upcoming(nxt)
        for i, e in enumerate(nxt):
            with contextlib.suppress(WallbreakError):
                self.tiers.prefetch(e, "device" if i == 0 else "host")

    def _fail_expert(self, expert: str, message: str, mark_broken: bool) -> None:
        if mark_broken:
            self.broken[expert] = message
        batch = self.batches.pop(expert, None)
        if batch is not None:
            batch.fail(message)
        for r in self.scheduler.remove(expert):
            r.emit(Event(finish_reason="error", error=f"expert {expert!r}: {message}", status=503))
        self.scheduler.set_paused(expert, False)
        if self.current == expert:
            self.current = None
