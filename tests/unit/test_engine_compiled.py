"""The serving engine's compiled decode step: same tokens as eager, no recompiles across switches,
continuous batching intact, and a clean fall back to eager."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from helpers import make_engine, run
from wallbreak.coe.engine import Engine
from wallbreak.coe.engine import compiled as compiled_mod

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [90, 91, 92, 93], [3] * 70]  # the last crosses 64 columns


def serve(eng: Engine, jobs: list[tuple[str, list[int]]], n: int, together: bool) -> list[list[int]]:
    if together:
        cs = [run(eng, e, p, n) for e, p in jobs]
    else:
        cs = []
        for e, p in jobs:
            cs.append(run(eng, e, p, n))
            assert cs[-1].done.wait(120)
    for c in cs:
        assert c.done.wait(120) and c.finish == "length", c.error
    return [c.tokens for c in cs]


def wait_ready(eng: Engine, expert: str) -> None:
    """Serve one request (its first decode step starts the background compile), then wait, idle so
    the compile has the cores, until the step is ready."""
    key = eng.layouts[expert]
    serve(eng, [(expert, [1, 2, 3])], 2, together=False)
    deadline = time.monotonic() + 600
    while eng.steps.state.get(key) != "ready":
        assert eng.steps.state.get(key) != "eager", "the compiled step gave up"
        assert time.monotonic() < deadline, "compiling took over 10 minutes"
        time.sleep(0.2)


@pytest.mark.parametrize("bundle", ["synth_bundle_dir", "arch_bundle_dir"])
def test_compiled_decode_gives_eager_tokens_and_never_recompiles_on_switch(
    bundle: str, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(bundle)
    eager, tiers_e = make_engine(path, compile="off")
    eager.start()
    comp, tiers_c = make_engine(path, compile="all", compile_backend="dynamo")
    comp.start()
    try:
        experts = eager.experts
        jobs = [(experts[i % len(experts)], p) for i, p in enumerate(PROMPTS)]
        want_alone = serve(eager, jobs, 12, together=False)
        want_together = serve(eager, jobs, 12, together=True)
        assert want_together == want_alone
        for e in experts:
            wait_ready(comp, e)
        before = comp.steps.compiled_steps
        # Alone and together, every expert switched in and out of the slots several times.
        assert serve(comp, jobs, 12, together=False) == want_alone
        assert serve(comp, jobs, 12, together=True) == want_alone
        assert serve(comp, jobs[::-1], 12, together=True) == want_alone[::-1]
        # Rows joining a running batch (merge), leaving it early (select), and a row whose context
        # crosses the block's capacity while decoding (growth): none of it may recompile.
        e = experts[0]
        long = run(comp, e, [7] * 60, 20)
        while len(long.tokens) < 3:
            assert not long.done.wait(0.01), long.error
        short = [run(comp, e, p, n) for p, n in ((PROMPTS[1], 4), (PROMPTS[2], 12))]
        for c in (long, *short):
            assert c.done.wait(120) and c.finish == "length", c.error
        want = serve(eager, [(e, [7] * 60), (e, PROMPTS[1]), (e, PROMPTS[2])], 20, together=False)
        assert [long.tokens, short[0].tokens, short[1].tokens] == [want[0], want[1][:4], want[2][:12]]
        assert comp.stats.switches >= len(experts)
        assert comp.steps.compiled_steps > before
        assert comp.steps.recompiles == 0
    finally:
        for eng, tiers in ((eager, tiers_e), (comp, tiers_c)):
            eng.stop(timeout=5)
            tiers.close()


def test_a_compiled_step_that_fails_falls_back_to_eager_with_one_warning(
    synth_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> object:
        def fn(*args: object, **kwargs: object) -> object:
            raise RuntimeError("no C++ compiler here\nsecond line")

        return fn

    monkeypatch.setattr(compiled_mod, "_compiled_decode", broken)
    eng, tiers = make_engine(synth_bundle_dir, compile="all", compile_backend="dynamo")
    eng.start()
    try:
        expert = eng.experts[0]
        with caplog.at_level(logging.WARNING, logger="wallbreak.coe.engine.compiled"):
            first = serve(eng, [(expert, PROMPTS[0])], 8, together=False)
            deadline = time.monotonic() + 60
            while eng.steps.state.get(eng.layouts[expert]) == "compiling" and time.monotonic() < deadline:
                time.sleep(0.05)
            again = serve(eng, [(expert, PROMPTS[0])], 8, together=False)
        assert eng.steps.state[eng.layouts[expert]] == "eager"
        assert first == again
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert (
            len(warnings) == 1 and "no C++ compiler here" in warnings[0] and "second line" not in warnings[0]
        )
    finally:
        eng.stop(timeout=5)
        tiers.close()


def test_which_experts_each_policy_compiles_on_the_cpu(tmp_path: Path) -> None:
    import torch

    from helpers import make_tiny_llama_folder
    from wallbreak.coe.bundle.importers import import_expert
    from wallbreak.coe.bundle.manifest import Bundle
    from wallbreak.coe.tiers.device import load_standalone

    import_expert(make_tiny_llama_folder(tmp_path / "hf"), "l8", tmp_path / "b", dtype="int8")
    int8 = load_standalone(Bundle.open(tmp_path / "b"), "l8")
    fp32 = torch.nn.Linear(2, 2)
    bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16)
    policy = {name: compiled_mod.CompiledSteps(name) for name in compiled_mod.POLICIES}
    # no bundle to build from, so only tracing in-process: that stalls a small CPU
    assert not any(policy["auto"].wanted(m) for m in (int8, fp32, bf16))
    # with a bundle, every expert's ahead-of-time step at one row (a build process; every form
    # measured faster so)
    auto = compiled_mod.CompiledSteps("auto", tmp_path / "b")
    assert all(auto.wanted(m) and auto.max_rows(m) == 1 for m in (int8, fp32))
    assert auto.backend_for(fp32) == "aot"
    assert all(policy["on"].wanted(m) and policy["on"].max_rows(m) == 1 for m in (int8, fp32, bf16))
    assert all(policy["all"].wanted(m) for m in (int8, fp32, bf16)) and policy["all"].max_rows(fp32) > 8
    assert not any(policy["off"].wanted(m) for m in (int8, fp32, bf16))
    with pytest.raises(Exception, match="choose from auto, on, all, off"):
        compiled_mod.CompiledSteps("fast")
