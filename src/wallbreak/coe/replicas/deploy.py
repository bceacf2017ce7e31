"""`wallbreak serve --ray`: the bundle served by N replica deployments behind one ingress, on Ray Serve.

- **Replicas** (`replica-0` ... `replica-{N-1}`, one Ray Serve deployment each, so the ingress can
  address each one): each runs `wallbreak serve`'s own engine (tiers with their own budgets,
  per-expert batching, prefetch) over the same bundle path, and streams the engine's events.
  Ray restarts a replica that dies. Each reserves its share of the cluster's CPUs
  (`replica_cpus`), and Ray sets OMP_NUM_THREADS to it, so torch's threads match the cores.
- **Ingress** (`ingress`, exposed over HTTP by Ray Serve's proxy): the very FastAPI app of
  `wallbreak serve` (OpenAI endpoints, errors, auth, router), over a `RemoteEngine` that relays
  each request to the replica the placement table picks (`placement.py`), and retries elsewhere
  when one fails.

Bundles are shared, not copied: every replica opens the same path. On one host, or with a shared file
system, that is all; on several hosts, put the bundle at the same path on every node (or copy it and
run `wallbreak bundle verify` there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.catalog import Catalog
from wallbreak.coe.cores import keep_to_one_core
from wallbreak.coe.engine import Event, ExpertUnavailable, QueueFull, SamplingParams
from wallbreak.coe.engine import Request as EngineRequest
from wallbreak.coe.live import LiveBundle
from wallbreak.coe.replicas.fleet import FleetSide, expert_states, replica_admin
from wallbreak.coe.replicas.placement import Placement, read_load
from wallbreak.coe.replicas.remote import CountRequests, RemoteEngine, ReplicaCollector
from wallbreak.coe.router import Router
from wallbreak.coe.server.serve import ServeOptions, build, ensure_default_bundle
from wallbreak.coe.tokenization import load_tokenizers
from wallbreak.errors import ConfigError

log = logging.getLogger(__name__)

APP = "wallbreak"


def replica_name(i: int) -> str:
    return f"replica-{i}"


class ReplicaServer:
    """One replica: `wallbreak serve`'s engine, tiers and tokenizers over the shared bundle."""

    def __init__(self, index: int, opts: ServeOptions) -> None:
        self.index = index
        self.cpus = _reserved_cpus()  # fixed for the actor's life
        keep_to_one_core()  # only the engine thread runs torch's intra-op threads (coe/cores.py)
        self.engine, _, self.tiers, tokenizers = build(opts, with_router=False)
        catalog = Catalog(self.engine.experts, tokenizers, None)
        self.live = LiveBundle.local(self.engine.bundle, self.engine, self.tiers, catalog, routes=False)
        self.engine.start()
        self.live.start()

    async def generate(
        self, expert: str, blob: str | None, ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Event]:
        """The engine's events for one request for version (expert, blob) (None: the one serving
        now), ids only (the ingress turns them into text), as they come; the request ends if the
        caller leaves."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        key = await self._version(expert, blob)
        if key is None:
            why = f"expert {expert!r}: that version is no longer served; retry"
            yield Event(finish_reason="error", error=why, status=503)
            return
        req = EngineRequest(key, ids, params, emit, None)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            yield Event(finish_reason="error", error=str(e), status=429)
            return
        except ExpertUnavailable as e:
            yield Event(finish_reason="error", error=str(e), status=503)
            return
        try:
            while True:
                ev = await queue.get()
                yield ev
                if ev.finish_reason:
                    return
        finally:
            req.cancel()  # no-op when finished; frees the batch slot when the ingress cancelled

    async def _version(self, expert: str, blob: str | None) -> str | None:
        """This replica's key for the version, syncing once (off the event loop) if it is new here."""
        if blob is None:
            return self.live.catalog.key(expert)
        v = self.live.find(expert, blob, sync=False) or await asyncio.to_thread(self.live.find, expert, blob)
        return None if v is None else v.key

    async def sync(self) -> dict[str, Any]:
        """Apply the bundle's manifest now (the ingress calls it before its own catalog changes)."""
        return (await asyncio.to_thread(self.live.sync)).to_json()

    async def admin(self, op: str, name: str, *args: Any) -> dict[str, Any]:
        """A residency ask (pin, unpin, load, unload, keep_alive) for `name`: its answer as data."""
        return await asyncio.to_thread(replica_admin, self.live, op, name, *args)

    def status(self) -> dict[str, Any]:
        snap = self.tiers.snapshot()
        return {
            "index": self.index,
            "pid": os.getpid(),
            "cpus": self.cpus,
            "device": sorted({s["expert"] for s in snap["slots"] if s["expert"]}),
            "host": sorted(snap["host"]),
            "queue": self.engine.queue_depth(),
            "active": self.engine.active(),
            "kv_bytes": self.engine.kv_bytes(),
            "retrying": self.engine.retry_summary(),
            "engine": self.engine.stats.public(),
            "tiers": self.tiers.stats.summary() | {"host_memory": self.tiers.host_memory()},
            "experts": expert_states(self.live),
        }

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:  # Ray Serve calls it when it stops the replica: drain, then free
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.live.stop()
            engine.stop()
            self.tiers.close()


def _reserved_cpus() -> float | None:
    """The CPUs Ray reserved for this replica's actor (None outside Ray)."""
    import ray  # deferred: loads ray

    if not ray.is_initialized():
        return None
    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))


def build_ingress_app(opts: ServeOptions, replicas: int, load: dict[str, float] | None = None) -> Any:
    """The ingress's ASGI app; Ray Serve calls this on the ingress replica, not in the driver."""
    from ray import serve  # deferred: loads ray

    from wallbreak.coe.server.admin import install_admin  # deferred: loads fastapi
    from wallbreak.coe.server.app import create_app  # deferred: loads fastapi

    assert opts.bundle is not None
    bundle = Bundle.open(opts.bundle, lenient=True)
    entries = [bundle.expert(n) for n in bundle.names if n not in bundle.damaged]
    tokenizers = load_tokenizers(bundle, entries, lenient=True)
    router = Router.load(bundle) if len(bundle.names) > 1 else None
    handles = [serve.get_deployment_handle(replica_name(i), app_name=APP) for i in range(replicas)]
    placement = Placement.spread([e.name for e in entries], replicas, load)
    remote = RemoteEngine(bundle, handles, placement, opts.engine.max_queue * replicas)
    catalog = Catalog([e.name for e in entries], tokenizers, router)
    side = FleetSide(remote, catalog)
    live = LiveBundle(bundle, catalog, side)
    side.attach(live)
    _INGRESS.append(remote)
    app = create_app(
        remote,  # type: ignore[arg-type]  # the engine's interface, over Ray handles
        catalog,
        api_key=opts.api_key,
        extra_health=remote,
        max_body=opts.max_body,
        describe=live.describe,
    )
    app.state.metrics.registry.register(ReplicaCollector(remote))
    install_admin(app, live, opts.admin_key)
    app.add_middleware(CountRequests, engine=remote)  # outermost: a drain waits for every answer
    live.start()  # the ingress lives as long as its process: the watcher is a daemon thread
    return app


_INGRESS: list[Any] = []  # the ingress replica's RemoteEngine, once its app is built (in that process)


def drain_ingress() -> tuple[int, float]:
    """In the ingress process: stop taking requests; (requests still being answered, seconds since
    the last arrived)."""
    states = [remote.drain() for remote in _INGRESS]
    return sum(n for n, _ in states), min((quiet for _, quiet in states), default=float("inf"))


def replica_cpus(node_cpus: list[float], replicas: int, asked: int | None = None) -> float:
    """The CPUs each replica reserves: `asked` (--replica-cpus), checked against the nodes, or the
    cluster's whole CPUs split evenly, no more per replica than lets all N fit on the nodes (less
    than one each when there are more replicas than CPUs). Ray sets a replica's OMP_NUM_THREADS to
    this (at least 1): a replica that reserves none gets one thread, whatever the node has."""
    whole = [int(c) for c in node_cpus if c >= 1]
    if not whole:
        raise ConfigError("the Ray cluster has no node with a CPU")

    def fit(per: int) -> int:
        return sum(c // per for c in whole)

    if asked is not None:
        if asked < 1:
            raise ConfigError(f"--replica-cpus must be at least 1, got {asked}")
        if fit(asked) < replicas:
            raise ConfigError(
                f"--replicas {replicas} with --replica-cpus {asked} do not fit the Ray cluster's nodes "
                f"({', '.join(map(str, whole))} CPUs); ask for fewer of either"
            )
        return float(asked)
    total = sum(whole)
    if total < replicas:
        return int(100 * total / replicas) / 100  # shares of a core: one thread each
    per = total // replicas
    while fit(per) < replicas:
        per -= 1
    return float(per)


def deployment_graph(
    opts: ServeOptions, replicas: int, load: dict[str, float] | None = None, cpus: float = 1.0
) -> Any:
    """The Ray Serve application: the ingress, bound to the N replica deployments it relays to, each
    reserving `cpus` (`replica_cpus`)."""
    from ray import serve  # deferred: loads ray

    replica: Any = serve.deployment(
        ReplicaServer,
        ray_actor_options={"num_cpus": cpus},  # and Ray sets OMP_NUM_THREADS to it
        max_ongoing_requests=opts.engine.max_queue + opts.engine.max_batch,
        graceful_shutdown_timeout_s=30,
        health_check_period_s=5,
    )
    bound = [replica.options(name=replica_name(i)).bind(i, opts) for i in range(replicas)]

    def builder() -> Any:
        return build_ingress_app(opts, replicas, load)

    class Ingress:
        def __init__(self, *replica_handles: Any) -> None:
            self.replica_handles = replica_handles  # bound so that Serve deploys them with the app

        def drain(self) -> tuple[int, float]:
            """Refuse new requests (503); (requests in flight, seconds since the last arrived)."""
            return drain_ingress()

    ingress: Any = serve.deployment(
        serve.ingress(builder)(Ingress),
        name="ingress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, 4 * opts.engine.max_queue * replicas),
        graceful_shutdown_timeout_s=30,
    )
    return ingress.bind(*bound)


DRAIN_S = 30.0  # what SIGTERM waits for in-flight requests, as `wallbreak serve` does
QUIET_S = 1.0  # a drain ends once no request has reached the ingress for this long


def _drain(ingress: Any) -> None:
    """New requests get a 503 and in-flight ones finish (up to DRAIN_S) before Serve shuts down: its
    own shutdown closes the proxy's connections at once, in-flight answers and all. It waits for a
    quiet second too, so that a request the proxy took just before the signal gets its 503 rather
    than a closed connection."""
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline:
        try:
            in_flight, quiet_s = ingress.drain.remote().result(timeout_s=5)
            if in_flight == 0 and quiet_s >= QUIET_S:
                time.sleep(0.5)  # the last answers' bytes are still on their way through the proxy
                return
        except Exception as e:  # the ingress is gone: nothing is left to wait for
            log.warning("draining the ingress failed (%s); shutting down", e)
            return
        time.sleep(0.1)


def serve_ray(
    opts: ServeOptions,
    address: str | None,
    replicas: int,
    expert_load: Path | None = None,
    cpus: int | None = None,
) -> None:
    """Deploy on the local Ray (address None: start one on 127.0.0.1) or a cluster, then block.
    `expert_load`: measured requests per expert for the initial spread (`placement.read_load`);
    `cpus`: what each replica reserves (None: `replica_cpus` splits the cluster's)."""
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    try:
        import ray  # deferred: loads ray
        from ray import serve  # deferred: loads ray
    except ImportError:
        raise ConfigError("--ray needs Ray Serve: pip install 'wallbreak[ray]'") from None
    root = Path(opts.bundle) if opts.bundle is not None else ensure_default_bundle()
    load = read_load(expert_load, Bundle.open(root, lenient=True).names) if expert_load else None
    # Resolved here, in the driver: the ingress runs in a Ray worker, whose environment may differ.
    api_key, admin_key = opts.keys()
    opts = dataclasses.replace(opts, bundle=root.resolve(), api_key=api_key, admin_key=admin_key)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.set())
    try:
        nodes = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        per = replica_cpus(nodes, replicas, cpus)
        # Said before the deploy: /health may answer before serve.run returns.
        said = f"wallbreak: deploying {replicas} replica(s) of {per:g} CPU(s) each"
        print(said, file=sys.stderr, flush=True)
        serve.start(http_options={"host": opts.host, "port": opts.port})
        serve.run(deployment_graph(opts, replicas, load, per), name=APP, route_prefix="/")
        print(f"wallbreak: serving on http://{opts.host}:{opts.port}/v1 through Ray Serve "
              "(model 'coe' routes)", file=sys.stderr, flush=True)  # fmt: skip
        stop.wait()
        print("wallbreak: draining in-flight requests", file=sys.stderr, flush=True)
        _drain(serve.get_app_handle(APP))
    finally:
        serve.shutdown()  # replicas finish their in-flight requests (graceful_shutdown_timeout_s)
        ray.shutdown()
