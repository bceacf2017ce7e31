"""Residency rules (pins, keep-alive, prefetch never evicting busy experts), the manifest's
generation under a looping writer, and the router learning and forgetting experts incrementally."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import ROUTER_TOPICS, make_tiny_llama_folder, router_prompts, write_jsonl
from wallbreak.coe.bundle.importers import import_expert, synth_bundle
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.bundle.writer import BundleWriter
from wallbreak.coe.tiers import TierConfig, TierManager
from wallbreak.errors import CapacityError


@pytest.fixture(scope="module")
def eight(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    out = tmp_path_factory.mktemp("live-rules") / "b"
    synth_bundle(out, experts=8, params=50_000, seed=11)
    return Bundle.open(out)


def _tiers(bundle: Bundle, host: int, device: int, alias: bool) -> TierManager:
    s = max(e.total_bytes for e in bundle.experts.values())
    cfg = TierConfig(host_budget=host * s, device_budget=device * s, alias_slots=alias, wait_timeout_s=30)
    return TierManager(bundle, cfg)


@pytest.mark.parametrize("alias", [True, False], ids=["alias", "copy"])
def test_pins_survive_a_zipf_workload_over_more_experts_than_fit(eight: Bundle, alias: bool) -> None:
    names = eight.names
    with _tiers(eight, host=4, device=3, alias=alias) as t:
        t.pin(names[7], "device")  # the least popular under Zipf: eviction would take it first
        t.pin(names[6], "host")
        rnd = random.Random(0)
        weights = [1 / (i + 1) for i in range(len(names))]
        stop = threading.Event()
        seen: list[dict] = []

        def watch() -> None:
            while not stop.is_set():
                seen.append(t.snapshot())
                time.sleep(0.001)

        def work(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(60):
                with t.acquire(r.choices(names, weights)[0]):
                    pass

        w = threading.Thread(target=watch)
        w.start()
        workers = [threading.Thread(target=work, args=(rnd.random(),)) for _ in range(3)]
        for th in workers:
            th.start()
        for th in workers:
            th.join()
        stop.set()
        w.join()
        assert t.stats.evictions["device"] > 0 and t.stats.evictions["host"] > 0  # there was pressure
        assert t.where(names[7])["device"] and t.where(names[6])["host"]
        for snap in seen:
            assert snap["host_used"] <= snap["host_budget"] and snap["device_bytes"] <= snap["device_budget"]
            assert any(s["expert"] == names[7] for s in snap["slots"])  # never left the device
            assert names[6] in snap["host"]  # never left host memory


def test_a_pin_that_cannot_fit_is_refused_naming_what_holds_the_space(eight: Bundle) -> None:
    names = eight.names
    with _tiers(eight, host=2, device=2, alias=False) as t:
        t.pin(names[0], "host")
        with pytest.raises(CapacityError, match=rf"pinned: {names[0]}"):
            t.pin(names[1], "host")  # two pinned + room for the largest other: 3 experts, budget 2
        t.pin(names[2], "device")
        with pytest.raises(CapacityError, match=rf"pinned there: {names[2]}.*one must stay"):
            t.pin(names[3], "device")
        assert t.state(names[3])["pinned"] is None  # a refused pin leaves nothing behind
        with pytest.raises(Exception, match="unpin it first"):
            t.unload(names[2])
        assert t.unpin(names[2]) and t.unload(names[2])


def test_prefetch_never_evicts_an_expert_with_work_and_keep_alive_expires(eight: Bundle) -> None:
    a, b, c = eight.names[:3]
    with _tiers(eight, host=2, device=1, alias=True) as t:
        t.load(a, "device")
        t.set_upcoming([], wanted={a})
        assert t.prefetch(b, "device").result() is False  # a has queued work: the prefetch yields
        assert t.where(a)["device"]
        t.set_upcoming([], wanted=set())
        t.set_keep_alive(a, 0.2)
        assert t.prefetch(b, "device").result() is True  # kept alive, but the only candidate
        t.load(c, "host")
        t.set_keep_alive(c, 0.2)
        time.sleep(0.3)
        assert c in t.expire_idle() and t.state(c)["tier"] == "disk"


def test_a_reader_never_sees_a_half_written_manifest(tmp_path: Path) -> None:
    out = tmp_path / "b"
    synth_bundle(out, experts=2, params=50_000, seed=1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        while not stop.is_set():
            try:
                with BundleWriter(out) as w:
                    w.set_router(None)
            except BaseException as e:
                errors.append(e)

    writer = threading.Thread(target=write)
    writer.start()
    gens = []
    try:
        for _ in range(300):
            gens.append(Bundle.open(out).generation)
    finally:
        stop.set()
        writer.join()
    assert not errors
    assert gens == sorted(gens) and gens[-1] > gens[0] > 0


def test_the_router_learns_and_forgets_an_expert_without_a_refit(tmp_path: Path, tiny_bert: Path) -> None:
    from wallbreak.coe.router import FitOptions, Router, fit_router
    from wallbreak.coe.router.incremental import forget_expert, learn_expert

    out = tmp_path / "rb"
    synth_bundle(out, experts=2, params=50_000, names=["alpha", "beta"], seed=1)
    rows = [r for r in router_prompts(8, seed=0) if r[1] != "gamma"]
    fit_router(out, FitOptions(examples=write_jsonl(tmp_path / "t.jsonl", rows), encoder=tiny_bert,
                               methods=("logreg",)), progress=False)  # fmt: skip
    gamma = [p for p, e in router_prompts(8, seed=2) if e == "gamma"]
    import_expert(make_tiny_llama_folder(tmp_path / "g"), "gamma", out, examples=gamma)
    learned = learn_expert(out, "gamma")
    assert learned is not None and learned.labels == ["alpha", "beta", "gamma"]
    router = Router.load(out)
    topic = " ".join(ROUTER_TOPICS["gamma"].split()[:5])
    assert router.route([topic])[0].expert == "gamma"
    assert router.route([" ".join(ROUTER_TOPICS["beta"].split()[:5])])[0].expert == "beta"
    with BundleWriter(out) as w:
        w.remove("alpha")
        forgot = forget_expert(w, "alpha")
    assert forgot is not None and forgot.labels == ["beta", "gamma"]
    meta = Bundle.open(out).router
    assert meta is not None and meta["labels"] == ["beta", "gamma"] and meta["head"]["n_classes"] == 2
    router = Router.load(out)
    assert router.route([topic])[0].expert == "gamma"
    assert np.isfinite(router.scale)
