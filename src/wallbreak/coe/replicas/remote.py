"""The ingress side of `wallbreak serve --ray`: an engine whose experts run in replica deployments.

`RemoteEngine` offers the surface the HTTP layer uses from `Engine` (`submit`, `experts`, queue and
KV figures, stats), so the OpenAI endpoints, errors and auth are the very code of `wallbreak serve`.
A submitted request is relayed to the replica the placement table chooses, as a stream of the
engine's own events. If the replica fails (its actor died, or it cannot be reached), the request
is retried on another replica with the tokens produced so far appended to the prompt, so a client
sees one unbroken answer; only when no replica is left does it get a 503 with Retry-After.
Replicas send token ids only: the request's detokenizer runs here, so text it still held back
(the start of a possible stop string, half a character) survives a replica's death.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.engine import Event, ExpertUnavailable, QueueFull
from wallbreak.coe.engine import Request as EngineRequest
from wallbreak.coe.engine.engine import EngineStats
from wallbreak.coe.replicas.placement import Placement
from wallbreak.coe.tiers.config import TierStats
from wallbreak.errors import ConfigError, without_paths

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often a relay checks whether its client went away
REFRESH_S = 2.0  # how stale replica statuses may be before a routing decision refreshes them


def with_text(req: EngineRequest, ev: Event) -> Event:
    """A replica's ids-only event with the request's own text: a stop string found here ends it."""
    detok = req.detokenizer
    if detok is None or ev.error:
        return ev
    text = "".join(detok.push(t) for t in ev.tokens)
    if detok.stopped:
        return dataclasses.replace(ev, text=text, finish_reason="stop")
    if ev.finish_reason in ("stop", "length"):
        text += detok.finish()
    return dataclasses.replace(ev, text=text)


class ReplicaFailed(Exception):
    """The replica could not serve the call (dead, restarting or unreachable); try another."""


class _Tiers:
    """What the metrics collector reads from `engine.tiers`: the replicas' tier stats, summed."""

    def __init__(self) -> None:
        self.stats = TierStats()

    def set_keep_alive(self, expert: str, seconds: float | None) -> None:
        raise ConfigError("this deployment does not take it (Ray mode)")


class RemoteEngine:
    def __init__(self, bundle: Bundle, handles: Sequence[Any], placement: Placement, max_queue: int) -> None:
        self.bundle, self.handles, self.placement = bundle, list(handles), placement
        self.max_queue = max_queue
        self.broken: dict[str, str] = {e: without_paths(why) for e, why in bundle.damaged.items()}
        self.stats = EngineStats()
        self.tiers = _Tiers()
        self.statuses: dict[int, dict[str, Any]] = {}
        self.retries = 0  # requests moved to another replica after a failure
        self.draining = False  # SIGTERM: new requests get a 503, in-flight ones finish
        self._refreshed = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the Engine surface the HTTP layer uses ---------------------------------------------------

    @property
    def experts(self) -> list[str]:
        return [n for n in self.bundle.names if n not in self.bundle.damaged]

    def add_listener(self, listener: Any) -> None:
        """Switches and steps happen in the replicas; their counts arrive through `refresh`."""

    def submit(self, req: EngineRequest) -> None:
        if self.draining:
            raise ExpertUnavailable("the server is shutting down")
        if req.expert in self.broken:
            raise ExpertUnavailable(f"expert {req.expert!r} is unavailable: {self.broken[req.expert]}")
        p = req.params
        if req.grammar is not None or p.n > 1 or p.prompt_logprobs is not None:
            raise ConfigError(
                "response_format, tools, n > 1 and echo with logprobs are not available with Ray "
                "replicas (serve without --ray for them)"
            )
        if self.queue_depth() >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests in flight across the replicas)")
        task = asyncio.get_running_loop().create_task(self._relay(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def queue_depth(self) -> int:
        return sum(self.placement.inflight)

    def active(self) -> int:
        return sum(int(s.get("active", 0)) for s in self.statuses.values())

    def kv_bytes(self) -> int:
        return sum(int(s.get("kv_bytes", 0)) for s in self.statuses.values())

    def retry_summary(self) -> dict[str, Any]:
        """Experts whose loads the replicas are retrying, by replica."""
        return {f"{e}@{i}": v for i, s in self.statuses.items() for e, v in s.get("retrying", {}).items()}

    # -- relaying ------------------------------------------------------------------------------

    async def _relay(self, req: EngineRequest) -> None:
        produced: list[int] = []
        tried: set[int] = set()
        self.placement.requested(req.expert)
        while True:
            if self.placement.down and time.monotonic() - self._refreshed > REFRESH_S:
                await self.refresh()
            r = self.placement.choose(req.expert, tried)
            if r is None:
                why = "no replica could serve it" if tried else "no replica is up"
                self._end(
                    req,
                    Event(finish_reason="error", error=f"expert {req.expert!r}: {why}; retry", status=503),
                )
                return
            self.placement.started(r, req.expert)
            try:
                await self._attempt(req, r, produced)
                return
            except ReplicaFailed as e:
                log.warning("replica %d failed a request for %s (%s); retrying elsewhere", r, req.expert, e)
                self.placement.mark_down(r)
                tried.add(r)
                self.retries += 1
            finally:
                self.placement.finished(r, req.expert)

    async def _attempt(self, req: EngineRequest, r: int, produced: list[int]) -> None:
        """Stream one replica's events into the request; ReplicaFailed if the replica fails."""
        import ray  # deferred: loads ray

        params = dataclasses.replace(req.params, max_tokens=req.params.max_tokens - len(produced))
        gen = (
            self.handles[r]
            .options(stream=True)
            .generate.remote(req.expert, [*req.prompt_ids, *produced], params)
        )
        it = gen.__aiter__()
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            while not nxt.done():
                await asyncio.wait({nxt}, timeout=POLL_S)
                if not nxt.done() and req.cancelled.is_set():
                    nxt.cancel()
                    gen.cancel()
                    return
            try:
                ev: Event = nxt.result()
            except StopAsyncIteration:
                raise ReplicaFailed("the stream ended without a finish") from None
            except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError) as e:
                raise ReplicaFailed(type(e).__name__) from None
            except ray.exceptions.RayError as e:
                raise ReplicaFailed(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
            if ev.error and ev.status == 429 and not produced:
                raise ReplicaFailed("its queue is full")
            produced.extend(ev.tokens)
            req.completion_tokens = len(produced)
            if ev.tokens and req.first_token_at is None:
                req.first_token_at = time.monotonic()
            ev = with_text(req, ev)
            if ev.finish_reason:
                self._end(req, ev)
                if ev.finish_reason == "stop":
                    gen.cancel()  # a stop string found here: the replica may still be generating
                return
            req.emit(ev)

    def _end(self, req: EngineRequest, ev: Event) -> None:
        req.finish_reason = ev.finish_reason
        req.finished_at = time.monotonic()
        req.emit(ev)

    # -- replica status --------------------------------------------------------------------------

    async def refresh(self, timeout_s: float = 2.0) -> dict[int, dict[str, Any]]:
        """Ask every replica for its status; one that answers is up again, one that does not is down."""

        async def one(i: int) -> tuple[int, dict[str, Any] | None]:
            try:
                return i, await asyncio.wait_for(self.handles[i].status.remote(), timeout_s)
            except Exception:  # dead, restarting or slow: all mean "do not route here now"
                return i, None

        for i, st in await asyncio.gather(*(one(i) for i in range(len(self.handles)))):
            if st is None:
                self.placement.mark_down(i)
                self.statuses.pop(i, None)
            else:
                self.placement.mark_up(i)
                self.statuses[i] = st
        self._refreshed = time.monotonic()
        self._sum_stats()
        return self.statuses

    def _sum_stats(self) -> None:
        engine, tiers = EngineStats(), TierStats()
        for st in self.statuses.values():
            for k, v in st.get("engine", {}).items():
                setattr(engine, k, getattr(engine, k) + v)
            t = st.get("tiers", {})
            for kind in ("hits", "misses", "evictions"):
                for tier, n in t.get(kind, {}).items():
                    getattr(tiers, kind)[tier] = getattr(tiers, kind).get(tier, 0) + n
            for k in (
                "bytes_disk_to_host",
                "bytes_disk_to_host_prefetch",
                "bytes_host_to_device",
                "switches",
            ):
                setattr(tiers, k, getattr(tiers, k) + int(t.get(k, 0)))
        self.stats, self.tiers.stats = engine, tiers

    def compile_summary(self) -> dict[str, Any]:
        """Each replica compiles its own decode steps; its /health would say which."""
        return {"policy": "per replica"}

    def health(self) -> dict[str, Any]:
        """The replicas part of /health: who is up, which experts each is placed with and holds."""
        return {
            "replicas": [
                {
                    "index": i,
                    "up": i not in self.placement.down,
                    "in_flight": self.placement.inflight[i],
                    "placed": self.placement.experts_of(i),
                    **{k: v for k, v in self.statuses.get(i, {}).items() if k in ("device", "host", "pid")},
                }
                for i in range(len(self.handles))
            ],
            "retried_requests": self.retries,
            "requests_by_expert": dict(sorted(self.placement.requests.items())),  # for --expert-load
        }


class ReplicaCollector(Collector):
    """/metrics: one series per replica and expert it holds (tier device or host), and per replica up."""

    def __init__(self, engine: RemoteEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("wallbreak_replica_up", "replica answering status calls", labels=["replica"])
        held = GaugeMetricFamily(
            "wallbreak_replica_expert",
            "experts a replica holds, by tier",
            labels=["replica", "expert", "tier"],
        )
        for i in range(len(self.engine.handles)):
            up.add_metric([str(i)], 0.0 if i in self.engine.placement.down else 1.0)
            st = self.engine.statuses.get(i, {})
            for tier in ("device", "host"):
                for e in st.get(tier, []):
                    held.add_metric([str(i), e, tier], 1.0)
        yield up
        yield held
