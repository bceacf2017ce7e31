"""Every serving default, defined once: the CLI, the server, the engine and the benchmarks read them here."""

from __future__ import annotations

import os
from pathlib import Path

HOST = "127.0.0.1"
PORT = 8000
POLICY = "ours"
MAX_BATCH = 16  # sequences per expert batch
MAX_WAIT_S = 5.0  # once a request has waited this long, its expert goes next (3x: preemption)
MAX_QUEUE = 256  # waiting requests before 429
KV_BUDGET = 2 << 30  # bytes of KV cache all batches together may grow to (paused ones too)
MAX_BODY = 4 << 20  # bytes of one HTTP request body (413 past it)
PREFILL_CHUNK = 512  # prompt tokens per prefill forward
DEVICE = "cpu"
REPLICAS = 2  # serve --ray: replica deployments
DIRECT_IO_MODES = ("auto", "on", "off")  # O_DIRECT disk reads: when the blob is not cached, always, never
DIRECT_IO = "auto"
HUGE_PAGES_MODES = ("on", "off")  # transparent huge pages under the host arena (coe/tiers/host.py)
HUGE_PAGES = "on"
COMPILE_POLICIES = ("auto", "on", "all", "off")  # compiled decode steps: see coe/engine/compiled.py
COMPILE = "auto"  # every expert: on CUDA at every batch size; on the CPU at one row, built ahead of time
# Compiled steps for batches of several rows on the CPU (`serve --compile-rows`): the sizes given
# (built if missing), `built` (those `bundle compile --rows` left in the cache; none is built while
# serving, each costing about a minute of both cores) or `none`.
COMPILE_ROWS = "built"
# The default bundle's stored form (`bundle import --dtype`). int8: a quarter of fp32's bytes (so
# 4x the experts per budget, and quicker switches) for +1.4% perplexity on SmolLM2 and none on
# Gemma-3; on the CPU it decodes 1.25-1.4x fp32 at batch 1 (docs/benchmarks.md, "Expert execution").
# int4 is faster still but costs +9.5% (SmolLM2) and +5.0% (Gemma-3) perplexity.
BUNDLE_FORM = "int8"


def cache_dir() -> Path:
    """Where wallbreak keeps what it builds once: the default bundle, ahead-of-time compiled steps."""
    return Path(os.environ.get("WALLBREAK_CACHE", Path.home() / ".cache" / "wallbreak"))


def default_bundle_dir() -> Path:
    """Where the default bundle is built (named by its form, so a change of form builds a new one)."""
    return cache_dir() / f"default-bundle-{BUNDLE_FORM}"
