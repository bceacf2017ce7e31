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
from collections import Counter
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
POLL_S = 0.25  # how often a relay checks whether its client went away (and its replica is still up)
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


SHOWN = ("device", "host", "pid", "cpus")  # what /health repeats from each replica's status


class ReplicaFailed(Exception):
    """The replica could not serve the call (dead, restarting or unreachable); try another."""


class _Tiers:
    """What the HTTP layer reads from `engine.tiers`: the replicas' tier stats, summed, and a
    request's keep_alive, passed on to the replicas (`keep_alive`, set by the fleet's live side)."""

    def __init__(self) -> None:
        self.stats = TierStats()
        self.keep_alive: Any = None  # (version key, seconds) -> None

    def host_memory(self) -> dict[str, Any]:
        """Each replica has its own host arena: /health shows it under `replicas[i].tiers`."""
        return {}

    def set_keep_alive(self, expert: str, seconds: float | None) -> None:
        if self.keep_alive is None:
            raise ConfigError("this deployment does not take it")
        self.keep_alive(expert, seconds)


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
        self.answering = 0  # HTTP requests the ingress is answering (`CountRequests`), not /health
        self.last_arrival = 0.0  # time.monotonic() when the last of them arrived
        self._refreshed = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.by_key: Counter[str] = Counter()  # version key -> requests being relayed
        # version key -> (name, blob): what a replica is asked for (coe/replicas/fleet.py sets it;
        # without it a key is a name, and the replica serves its current version)
        self.resolve: Any = lambda key: (key, None)
        self.pids: dict[int, int] = {}  # replica -> the process that last answered for it

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

    def drain(self) -> tuple[int, float]:
        """Refuse new requests from now on; (requests still being answered, seconds since the last
        arrived). A request counts from its first byte at the ingress to its last byte sent, so one
        still being parsed, routed or waiting for a replica counts too."""
        self.draining = True
        return max(self.answering, len(self._tasks)), time.monotonic() - self.last_arrival

    def active(self) -> int:
        return sum(int(s.get("active", 0)) for s in self.statuses.values())

    def kv_bytes(self) -> int:
        return sum(int(s.get("kv_bytes", 0)) for s in self.statuses.values())

    def retry_summary(self) -> dict[str, Any]:
        """Experts whose loads the replicas are retrying, by replica."""
        return {f"{e}@{i}": v for i, s in self.statuses.items() for e, v in s.get("retrying", {}).items()}

    # -- relaying ------------------------------------------------------------------------------

    def in_flight(self, key: str) -> int:
        """Requests for version `key` still being relayed."""
        return self.by_key.get(key, 0)

    async def _relay(self, req: EngineRequest) -> None:
        produced: list[int] = []
        tried: set[int] = set()
        name, blob = self.resolve(req.expert)
        self.placement.requested(name)
        self.by_key[req.expert] += 1
        try:
            while True:
                if self.placement.down and time.monotonic() - self._refreshed > REFRESH_S:
                    await self.refresh()
                r = self.placement.choose(name, tried)
                if r is None:
                    why = "no replica could serve it" if tried else "no replica is up"
                    ev = Event(finish_reason="error", error=f"expert {name!r}: {why}; retry", status=503)
                    self._end(req, ev)
                    return
                self.placement.started(r, name)
                try:
                    await self._attempt(req, r, (name, blob), produced)
                    return
                except ReplicaFailed as e:
                    log.warning("replica %d failed a request for %s (%s); retrying elsewhere", r, name, e)
                    self.placement.mark_down(r)
                    tried.add(r)
                    self.retries += 1
                finally:
                    self.placement.finished(r, name)
        finally:
            self.by_key[req.expert] -= 1
            if self.by_key[req.expert] <= 0:
                del self.by_key[req.expert]

    async def _attempt(
        self, req: EngineRequest, r: int, version: tuple[str, str | None], produced: list[int]
    ) -> None:
        """Stream one replica's events into the request; ReplicaFailed if the replica fails."""
        import ray  # deferred: loads ray

        start = len(produced)
        params = dataclasses.replace(req.params, max_tokens=req.params.max_tokens - start)
        gen = (
            self.handles[r]
            .options(stream=True)
            .generate.remote(*version, [*req.prompt_ids, *produced], params)
        )
        it = gen.__aiter__()
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            while not nxt.done():
                await asyncio.wait({nxt}, timeout=POLL_S)
                if nxt.done():
                    break
                if req.cancelled.is_set():
                    nxt.cancel()
                    gen.cancel()
                    return
                if r in self.placement.down and len(produced) == start:
                    # Ray Serve holds a call to a deployment whose only replica died until Ray has
                    # restarted it (a minute on a busy host): move it to a replica that is up.
                    nxt.cancel()
                    gen.cancel()
                    raise ReplicaFailed("it went down before this request's first token")
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

        self._apply(await asyncio.gather(*(one(i) for i in range(len(self.handles)))))
        return self.statuses

    def refresh_blocking(self, timeout_s: float = 5.0) -> list[int]:
        """`refresh` from a thread that is not the event loop's; returns the replicas whose
        process changed since they last answered (Ray restarted them)."""
        calls = [(i, h.status.remote()) for i, h in enumerate(self.handles)]
        results: list[tuple[int, dict[str, Any] | None]] = []
        for i, call in calls:
            try:
                results.append((i, call.result(timeout_s=timeout_s)))
            except Exception:  # dead, restarting or slow
                results.append((i, None))
        return self._apply(results)

    def _apply(self, results: Sequence[tuple[int, dict[str, Any] | None]]) -> list[int]:
        restarted = []
        for i, st in results:
            if st is None:
                self.placement.mark_down(i)
                self.statuses.pop(i, None)
                continue
            self.placement.mark_up(i)
            self.statuses[i] = st
            pid = st.get("pid")
            if isinstance(pid, int):
                if self.pids.get(i, pid) != pid:
                    restarted.append(i)
                self.pids[i] = pid
        self._refreshed = time.monotonic()
        self._sum_stats()
        return restarted

    def _sum_stats(self) -> None:
        engine, tiers = EngineStats(), TierStats()
        for st in self.statuses.values():
            engine.add(st.get("engine", {}))
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
                    **{k: v for k, v in self.statuses.get(i, {}).items() if k in SHOWN},
                    "intra_op_threads": self.statuses.get(i, {}).get("engine", {}).get("intra_op_threads"),
                }
                for i in range(len(self.handles))
            ],
            "requests_in_flight": self.answering,
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


class CountRequests:
    """ASGI middleware on the ingress: counts the requests it is answering (all but /health and
    /metrics, which a monitor may poll all through a drain) into `RemoteEngine.answering`."""

    def __init__(self, app: Any, engine: RemoteEngine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in ("/health", "/metrics"):
            await self.app(scope, receive, send)
            return
        self.engine.answering += 1
        self.engine.last_arrival = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.engine.answering -= 1
