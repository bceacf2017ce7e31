"""Prometheus metrics of one server: requests, tokens, routing, tiers, switches, queue, batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wallbreak.coe.engine import Engine


class _TierCollector(Collector):
    """Hits, misses and evictions per tier, read from the tier manager at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.tiers.stats
        fam = CounterMetricFamily(
            "wallbreak_tier_events", "tier hits, misses and evictions", labels=["tier", "event"]
        )
        for event, d in (("hit", s.hits), ("miss", s.misses), ("eviction", s.evictions)):
            for tier, n in d.items():
                fam.add_metric([tier, event], n)
        yield fam
        moved = CounterMetricFamily("wallbreak_tier_bytes", "bytes moved between tiers", labels=["path"])
        moved.add_metric(["disk_to_host"], s.bytes_disk_to_host)
        moved.add_metric(["disk_to_host_prefetch"], s.bytes_disk_to_host_prefetch)
        moved.add_metric(["host_to_device"], s.bytes_host_to_device)
        yield moved


class _ExpertCollector(Collector):
    def __init__(self, live: Any) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        tier = GaugeMetricFamily(
            "wallbreak_expert_tier", "1 for the tier each expert's weights are in", labels=["expert", "tier"]
        )
        pinned = GaugeMetricFamily(
            "wallbreak_expert_pinned", "1 where an expert is pinned, by tier", labels=["expert", "tier"]
        )
        for n in self.live.catalog.names:
            try:
                st = self.live.describe(n)
            except Exception:  # removed while we read
                continue
            for t in ("disk", "host", "device"):
                tier.add_metric([n, t], float(st["tier"] == t))
            if st["pinned"]:
                pinned.add_metric([n, st["pinned"]], 1.0)
        yield tier
        yield pinned


class Metrics:
    """The server's Prometheus registry; it listens to the engine for switches and decode steps."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "wallbreak_requests",
            "requests by expert, endpoint and status",
            ["expert", "endpoint", "status"],
            registry=r,
        )
        self.tokens = Counter("wallbreak_tokens", "tokens by expert and kind", ["expert", "kind"], registry=r)
        self.routing = Counter(
            "wallbreak_routing_decisions",
            "router decisions by chosen expert",
            ["expert", "fallback"],
            registry=r,
        )
        self.switch_seconds = Histogram(
            "wallbreak_switch_seconds",
            "time to make an expert ready when the engine switches to it",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch_size = Histogram(
            "wallbreak_batch_size", "sequences per decode step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        queue = Gauge("wallbreak_queue_depth", "requests waiting for admission", registry=r)
        queue.set_function(lambda: float(engine.queue_depth()))
        active = Gauge("wallbreak_active_sequences", "sequences in running or paused batches", registry=r)
        active.set_function(lambda: float(engine.active()))
        kv = Gauge("wallbreak_kv_cache_bytes", "bytes held by the batches' KV caches", registry=r)
        kv.set_function(lambda: float(engine.kv_bytes()))
        self.switch_bytes = Counter(
            "wallbreak_switch_bytes",
            "bytes the engine's switches moved themselves (prefetch excluded)",
            registry=r,
        )
        r.register(_TierCollector(engine))
        engine.add_listener(self)
        self.admin_ops = Counter(
            "wallbreak_admin_operations",
            "admin API operations by kind and result (ok, error, conflict)",
            ["op", "result"],
            registry=r,
        )

    def admin_op(self, op: str, result: str) -> None:
        self.admin_ops.labels(op, result).inc()

    def watch_experts(self, live: Any) -> None:
        """Per expert, at scrape time: its tier (disk, host, device) and its pin (coe/live.py)."""
        self.registry.register(_ExpertCollector(live))

    def on_switch(self, expert: str, seconds: float, moved_bytes: int) -> None:
        self.switch_seconds.observe(seconds)
        self.switch_bytes.inc(moved_bytes)

    def on_step(self, expert: str, batch_size: int) -> None:
        self.batch_size.observe(batch_size)
