"""Samba-CoE's expert count with tiny experts: 150 behind one engine, a host budget of a fifth of
the bundle and room for 8 on the device; a Zipf workload completes, every request answered, and
the budgets are never overcommitted."""

from __future__ import annotations

import random
import threading
import time

import pytest

from helpers import Collector
from wallbreak.coe.bench.serve import zipf_sequence
from wallbreak.coe.bundle.importers import synth_bundle
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.engine import POLICIES, Engine, EngineConfig, Request, SamplingParams
from wallbreak.coe.tiers import TierConfig, TierManager
from wallbreak.coe.tokenization import load_tokenizers

EXPERTS = 150


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    out = tmp_path_factory.mktemp("scale") / "b"
    synth_bundle(out, experts=EXPERTS, params=100_000, seed=5)
    return Bundle.open(out)


@pytest.mark.parametrize("policy", ["ours", "per-expert-lru"])
def test_a_zipf_run_over_150_experts_completes_within_its_budgets(many: Bundle, policy: str) -> None:
    size = max(e.total_bytes for e in many.experts.values())
    total = sum(e.total_bytes for e in many.experts.values())
    tiers = TierManager(many, TierConfig(host_budget=total // 5, device_budget=8 * size, wait_timeout_s=60))
    cfg = EngineConfig(max_batch=8, max_wait_s=0.2, max_queue=512, compile="off", policy=POLICIES[policy])
    eng = Engine(many, tiers, load_tokenizers(many, tiers.entries), cfg)
    seq = zipf_sequence("zipf:1.0", many.names, 300, seed=1)
    seen: list[dict] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(tiers.snapshot())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    eng.start()
    watcher.start()
    try:
        done = []
        rnd = random.Random(0)
        for expert in seq:
            c = Collector()
            prompt = [rnd.randrange(1, 250) for _ in range(4)]
            eng.submit(Request(expert, prompt, SamplingParams(max_tokens=3, ignore_eos=True), c))
            done.append(c)
        for c in done:
            assert c.done.wait(120)
    finally:
        stop.set()
        watcher.join()
        eng.stop(timeout=5)
        tiers.close()
    odd = [(c.finish, c.tokens, c.error) for c in done if c.finish != "length"]
    assert not odd, odd[:3]
    assert len(set(seq)) > 40  # the run reached well past what fits in host memory (30 experts)
    assert tiers.stats.evictions["host"] > 0 and tiers.stats.evictions["device"] > 0
    assert seen
    for snap in seen:
        assert snap["host_used"] <= snap["host_budget"] and snap["device_bytes"] <= snap["device_budget"]
