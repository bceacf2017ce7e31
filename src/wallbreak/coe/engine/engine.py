"""The engine thread: scheduler -> tiers -> batch, with prefetch of what comes next.

While one expert's batch decodes, the next experts (queue heads, then the router's second choices)
move up the tiers in the tier manager's background threads; on CUDA the copy runs on a side stream,
on CPU the disk reads run in threads that release the GIL. Batches of preempted experts keep their
KV caches and resume where they stopped. The engine deals in token ids: each expert's context
length and end ids come from `coe.tokenization`, and text from each request's detokenizer.

One KV budget holds for the whole engine, paused batches included: a request joins only when its
batch's projected cache (every row run to its max_tokens) fits beside every other batch's, and waits
otherwise. What fails a request, a batch or an expert is set out in ARCHITECTURE.md ("Failure
rules"): a request's own trouble fails it alone (`runner`); a load that fails for a passing reason
(a timeout, memory, a blob replaced under the server) is retried with backoff; only a load that
fails for a lasting reason marks the expert unavailable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from wallbreak.coe import defaults
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.cores import take_all_cores
from wallbreak.coe.engine.compiled import CompiledSteps, Rows, check_policy, check_rows
from wallbreak.coe.engine.request import Event, Request
from wallbreak.coe.engine.runner import Batch
from wallbreak.coe.engine.scheduler import Scheduler
from wallbreak.coe.policy import POLICIES, ServingPolicy
from wallbreak.coe.tiers import TierManager
from wallbreak.coe.tokenization import ExpertTokenizer
from wallbreak.errors import CapacityError, ConfigError, WallbreakError, first_line, without_paths
from wallbreak.units import format_bytes

log = logging.getLogger(__name__)


class QueueFull(WallbreakError):
    """The bounded queue is full: the client should retry later (HTTP 429)."""


class ExpertUnavailable(WallbreakError):
    """The expert's weights failed to load (HTTP 503); the other experts keep serving."""


# A load that failed for a passing reason is retried after 0.5 s, 1 s, 2 s, ... (at most
# RETRY_MAX_S); after LOAD_ATTEMPTS failures in a row its waiting requests get a 503, and the next
# request starts the count again.
LOAD_ATTEMPTS = 5
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0


@dataclass
class LoadRetry:
    attempts: int = 0
    next_at: float = 0.0
    reason: str = ""

    def public(self, now: float) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "retry_in_s": round(max(self.next_at - now, 0.0), 2),
            "reason": self.reason,
        }


def _blob_identity(path: os.PathLike[str] | str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def reject(req: Request, message: str, status: int) -> None:
    """End a request that never joined a batch, with an error event."""
    req.finish_reason = "error"
    req.error = (message, status)
    req.emit(Event(finish_reason="error", error=message, status=status))


def is_transient(e: BaseException) -> bool:
    """A load failure that may pass by itself: a timeout, no room yet, memory."""
    if isinstance(e, CapacityError | MemoryError | TimeoutError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    policy: ServingPolicy = field(default_factory=lambda: POLICIES[defaults.POLICY])
    max_batch: int = defaults.MAX_BATCH
    max_wait_s: float = defaults.MAX_WAIT_S
    max_queue: int = defaults.MAX_QUEUE
    kv_budget: int = defaults.KV_BUDGET
    prefill_chunk: int = defaults.PREFILL_CHUNK
    compile: str = defaults.COMPILE
    compile_backend: str = "auto"  # auto | aot | dynamo: see compiled.CompiledSteps.backend_for
    compile_rows: Rows = defaults.COMPILE_ROWS  # batch sizes > 1 with an ahead-of-time step of their own

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1:
            raise ConfigError("max batch and max queue must be at least 1")
        if self.max_wait_s <= 0:
            raise ConfigError(f"max wait must be positive, got {self.max_wait_s}")
        if self.kv_budget <= 0 or self.prefill_chunk < 1:
            raise ConfigError("the KV budget and the prefill chunk must be positive")
        check_policy(self.compile)
        check_rows(self.compile_rows)


@dataclass
class EngineStats:
    switches: int = 0
    switch_seconds: float = 0.0
    switch_bytes: int = 0  # bytes the switches themselves moved (not what a prefetch moved earlier)
    steps: int = 0
    tokens: int = 0
    # "rows/path" (path: compiled or eager) -> [steps, seconds]: what a decode step of that many
    # rows cost while serving, beside what `benchmarks/step_table.py` measures apart
    step_seconds: dict[str, list[float]] = field(default_factory=dict)
    intra_op_threads: int = 0  # torch's threads under the engine thread's steps (0 until it runs)

    def record_step(self, rows: int, compiled: bool, seconds: float) -> None:
        if rows > 0:
            self._add_steps(f"{rows}/{'compiled' if compiled else 'eager'}", 1, seconds)

    def _add_steps(self, cell: str, steps: float, seconds: float) -> None:
        mine = self.step_seconds.setdefault(cell, [0, 0.0])
        mine[0] += steps
        mine[1] += seconds

    def add(self, public: dict[str, Any]) -> None:
        """Add another engine's `public()` figures to these (a fleet's sum over its replicas)."""
        for k, v in public.items():
            if k == "step_seconds":
                for cell, (n, secs) in v.items():
                    self._add_steps(cell, n, secs)
            elif hasattr(self, k):
                setattr(self, k, getattr(self, k) + v)

    def public(self) -> dict[str, Any]:
        """A copy safe to serialise from another thread (the engine thread adds step cells)."""
        cells = dict(self.step_seconds)  # one C-level copy: atomic under the GIL
        return self.__dict__ | {"step_seconds": {k: list(v) for k, v in cells.items()}}


class EngineListener(Protocol):
    """Told of what the engine does, from the engine thread (metrics)."""

    def on_switch(self, expert: str, seconds: float, moved_bytes: int) -> None: ...

    def on_step(self, expert: str, batch_size: int) -> None: ...


class Engine:
    def __init__(
        self,
        bundle: Bundle,
        tiers: TierManager,
        tokenizers: Mapping[str, ExpertTokenizer],
        config: EngineConfig | None = None,
    ) -> None:
        self.bundle, self.tiers = bundle, tiers
        self.config = config or EngineConfig()
        missing = [e.name for e in tiers.entries if e.name not in tokenizers and e.name not in bundle.damaged]
        if missing:
            raise ConfigError(f"no tokenizer facts for expert(s) {', '.join(missing)}")
        self.tokenizers = tokenizers
        self.scheduler = Scheduler(self.config.policy, self.config.max_batch, self.config.max_wait_s)
        self.steps = CompiledSteps(
            self.config.compile, bundle.root, self.config.compile_backend, self.config.compile_rows
        )
        self.layouts = {e.name: e.layout_key for e in tiers.entries}
        self.listeners: list[EngineListener] = []
        self.batches: dict[str, Batch] = {}
        self._batches_lock = threading.Lock()  # the HTTP thread reads `batches` while we change it
        # expert -> why it cannot be served (the kind of failure, never a file path: /health shows it)
        self.broken: dict[str, str] = {e: without_paths(why) for e, why in bundle.damaged.items()}
        self.retrying: dict[str, LoadRetry] = {}
        self._blobs = {e.name: _blob_identity(tiers.blob_path(e.name)) for e in tiers.entries}
        self._admitting: list[Request] = []  # taken from the queue, not yet in a batch
        self._kv_blocked_at: int | None = None  # the reserved KV bytes when admission last had to wait
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

    def add_expert(self, key: str) -> None:
        """Serve one more expert (a version key the tier manager and the tokenizers already hold)."""
        entry = self.tiers.entry(key)
        if key not in self.tokenizers:
            raise ConfigError(f"no tokenizer facts for expert {key!r}")
        self.layouts[key] = entry.layout_key
        self._blobs[key] = _blob_identity(self.tiers.blob_path(key))

    def has_work(self, key: str) -> bool:
        """Whether `key` has requests queued, being admitted, or in a running or paused batch."""
        with self._batches_lock:
            if key in self.batches:
                return True
        return (key == self.current and bool(self._admitting)) or key in self.scheduler.with_work()

    def forget(self, key: str) -> None:
        """Stop knowing an expert that no longer has work (the tier manager has let it go)."""
        for d in (self.layouts, self._blobs, self.broken, self.retrying):
            d.pop(key, None)
        self.scheduler.hold_until(key, None)

    def add_listener(self, listener: EngineListener) -> None:
        self.listeners.append(listener)

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
        with self._batches_lock:
            return sum(len(b) for b in self.batches.values())

    def kv_bytes(self) -> int:
        """Bytes held by the KV caches of running and paused batches."""
        with self._batches_lock:
            return sum(b.cache.nbytes() for b in self.batches.values() if b.cache is not None)

    def kv_reserved(self, exclude: str | None = None) -> int:
        """KV bytes the running and paused batches may grow to (each row to its max_tokens)."""
        with self._batches_lock:
            return sum(b.reserved_bytes() for e, b in self.batches.items() if e != exclude)

    def retry_summary(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {e: r.public(now) for e, r in list(self.retrying.items())}

    def compile_summary(self) -> dict[str, object]:
        """Per expert: whether its decode step is compiled (ready), compiling, or eager; which
        experts' prefill is compiled (on the CPU, after the decode step)."""
        state = self.steps.state
        return {
            "policy": self.steps.policy,
            "experts": {e: state.get(k, "not run yet") for e, k in self.layouts.items()},
            "prefill_compiled": sorted(e for e, k in self.layouts.items() if self.steps.prefill_from(k)),
            "compiled_steps": self.steps.compiled_steps,
            "compiled_row_steps": self.steps.compiled_row_steps,
            "row_steps": self._row_steps(),
            "row_paths": self._row_paths(),
            "compiled_prefills": self.steps.compiled_prefills,
            "recompiles": self.steps.recompiles,
            "warming": self.steps.warming,  # architectures still building, loading or checking
        }

    def _row_steps(self) -> dict[str, list[int]]:
        """Per expert, the batch sizes above one its compiled steps serve now."""
        have = self.steps.row_steps
        return {e: sorted(have[k]) for e, k in self.layouts.items() if have.get(k)}

    def _row_paths(self) -> dict[str, dict[str, Any]]:
        """Per architecture (its experts counted): each row size's measured ms per step, compiled
        and eager, and the path it runs now."""
        counts = Counter(self.layouts.values())
        return {k: {"experts": counts[k], "sizes": v} for k, v in self.steps.path_costs.summary().items()}

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is in flight (up to `timeout`), fail the rest, stop the thread."""
        deadline = time.monotonic() + timeout
        while (
            (self.active() or self.queue_depth()) and time.monotonic() < deadline and self._thread.is_alive()
        ):
            time.sleep(0.05)
        self._stop = True
        self.steps.close()
        with self._wake:
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for r in self.scheduler.drain():
            reject(r, "the server is shutting down", 503)
        with self._batches_lock:
            batches, self.batches = list(self.batches.values()), {}
        for b in batches:
            b.fail("the server is shutting down")

    # -- the loop ---------------------------------------------------------------------------------

    def _active_map(self) -> dict[str, int]:
        with self._batches_lock:
            return {e: len(b) for e, b in self.batches.items()}

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        # the decode steps' thread alone runs torch's intra-op threads (coe/cores.py)
        self.stats.intra_op_threads = take_all_cores()
        while not self._stop:
            expert = self.scheduler.choose(self.current, self._active_map(), self.tiers.switch_seconds)
            if expert is None:
                with self._wake:
                    self._wake.wait(timeout=0.1)
                continue
            try:
                self._run(expert)
            except Exception as e:  # an engine bug must not take the server down silently
                log.exception("engine error while serving %s", expert)
                self._fail_expert(expert, f"internal error ({type(e).__name__})", mark_broken=False)

    def _run(self, expert: str) -> None:
        t0 = time.perf_counter()
        switched = expert != self.current
        try:
            lease = self.tiers.acquire(expert)
        except Exception as e:
            self._load_failed(expert, e)
            return
        self._load_succeeded(expert)
        if switched:
            dt = time.perf_counter() - t0
            self.stats.switches += 1
            self.stats.switch_seconds += dt
            self.stats.switch_bytes += lease.moved_bytes
            for listener in self.listeners:
                listener.on_switch(expert, dt, lease.moved_bytes)
        self.current = expert
        self.scheduler.set_paused(expert, False)
        batch = self._batch(expert)
        with lease:
            self._prefetch(expert)
            while not self._stop:
                self._admit(batch, lease.model)
                if not len(batch):
                    break
                ran = self.steps.compiled_steps + self.steps.compiled_row_steps
                t_step = time.perf_counter()
                n = batch.step(lease.model)
                compiled = self.steps.compiled_steps + self.steps.compiled_row_steps > ran
                self.stats.record_step(n, compiled, time.perf_counter() - t_step)
                self.stats.steps += 1
                self.stats.tokens += n
                for listener in self.listeners:
                    listener.on_step(expert, n)
                self._maybe_unblock()
                self._prefetch(expert)  # new arrivals for other experts start moving up now
                if self.scheduler.choose(expert, self._active_map()) != expert:
                    break
        if len(batch):
            self.scheduler.set_paused(expert, True)
        else:
            with self._batches_lock:
                self.batches.pop(expert, None)
            self._maybe_unblock()

    def _load_failed(self, expert: str, e: Exception) -> None:
        """A load that failed for a passing reason is retried later (its requests wait); one that
        failed for a lasting reason marks the expert unavailable."""
        replaced = _blob_identity(self.tiers.blob_path(expert)) != self._blobs.get(expert)
        if not (replaced or is_transient(e)):
            log.error("cannot load expert %s: %s", expert, e)
            self._fail_expert(expert, f"its weights failed to load ({without_paths(first_line(e))})", True)
            return
        reason = "its blob was replaced or removed" if replaced else without_paths(first_line(e))
        r = self.retrying.setdefault(expert, LoadRetry())
        r.attempts += 1
        r.reason = reason
        delay = min(RETRY_FIRST_S * 2 ** (r.attempts - 1), RETRY_MAX_S)
        r.next_at = time.monotonic() + delay
        log.warning(
            "loading expert %s failed (%s), attempt %d; retrying in %.1f s", expert, e, r.attempts, delay
        )
        if r.attempts >= LOAD_ATTEMPTS:
            self._fail_expert(expert, f"its weights could not be loaded ({reason}); retry shortly", False)
            r.attempts = 0
        self.scheduler.hold_until(expert, r.next_at)

    def _load_succeeded(self, expert: str) -> None:
        if self.retrying.pop(expert, None) is not None:
            self.scheduler.hold_until(expert, None)
            self._blobs[expert] = _blob_identity(self.tiers.blob_path(expert))  # the file it now serves
            log.info("expert %s loaded after retrying", expert)

    def _batch(self, expert: str) -> Batch:
        with self._batches_lock:
            batch = self.batches.get(expert)
            if batch is None:
                tok = self.tokenizers[expert]
                batch = self.batches[expert] = Batch(
                    expert,
                    tok.eos_ids,
                    tok.context,
                    self.config.prefill_chunk,
                    self.layouts[expert],
                    self.steps,
                )
            return batch

    def _admit(self, batch: Batch, model: nn.Module) -> None:
        """Admit what the scheduler offers, as far as the engine's KV budget allows; the rest goes
        back to the head of the queue and waits. Whatever happens, every request taken gets an
        answer (`_fail_expert` answers those still in `_admitting`)."""
        new = self.scheduler.take(batch.expert, len(batch))
        if not new:
            return
        self._admitting = new  # left set if admission raises: `_fail_expert` answers them
        fit = self._fitting(batch, model, new)
        if fit:
            batch.admit(model, fit)
        self._admitting = []

    def _fitting(self, batch: Batch, model: nn.Module, new: list[Request]) -> list[Request]:
        """The head of `new` that fits the KV budget beside every other batch; the rest requeued."""
        budget = self.config.kv_budget
        others = self.kv_reserved(exclude=batch.expert)
        fit = len(new)
        while fit and others + batch.projected_bytes(model, new[:fit]) > budget:
            fit -= 1
        if fit == 0 and not len(batch) and others == 0:  # it could never fit: tell it so
            need = batch.projected_bytes(model, new[:1])
            reject(
                new[0],
                f"this request needs {format_bytes(need)} of KV cache at max_tokens="
                f"{new[0].params.max_tokens}, over the server's whole KV budget ({format_bytes(budget)}); "
                "ask for fewer tokens",
                400,
            )
            self.scheduler.requeue(batch.expert, new[1:])
            return []
        if fit < len(new):
            self.scheduler.requeue(batch.expert, new[fit:])
        if fit == 0 and not len(batch):  # others hold the room: wait until they give some back
            self._kv_blocked_at = self.kv_reserved()
            self.scheduler.block_kv(batch.expert)
        return new[:fit]

    def _maybe_unblock(self) -> None:
        """Requests that waited for KV room may try again once reserved bytes went down."""
        if self._kv_blocked_at is not None and self.kv_reserved() < self._kv_blocked_at:
            self._kv_blocked_at = None
            self.scheduler.unblock_kv()

    def _prefetch(self, expert: str) -> None:
        if not self.config.policy.prefetch:
            return
        nxt = [e for e in self.scheduler.upcoming(exclude=expert) if e not in self.broken]
        if nxt == self._last_upcoming:
            return
        self._last_upcoming = nxt
        self.tiers.set_upcoming(nxt, self.scheduler.with_work() | set(self._active_map()))
        for i, e in enumerate(nxt):
            with contextlib.suppress(WallbreakError):
                self.tiers.prefetch(e, "device" if i == 0 else "host")

    def _fail_expert(self, expert: str, message: str, mark_broken: bool) -> None:
        if mark_broken:
            self.broken[expert] = message
        with self._batches_lock:
            batch = self.batches.pop(expert, None)
        if batch is not None:
            batch.fail(f"expert {expert!r}: {message}")
        taken, self._admitting = self._admitting, []
        waiting: Sequence[Request] = self.scheduler.remove(expert)
        for r in [*(r for r in taken if r.finish_reason is None), *waiting]:
            reject(r, f"expert {expert!r}: {message}", 503)
        self.scheduler.set_paused(expert, False)
        if self.current == expert:
            self.current = None
        self._maybe_unblock()
