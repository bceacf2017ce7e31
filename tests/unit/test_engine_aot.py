"""The ahead-of-time compiled decode step (`engine.aot`): built once per architecture by a child
process, the same tokens as eager across expert switches and block growth, reused by a later
engine without building, rebuilt when its file is damaged, and a clean fall back to eager."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_engine_compiled import PROMPTS, serve, wait_ready

from helpers import make_engine, make_tiny_llama_folder
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.engine import Engine, aot
from wallbreak.coe.engine import compiled as compiled_mod
from wallbreak.coe.engine.kv import KVCache
from wallbreak.coe.engine.step import forward, run_step
from wallbreak.coe.tiers.device import load_standalone


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WALLBREAK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def packages(cache: Path) -> list[Path]:
    return sorted((cache / "aot").glob("*.pt2"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Packages built once for this module: a test that builds publishes what it built here, and a
    test that only needs a package copies it from here (or builds it here first, run alone)."""
    return tmp_path_factory.mktemp("aot-store")


def seed(cache: Path, store: Path) -> None:
    """Copy every package in the store into `cache` (what an earlier engine on this machine built)."""
    aot.private_dir(cache / "aot")
    for f in store.glob("*.pt2*"):
        shutil.copy2(f, cache / "aot" / f.name)


@pytest.fixture(scope="module")
def four_llamas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four experts of one architecture, the tiny Llama that `arch_bundle_dir` holds too, so the
    packages one case of a test builds serve the other."""
    from wallbreak.coe.bundle.importers import import_expert

    root = tmp_path_factory.mktemp("four-llamas")
    for i in range(4):
        import_expert(make_tiny_llama_folder(root / f"hf{i}", seed=10 + i), f"llama-{i}", root / "bundle")
    return root / "bundle"


def publish(cache: Path, store: Path) -> None:
    for f in (cache / "aot").glob("*.pt2*"):
        if not (store / f.name).exists():
            shutil.copy2(f, store / f.name)


def provide(store: Path, bundle: Path, expert: str, parts: tuple[str, ...] = ("decode",)) -> list[Path]:
    """The expert's packages in the current cache: copied from the store, built into it if missing."""
    key = Bundle.open(bundle).expert(expert).layout_key
    out = []
    for part in parts:
        path = aot.package_path(key, part)
        aot.private_dir(path.parent)
        stored = store / path.name
        if not stored.exists():
            aot.build(bundle, expert, path, part)
            for f in (path, aot.seal_path(path)):
                shutil.copy2(f, store / f.name)
        else:
            for f in (stored, aot.seal_path(stored)):
                shutil.copy2(f, path.parent / f.name)
        out.append(path)
    return out


@pytest.mark.parametrize("bundle", ["four_llamas", "arch_bundle_dir"])
def test_ahead_of_time_step_gives_eager_tokens_across_switches(
    bundle: str, request: pytest.FixtureRequest, cache: Path, store: Path
) -> None:
    """Four experts sharing one package, then two architectures (whose Llama package the first case
    built: only the Gemma-3 one is built here)."""
    path: Path = request.getfixturevalue(bundle)
    seed(cache, store)
    eager, tiers_e = make_engine(path, compile="off")
    eager.start()
    comp, tiers_c = make_engine(path, compile="all")
    comp.start()
    try:
        experts = eager.experts
        jobs = [(experts[i % len(experts)], p) for i, p in enumerate(PROMPTS)]
        want = serve(eager, jobs, 12, together=False)  # the 70-token prompt grows its block past 64+
        for e in experts:
            wait_ready(comp, e)
            wait_prefill(comp, e)
        assert all(isinstance(comp.steps.aot[k], aot.AotStep) for k in set(comp.layouts.values()))
        before = comp.steps.compiled_steps
        prefills = comp.steps.compiled_prefills
        assert serve(comp, jobs, 12, together=False) == want  # one row each: the compiled step
        assert serve(comp, jobs[::-1], 12, together=False) == want[::-1]
        assert comp.steps.compiled_steps - before >= 2 * 11 * len(jobs)
        assert comp.steps.compiled_prefills - prefills == 2 * len(jobs)  # fp32: from 2 tokens
        assert comp.stats.switches >= len(experts)
        # a decode and a prefill package per architecture, however many experts share it
        assert len(packages(cache)) == 2 * len(set(comp.layouts.values()))
        publish(cache, store)
    finally:
        for eng, tiers in ((eager, tiers_e), (comp, tiers_c)):
            eng.stop(timeout=5)
            tiers.close()


def test_a_later_engine_reuses_the_package_and_a_damaged_one_is_rebuilt(
    tmp_path: Path,
    cache: Path,
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from wallbreak.coe.bundle.importers import import_expert

    bundle = tmp_path / "b"
    import_expert(make_tiny_llama_folder(tmp_path / "hf", seed=3), "l8", bundle, dtype="int8")
    eager, tiers_e = make_engine(bundle, compile="off")
    eager.start()
    try:
        want = serve(eager, [("l8", PROMPTS[0])], 6, together=False)
    finally:
        eager.stop(timeout=5)
        tiers_e.close()

    builds: list[str] = []
    real_build = aot.build_in_child

    def counted(root: Path, expert: str, out: Path, **kw: object) -> None:
        builds.append(f"{expert}:{kw['part']}")
        real_build(root, expert, out, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(aot, "build_in_child", counted)

    def serve_compiled() -> list[list[int]]:
        eng, tiers = make_engine(bundle, compile="on")
        eng.start()
        try:
            wait_ready(eng, "l8")
            wait_prefill(eng, "l8")
            before = eng.steps.compiled_steps, eng.steps.compiled_prefills
            got = serve(eng, [("l8", PROMPTS[0])], 6, together=False)
            assert eng.steps.compiled_steps > before[0] and eng.steps.compiled_prefills > before[1]
            return got
        finally:
            eng.stop(timeout=5)
            tiers.close()

    first = serve_compiled()
    assert builds == ["l8:decode", "l8:prefill"] and len(packages(cache)) == 2
    publish(cache, store)
    # int8 computes in bf16, where fused kernels round differently: the first tokens must agree
    assert first[0][:3] == want[0][:3]
    assert serve_compiled() == first and len(builds) == 2  # the second engine built nothing
    aot.package_path(Bundle.open(bundle).expert("l8").layout_key).write_bytes(b"not a package")
    with caplog.at_level(logging.WARNING, logger="wallbreak.coe.engine.compiled"):
        assert serve_compiled() == first
    assert builds == ["l8:decode", "l8:prefill", "l8:decode"]  # the damaged one only
    said = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert len(said) == 1 and "does not match its checksum" in said[0], said


def test_a_build_that_fails_leaves_the_expert_eager_with_one_warning(
    synth_bundle_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the build process exited 1: no C++ compiler here")

    monkeypatch.setattr(aot, "build_in_child", broken)
    eng, tiers = make_engine(synth_bundle_dir, compile="all")
    eng.start()
    try:
        expert = eng.experts[0]
        with caplog.at_level(logging.WARNING, logger="wallbreak.coe.engine.compiled"):
            first = serve(eng, [(expert, PROMPTS[0])], 8, together=False)
            key = eng.layouts[expert]
            for _ in range(600):
                if eng.steps.state.get(key) != "compiling":
                    break
                serve(eng, [(expert, PROMPTS[0])], 1, together=False)
            again = serve(eng, [(expert, PROMPTS[0])], 8, together=False)
        assert eng.steps.state[key] == "eager" and first == again
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no C++ compiler here" in warnings[0]
    finally:
        eng.stop(timeout=5)
        tiers.close()


def test_the_child_reports_why_a_build_failed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"exited 1: .*no_such_bundle"):
        aot.build_in_child(tmp_path / "no_such_bundle", "x", tmp_path / "out.pt2", timeout=300)
    assert not (tmp_path / "out.pt2").exists()


def test_the_package_is_keyed_by_layout_and_torch(cache: Path) -> None:
    a, b = aot.package_path("aaaa"), aot.package_path("bbbb")
    assert a != b and a.parent == b.parent == cache / "aot"
    assert aot.package_path("aaaa") == a
    assert aot.package_path("aaaa", "prefill") not in (a, b) and aot.package_path("aaaa", "decode") == a
    assert compiled_mod.CompiledSteps("on", None).backend_for(torch.nn.Linear(2, 2)) == "dynamo"
    assert compiled_mod.CompiledSteps("on", cache).backend_for(torch.nn.Linear(2, 2)) == "aot"
    with pytest.raises(Exception, match="choose from auto, aot, dynamo"):
        compiled_mod.CompiledSteps("on", cache, backend="fast")


def test_bundle_compile_names_few_experts_and_counts_many() -> None:
    from wallbreak.cli.bundle import _listed

    assert _listed(["a", "b"]) == "a, b"
    many = [f"smol-{i:03d}" for i in range(150)]
    assert _listed(many) == "150 experts (smol-000 ... smol-149)"


def test_bundle_compile_builds_ahead_of_serving(
    tmp_path: Path, cache: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wallbreak.cli import main
    from wallbreak.coe.bundle.importers import import_expert

    bundle = tmp_path / "b"
    import_expert(make_tiny_llama_folder(tmp_path / "hf", seed=4), "l4", bundle, dtype="int4")
    assert main(["bundle", "compile", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "l4: built the decode step" in out and "l4: built the prefill step" in out
    assert len(packages(cache)) == 2  # int4: a compiled prefill too
    publish(cache, store)
    assert torch.is_grad_enabled()  # building in this process left its autograd state alone
    assert main(["bundle", "compile", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "l4: decode already built" in out and "l4: prefill already built" in out
    assert main(["bundle", "compile", str(bundle), "--experts", "nope"]) != 0
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # the server finds it: ready at once, no build process
    eng, tiers = make_engine(bundle, compile="auto")
    eng.start()
    try:
        wait_ready(eng, "l4")
        wait_prefill(eng, "l4")
        assert not eng.steps.builds
    finally:
        eng.stop(timeout=5)
        tiers.close()


def wait_prefill(eng: Engine, expert: str) -> int:
    """After `wait_ready`: wait until the expert's compiled prefill is loaded; its shortest chunk."""
    key = eng.layouts[expert]
    deadline = time.monotonic() + 600
    while (shortest := eng.steps.prefill_from(key)) is None:
        assert time.monotonic() < deadline, "building the prefill took over 10 minutes"
        time.sleep(0.2)
    return shortest


def test_the_compiled_prefill_serves_compact_prompts_as_eager_does(
    tmp_path: Path, cache: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4 (some layers dense in the package, some through the kernel): one row's chunks through
    the package, shorter chunks eagerly, several prompts admitted together each prefilled alone."""
    from wallbreak.coe.bundle.importers import import_expert

    monkeypatch.setitem(aot.PREFILL_FROM, "int4", 8)  # reached by prompts a tiny test can afford
    bundle = tmp_path / "b"
    import_expert(make_tiny_llama_folder(tmp_path / "hf", seed=6), "p", bundle, dtype="int4")
    provide(store, bundle, "p", aot.PARTS)  # what serving would build first: its building is tested above
    # 40 tokens: chunks of 32 and 8; 3 tokens: below the shortest chunk, eager; 70: 32, 32, and 6 eagerly
    prompts = [("p", list(range(5, 45))), ("p", [40, 41, 42]), ("p", list(range(100, 170)))]
    eager, tiers_e = make_engine(bundle, compile="off", prefill_chunk=32)
    eager.start()
    comp, tiers_c = make_engine(bundle, compile="on", prefill_chunk=32)
    comp.start()
    try:
        want = serve(eager, prompts, 8, together=False)
        wait_ready(comp, "p")
        assert wait_prefill(comp, "p") == 8
        before = comp.steps.compiled_prefills
        alone = serve(comp, prompts, 8, together=False)
        assert comp.steps.compiled_prefills - before == 2 + 2
        together = serve(comp, prompts, 8, together=True)
        # admitted together: the 70-token prompt alone (runner.ALONE_FROM), the two short ones padded
        # into one batch, eagerly
        summary = comp.compile_summary()  # what /health shows
        assert summary["prefill_compiled"] == ["p"] and summary["compiled_prefills"] == before + 2 + 2 + 2
        # bf16 matmuls round otherwise than the int4 kernel: the first tokens must agree
        assert [t[:3] for t in alone] == [t[:3] for t in together] == [t[:3] for t in want]
        assert len(packages(cache)) == 2  # the decode step and the prefill
    finally:
        for eng, tiers in ((eager, tiers_e), (comp, tiers_c)):
            eng.stop(timeout=5)
            tiers.close()
    # The package's logits against eager's, for a prompt in one chunk and in two.
    model = load_standalone(Bundle.open(bundle), "p")
    package = aot.AotStep(aot.package_path(Bundle.open(bundle).expert("p").layout_key, "prefill"))
    for ids in (torch.arange(5, 45)[None], torch.arange(100, 170)[None]):
        got, ref = KVCache.for_model(model), KVCache.for_model(model)
        for c in (got, ref):
            c.open_rows(1)
        with torch.no_grad():
            logits = [package(model, ids[:, :32], got), package(model, ids[:, 32:], got)][-1]
            expect = forward(model, ids, ref)[:, -1]
        assert got.lengths == ref.lengths == [ids.shape[1]]
        torch.testing.assert_close(logits.float(), expect.float(), rtol=0.05, atol=0.05)


def test_one_prefill_package_serves_every_expert_of_its_architecture(
    tmp_path: Path, cache: Path, store: Path
) -> None:
    """Two int8 experts of one architecture share a package; each call reads the weights of the
    model it is given (the loader is pointed again when they change), never the last one's."""
    from wallbreak.coe.bundle.importers import import_expert

    bundle = tmp_path / "b"
    for seed, name in ((7, "a"), (8, "b")):
        import_expert(make_tiny_llama_folder(tmp_path / name, seed=seed), name, bundle, dtype="int8")
    opened = Bundle.open(bundle)
    assert opened.expert("a").layout_key == opened.expert("b").layout_key
    (path,) = provide(store, bundle, "a", ("prefill",))
    package = aot.AotStep(path)
    models = {n: load_standalone(opened, n) for n in ("a", "b")}
    ids = torch.arange(10, 50)[None]
    for name in ("a", "b", "a", "b"):
        model = models[name]
        got, ref = KVCache.for_model(model), KVCache.for_model(model)
        for c in (got, ref):
            c.open_rows(1)
        with torch.no_grad():
            logits = package(model, ids, got)
            expect = forward(model, ids, ref)[:, -1]
        torch.testing.assert_close(logits.float(), expect.float(), rtol=0.05, atol=0.05)
    other = KVCache.for_model(models["a"])  # the experts differ enough for the test to tell them apart
    other.open_rows(1)
    with torch.no_grad():
        a_logits = forward(models["a"], ids, other)[:, -1]
    assert not torch.allclose(a_logits.float(), expect.float(), atol=0.5)


def test_only_a_sealed_package_of_this_user_that_computes_the_eager_logits_is_loaded(
    tmp_path: Path, cache: Path, store: Path
) -> None:
    """A package is a native library: one whose bytes changed since its builder sealed it, one
    others could have written, one in a cache directory others can write, or one that computes
    other logits than the eager forward (stale: built for another configuration) is refused."""
    import json
    import os

    from safetensors.torch import load_file, save_file

    from wallbreak.coe.bundle.importers import import_expert

    bundle = tmp_path / "b"
    hf = make_tiny_llama_folder(tmp_path / "hf", seed=4)
    weights = load_file(hf / "model.safetensors")
    weights["lm_head.weight"] *= 300  # a peaked next-token distribution, as a trained model has
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    import_expert(hf, "m", bundle)
    opened = Bundle.open(bundle)
    (path,) = provide(store, bundle, "m")  # sealed by its builder; the copy keeps bytes and mode
    model = load_standalone(opened, "m")
    aot.verify(path)
    aot.AotStep(path).check(model)
    assert oct(os.stat(path.parent).st_mode & 0o777) == "0o700"

    pristine = path.read_bytes()
    damaged = bytearray(pristine)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(aot.StalePackage, match="does not match its checksum"):
        aot.verify(path)
    path.write_bytes(pristine)
    os.chmod(path, 0o664)
    with pytest.raises(aot.StalePackage, match="writable by others"):
        aot.verify(path)
    os.chmod(path, 0o644)
    seal = aot.seal_path(path)
    sealed = seal.read_text()
    seal.unlink()
    with pytest.raises(aot.StalePackage, match="no checksum"):
        aot.verify(path)
    seal.write_text(sealed)
    os.chmod(path.parent, 0o777)
    with pytest.raises(aot.UnsafeCache, match="chmod go-w"):
        aot.verify(path)
    os.chmod(path.parent, 0o700)
    aot.verify(path)

    # Stale: the same weights' shapes, another norm epsilon, which the compiler baked into the code.
    other = tmp_path / "hf2"
    shutil.copytree(tmp_path / "hf", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1.0
    (other / "config.json").write_text(json.dumps(cfg))
    import_expert(other, "m2", bundle)
    model2 = load_standalone(Bundle.open(bundle), "m2")
    with pytest.raises(aot.StalePackage, match="predicts otherwise than the eager forward"):
        aot.AotStep(path).check(model2)


def test_a_compiled_step_for_two_rows_serves_batches_of_two_as_eager_does(
    four_llamas: Path, cache: Path, store: Path
) -> None:
    """`--compile-rows 2`: after the one-row step (and prefill), a package for batches of exactly two
    rows is built, checked against eager on two different rows, and serves two-row steps; a batch
    of three is cut into runs of two and one."""
    seed(cache, store)
    expert = "llama-0"
    jobs = [(expert, [5, 6, 7, 8]), (expert, [90, 91, 92, 93])]
    eager, tiers_e = make_engine(four_llamas, compile="off")
    eager.start()
    comp, tiers_c = make_engine(four_llamas, compile="on", compile_rows=(2,))
    comp.start()
    try:
        want = serve(eager, jobs, 12, together=True)
        wait_ready(comp, expert)
        key = comp.layouts[expert]
        deadline = time.monotonic() + 600
        while 2 not in comp.steps.row_steps.get(key, {}):
            assert comp.compile_summary()["warming"] == 1  # the loader is still at work
            assert time.monotonic() < deadline, "building the two-row step took over 10 minutes"
            time.sleep(0.5)
        while comp.compile_summary()["warming"]:  # its thread ends just after the last package
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert serve(comp, jobs, 12, together=True) == want
        assert comp.steps.compiled_row_steps > 0
        assert comp.compile_summary()["row_steps"][expert] == [2]
        # Both paths of two rows were timed while serving (each warms up on 4 steps), and one runs.
        two = comp.compile_summary()["row_paths"][key]["sizes"]["2"]
        assert two["compiled_ms"] > 0 and two["eager_ms"] > 0 and two["runs"] in ("compiled", "eager")
        # Three rows, with a package for two: cut into 2 + 1 over views of the batch's cache, the
        # tokens eager gives, and timed against eager as a size of its own.
        three = [*jobs, (expert, [40, 41, 42, 43])]
        want3 = serve(eager, three, 12, together=True)
        assert serve(comp, three, 12, together=True) == want3
        assert comp.compile_summary()["row_paths"][key]["sizes"]["3"]["compiled_ms"] > 0
        # Fed a column of a wider batch (a view whose rows are 3 apart), each row still gets its
        # own token: the compiled code checks no strides, and it once read row 0's next column.
        step, model = comp.steps.row_steps[key][2], load_standalone(Bundle.open(four_llamas), expert)
        wide = torch.tensor([[5, 6, 7], [90, 91, 92]])
        viewed, packed, ref = (KVCache.for_model(model) for _ in range(3))
        for c in (viewed, packed, ref):
            c.open_rows(2)
        for i in range(3):
            got = step(model, wide[:, i : i + 1], viewed)
            assert torch.equal(got, step(model, wide[:, i : i + 1].clone(), packed))
            assert torch.equal(got.argmax(-1), run_step(model, wide[:, i : i + 1], ref, None).argmax(-1))
        assert aot.package_path(key, "decode-rows2") in packages(cache)
        publish(cache, store)
        # `built` (the default) serves the row packages an earlier build left in the cache and
        # builds none; `none` serves none.
        before = {p: p.stat().st_mtime_ns for p in packages(cache)}
        for rows, sizes in (("built", [2]), ("none", [])):
            later, tiers_l = make_engine(four_llamas, compile="on", compile_rows=rows)
            later.start()
            try:
                wait_ready(later, expert)
                while later.compile_summary()["warming"]:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                assert later.compile_summary()["row_steps"].get(expert, []) == sizes
                assert serve(later, three, 12, together=True) == want3
            finally:
                later.stop(timeout=5)
                tiers_l.close()
        assert {p: p.stat().st_mtime_ns for p in packages(cache)} == before
    finally:
        for eng, tiers in ((eager, tiers_e), (comp, tiers_c)):
            eng.stop(timeout=5)
            tiers.close()
