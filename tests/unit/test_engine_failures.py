"""The engine's failure rules: a request being admitted always gets an answer, a load that fails
for a passing reason is retried (the expert is not marked broken), and one KV budget holds for the
whole engine, paused batches included."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import make_engine, run
from wallbreak.coe.engine import SamplingParams
from wallbreak.coe.engine.runner import Batch
from wallbreak.coe.engine.sampling import sample
from wallbreak.errors import BundleError, CapacityError


def test_tiny_temperature_and_top_p_sample_as_greedy() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    for p in (SamplingParams(temperature=1e-40), SamplingParams(top_p=1e-300), SamplingParams(temperature=0)):
        assert sample(logits, p, torch.Generator().manual_seed(1)) == 1


def test_a_request_being_admitted_gets_an_answer_when_admission_breaks(
    synth_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine bug during admission fails the requests taken from the queue, with an error event;
    none is left waiting for ever, and the engine serves the next request."""
    eng, tiers = make_engine(synth_bundle_dir)
    real = Batch.admit
    broken = threading.Event()
    broken.set()

    def admit(self: Batch, model: Any, reqs: Any) -> None:
        if broken.is_set():
            raise RuntimeError("injected engine bug")
        real(self, model, reqs)

    monkeypatch.setattr(Batch, "admit", admit)
    expert = eng.experts[0]
    cs = [run(eng, expert, [1, 2, 3], 5) for _ in range(3)]
    eng.start()
    try:
        for c in cs:
            assert c.done.wait(30) and c.finish == "error" and "internal error" in (c.error or "")
        broken.clear()
        after = run(eng, expert, [1, 2, 3], 5)
        assert after.done.wait(30) and after.finish == "length"
        assert expert not in eng.broken
    finally:
        eng.stop(timeout=5)
        tiers.close()


@pytest.mark.parametrize(
    "error",
    [
        CapacityError("timed out waiting for expert to load"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError(),
    ],
    ids=["load-timeout", "out-of-memory", "host-memory"],
)
def test_a_passing_load_failure_is_retried_not_marked_broken(
    synth_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    eng, tiers = make_engine(synth_bundle_dir)
    monkeypatch.setattr("wallbreak.coe.engine.engine.RETRY_FIRST_S", 0.05)
    real = tiers.acquire
    fails = {"left": 2}
    seen: list[dict[str, Any]] = []

    def acquire(expert: str, timeout: float | None = None) -> Any:
        if fails["left"]:
            fails["left"] -= 1
            raise error
        seen.append(eng.retry_summary())
        return real(expert, timeout)

    monkeypatch.setattr(tiers, "acquire", acquire)
    expert = eng.experts[0]
    eng.start()
    try:
        c = run(eng, expert, [1, 2, 3], 5)
        assert c.done.wait(30) and c.finish == "length", c.error
        assert seen[0][expert]["attempts"] == 2  # /health showed the retry state meanwhile
        assert expert not in eng.broken and not eng.retry_summary()
    finally:
        eng.stop(timeout=5)
        tiers.close()


def test_a_lasting_load_failure_marks_the_expert_unavailable_without_paths(
    synth_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng, tiers = make_engine(synth_bundle_dir)

    def acquire(expert: str, timeout: float | None = None) -> Any:
        raise BundleError(
            f"expert {expert!r}: tensor 'w' has shape [2], the skeleton wants [3] in /srv/b/x.blob"
        )

    monkeypatch.setattr(tiers, "acquire", acquire)
    expert = eng.experts[0]
    eng.start()
    try:
        c = run(eng, expert, [1, 2, 3], 5)
        assert c.done.wait(30) and c.finish == "error"
        assert "/srv" not in eng.broken[expert] and "x.blob" in eng.broken[expert]
    finally:
        eng.stop(timeout=5)
        tiers.close()


def test_one_kv_budget_for_the_whole_engine_with_preemptions(synth_bundle_dir: Path) -> None:
    """Two experts, preempting each other every few steps; the engine's KV never passes the budget,
    counting the paused batch, and every request finishes (admission waits, it does not fail)."""
    from transformers import AutoConfig

    from wallbreak.coe.bundle.manifest import Bundle
    from wallbreak.coe.engine.runner import kv_bytes_per_row

    bundle = Bundle.open(synth_bundle_dir)
    cfg = dict(bundle.expert(bundle.names[0]).config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    budget = 3 * kv_bytes_per_row(config, torch.float32, 3 + 40) + 1  # three rows, whichever expert
    eng, tiers = make_engine(synth_bundle_dir, kv_budget=budget, max_wait_s=0.02)
    peak = {"held": 0, "reserved": 0}

    class Watch:
        def on_switch(self, expert: str, seconds: float, moved_bytes: int) -> None:
            pass

        def on_step(self, expert: str, batch_size: int) -> None:
            peak["held"] = max(peak["held"], eng.kv_bytes())
            peak["reserved"] = max(peak["reserved"], eng.kv_reserved())

    eng.add_listener(Watch())
    a, b = eng.experts[:2]
    cs = [run(eng, e, [1, 2, 3], 40) for _ in range(4) for e in (a, b)]
    eng.start()
    try:
        assert all(c.done.wait(120) and c.finish == "length" for c in cs), [c.error for c in cs]
    finally:
        eng.stop(timeout=5)
        tiers.close()
    assert eng.stats.switches > 2  # the experts did take turns, with a paused batch holding its cache
    assert 0 < peak["held"] <= budget and peak["reserved"] <= budget


def test_a_request_that_cannot_fit_even_alone_gets_a_400_and_the_next_is_served(
    synth_bundle_dir: Path,
) -> None:
    from transformers import AutoConfig

    from wallbreak.coe.bundle.manifest import Bundle
    from wallbreak.coe.engine.runner import kv_bytes_per_row

    bundle = Bundle.open(synth_bundle_dir)
    cfg = dict(bundle.expert(bundle.names[0]).config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    eng, tiers = make_engine(synth_bundle_dir, kv_budget=2 * kv_bytes_per_row(config, torch.float32, 3 + 5))
    expert = eng.experts[0]
    big, small = run(eng, expert, [1, 2, 3], 1000), run(eng, expert, [1, 2, 3], 5)
    eng.start()
    try:
        assert big.done.wait(30) and big.finish == "error" and "KV budget" in (big.error or "")
        assert small.done.wait(30) and small.finish == "length", small.error
    finally:
        eng.stop(timeout=5)
        tiers.close()


def test_a_blob_removed_under_the_server_is_retried_and_served_once_back(
    synth_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle writer replacing an expert moves its blob; while it is gone the expert is retried
    (its request waits), not marked broken, and it serves once the file is back."""
    import shutil
    import time

    from wallbreak.coe.bundle.manifest import Bundle

    root = tmp_path / "b"
    shutil.copytree(synth_bundle_dir, root)
    monkeypatch.setattr("wallbreak.coe.engine.engine.RETRY_FIRST_S", 0.05)
    eng, tiers = make_engine(root)
    expert = eng.experts[2]
    blob = Bundle.open(root).blob_path(expert)
    aside = tmp_path / "aside.blob"
    blob.rename(aside)
    eng.start()
    try:
        c = run(eng, expert, [1, 2, 3], 5)
        deadline = time.monotonic() + 30
        while expert not in eng.retry_summary() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "replaced or removed" in eng.retry_summary()[expert]["reason"]
        shutil.copyfile(aside, blob)  # back, as a new file
        assert c.done.wait(30) and c.finish == "length", c.error
        assert expert not in eng.broken and not eng.retry_summary()
    finally:
        eng.stop(timeout=5)
        tiers.close()


def test_a_paused_batch_whose_reload_fails_waits_its_backoff() -> None:
    """A paused batch keeps its rows; while its expert's load is in backoff the scheduler does not
    choose it (else the engine would retry the load in a tight loop), and it is chosen again after."""
    from wallbreak.coe.engine.scheduler import Scheduler

    now = [100.0]
    s = Scheduler(clock=lambda: now[0])
    s.hold_until("a", 101.0)
    assert s.choose(None, {"a": 2}) is None
    now[0] = 101.5
    assert s.choose(None, {"a": 2}) == "a"
