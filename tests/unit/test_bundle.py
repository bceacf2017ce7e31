"""Bundles: layout, validation, atomic writes, checksums, import."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from wallbreak.coe.bundle.importers import import_expert, synth_bundle, synth_shape
from wallbreak.coe.bundle.manifest import BLOB_ALIGN, MANIFEST, TENSOR_ALIGN, Bundle
from wallbreak.coe.bundle.writer import BundleWriter, ExpertSource
from wallbreak.errors import BundleError, ConfigError


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def test_layout_is_aligned(synth_bundle_dir: Path) -> None:
    b = Bundle.open(synth_bundle_dir)
    assert len(b.experts) == 4
    for e in b.experts.values():
        assert e.total_bytes % BLOB_ALIGN == 0
        assert b.blob_path(e.name).stat().st_size == e.total_bytes
        assert all(t.offset % TENSOR_ALIGN == 0 for t in e.tensors)
        assert e.tokenizer_dir is not None and (b.root / e.tokenizer_dir / "tokenizer.json").is_file()
    keys = {e.layout_key for e in b.experts.values()}
    assert len(keys) == 1, "same-shape experts must share a slot layout"
    b.verify()


def test_synth_is_deterministic(tmp_path: Path) -> None:
    synth_bundle(tmp_path / "a", experts=2, params=200_000, seed=3, names=["x", "y"])
    synth_bundle(tmp_path / "b", experts=2, params=200_000, seed=3, names=["x", "y"])
    synth_bundle(tmp_path / "c", experts=2, params=200_000, seed=4, names=["x", "y"])
    sums = {
        d: [t.sha256 for n in ("x", "y") for t in Bundle.open(tmp_path / d).expert(n).tensors] for d in "abc"
    }
    assert sums["a"] == sums["b"]
    assert sums["a"] != sums["c"]
    x, y = (Bundle.open(tmp_path / "a").expert(n) for n in ("x", "y"))
    assert [t.sha256 for t in x.tensors] != [t.sha256 for t in y.tensors], "experts must differ"


def test_synth_shape_tracks_requested_size() -> None:
    for p in (300_000, 5_000_000, 50_000_000, 135_000_000):
        s = synth_shape(p)
        assert abs(s.params - p) / p < 0.15, (p, s)


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"experts": 0}, "--experts"),
        ({"names": ["a", "b", "c"]}, "--names gives 3"),
        ({"names": ["a", "a"]}, "repeats"),
        ({"names": ["a", "coe"]}, "reserved"),
        ({"names": ["a", "../x"]}, "not allowed"),
        ({"arch": "mamba"}, "--arch"),
    ],
)
def test_synth_rejects_bad_input(tmp_path: Path, kwargs: dict, msg: str) -> None:
    args = {"experts": 2, "params": 200_000} | kwargs
    with pytest.raises(ConfigError, match=msg):
        synth_bundle(tmp_path / "x", **args)
    assert not (tmp_path / "x" / MANIFEST).exists()


def test_missing_and_malformed_manifest(tmp_path: Path, synth_bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"no bundle\.json"):
        Bundle.open(tmp_path / "empty")
    b = _copy(synth_bundle_dir, tmp_path)
    (b / MANIFEST).write_text('{"format": "wallbreak-bundle",\n "version": 1,\n "experts": [}')
    with pytest.raises(BundleError, match="line 3"):
        Bundle.open(b)


def test_schema_errors_name_the_key(tmp_path: Path, synth_bundle_dir: Path) -> None:
    b = _copy(synth_bundle_dir, tmp_path)
    raw = json.loads((b / MANIFEST).read_text())
    raw["experts"][1]["tensors"][2]["dtype"] = "float64"
    (b / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"experts/1/tensors/2/dtype"):
        Bundle.open(b)


def test_truncated_blob_names_expert_and_tensor(tmp_path: Path, synth_bundle_dir: Path) -> None:
    b = _copy(synth_bundle_dir, tmp_path)
    bundle = Bundle.open(b)
    name = bundle.names[2]
    blob = bundle.blob_path(name)
    with open(blob, "r+b") as f:
        f.truncate(blob.stat().st_size // 2)
    with pytest.raises(BundleError, match=rf"expert '{name}': tensor '.+' is truncated"):
        Bundle.open(b)


def test_corrupt_blob_is_detected(tmp_path: Path, synth_bundle_dir: Path) -> None:
    b = _copy(synth_bundle_dir, tmp_path)
    bundle = Bundle.open(b)
    e = bundle.expert(bundle.names[1])
    victim = e.tensors[3]
    with open(bundle.blob_path(e.name), "r+b") as f:
        f.seek(victim.offset + 5)
        byte = f.read(1)
        f.seek(victim.offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    reopened = Bundle.open(b)  # sizes still fine: corruption shows only in checksums
    with pytest.raises(BundleError, match=rf"expert '{e.name}': tensor '{victim.name}' is corrupt"):
        reopened.verify()


def _exploding(n: int):
    for i in range(n):
        yield f"w{i}", torch.ones(64, 64)
    raise RuntimeError("simulated crash mid-write")


def test_interrupted_first_write_leaves_no_bundle(tmp_path: Path) -> None:
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), BundleWriter(out) as w:
        w.add(ExpertSource("a", "llama", {}, _exploding(3)))
    with pytest.raises(BundleError):
        Bundle.open(out)
    assert not list((out / "experts").iterdir())


def test_interrupted_add_keeps_old_bundle(tmp_path: Path, synth_bundle_dir: Path) -> None:
    b = _copy(synth_bundle_dir, tmp_path)
    before = (b / MANIFEST).read_bytes()
    files_before = sorted(p.name for p in (b / "experts").iterdir())
    with pytest.raises(RuntimeError), BundleWriter(b) as w:
        w.add(ExpertSource("fine", "llama", {}, [("w", torch.ones(8))]))  # written, never committed
        w.add(ExpertSource("boom", "llama", {}, _exploding(2)))
    assert (b / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in (b / "experts").iterdir()) == files_before
    Bundle.open(b).verify()


def test_import_hf_folder_adds_and_replaces(tmp_path: Path, tiny_llama: Path) -> None:
    out = tmp_path / "imp"
    import_expert(tiny_llama, "first", out, description="d1", examples=["hi"])
    import_expert(tiny_llama, "second", out)
    b = Bundle.open(out)
    assert b.names == ["first", "second"]
    e = b.expert("first")
    assert e.model_type == "llama" and e.description == "d1" and e.examples == ("hi",)
    old_blob = b.blob_path("first")
    import_expert(tiny_llama, "first", out, description="d2", dtype="bfloat16")
    b2 = Bundle.open(out)
    assert sorted(b2.names) == ["first", "second"]
    assert b2.expert("first").dtype == "bfloat16" and b2.expert("first").description == "d2"
    assert not old_blob.exists(), "a replaced expert's old blob is removed after the commit"
    b2.verify()


def test_import_rejects_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        import_expert(tmp_path / "missing", "x", tmp_path / "o")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"not \.gguf"):
        import_expert(tmp_path / "f.txt", "x", tmp_path / "o")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        import_expert(tmp_path / "folder", "x", tmp_path / "o")


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("router", "/OUTSIDE"),  # absolute: router fit would delete it
        ("router", "router/../../OUTSIDE"),
        ("router", "OUTSIDE"),
        ("tokenizer", "tokenizers/.."),
        ("blob", "experts/.."),
        ("file", "../../OUTSIDE/x.json"),
    ],
)
def test_a_manifest_path_outside_the_bundle_is_refused_before_anything_is_deleted(
    synth_bundle_dir: Path, tmp_path: Path, tiny_bert: Path, where: str, value: str
) -> None:
    """A hand-edited bundle.json names what a write deletes; nothing outside the bundle may go."""
    from helpers import router_prompts, write_jsonl
    from wallbreak.coe.router import FitOptions, fit_router

    root = _copy(synth_bundle_dir, tmp_path)
    outside = tmp_path / "OUTSIDE"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    raw = json.loads((root / MANIFEST).read_text())
    e = raw["experts"][0]
    if where == "router":
        raw["router"] = {"dir": value if not value.startswith("/") else str(outside)}
    elif where == "tokenizer":
        e["tokenizer"]["dir"] = value
    elif where == "blob":
        e["blob"] = value
    else:
        e["tokenizer"]["files"] = {value: "0" * 64}
    (root / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="is not allowed"):
        Bundle.open(root)
    train = write_jsonl(tmp_path / "train.jsonl", router_prompts(4, seed=0))
    with pytest.raises(BundleError, match="is not allowed"):
        fit_router(root, FitOptions(examples=train, encoder=tiny_bert, methods=("logreg",)), progress=False)
    assert (outside / "precious.txt").read_text() == "keep me"


def test_a_shape_whose_product_wraps_in_int64_is_caught(synth_bundle_dir: Path, tmp_path: Path) -> None:
    root = _copy(synth_bundle_dir, tmp_path)
    raw = json.loads((root / MANIFEST).read_text())
    raw["experts"][0]["tensors"][0]["shape"] = [2**62, 4]  # 2**64 elements: 0 in int64
    raw["experts"][0]["tensors"][0]["nbytes"] = 0
    (root / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="needs"):
        Bundle.open(root)


def test_an_interrupted_default_bundle_is_finished_not_served_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first `serve` killed between its two imports left one expert: the next start imports the
    missing one (and only that one) before fitting the router."""
    from helpers import make_tiny_llama_folder
    from wallbreak.coe.bundle import importers
    from wallbreak.coe.server import serve

    srcs = {n: make_tiny_llama_folder(tmp_path / n, seed=i) for i, n in enumerate(("one", "two"))}
    experts = tuple(
        importers.PackagedModel(n, f"pkg-{n}", lambda p=p: p, f"expert {n}", (f"about {n}",))
        for n, p in srcs.items()
    )
    monkeypatch.setattr(importers, "DEFAULT_EXPERTS", experts)
    fitted: list[list[str]] = []
    monkeypatch.setattr(
        "wallbreak.coe.server.serve.fit_router", lambda root, opts: fitted.append(Bundle.open(root).names)
    )
    out = tmp_path / "default"
    importers.default_bundle(out, "float32", only=["one"])  # what the interrupted run committed
    blob = Bundle.open(out).blob_path("one")
    serve.ensure_default_bundle(out)
    b = Bundle.open(out)
    assert b.names == ["one", "two"] and b.blob_path("one") == blob  # 'one' was not imported again
    assert fitted == [["one", "two"]]


def test_leftovers_of_interrupted_writes_are_swept_only_while_no_writer_works(
    synth_bundle_dir: Path, tmp_path: Path
) -> None:
    from wallbreak.coe.bundle.writer import sweep

    root = _copy(synth_bundle_dir, tmp_path)
    junk = [
        root / "experts" / ".tmp-x-1234.blob",
        root / "experts" / "x-99999999.blob",  # renamed into place, never committed
        root / ".tmp-bundle.json-abc",
    ]
    for p in junk:
        p.write_bytes(b"\0" * 5000)
    (root / "tokenizers" / ".tmp-x-1234").mkdir()
    (root / "tokenizers" / ".tmp-x-1234" / "tokenizer.json").write_text("{}")
    (root / "router" / "0123456789ab").mkdir(parents=True)
    with BundleWriter(root):  # a writer at work: nothing of its may go
        assert sweep(root) == (0, 0)
    assert sweep(root) == (5, 15002)
    assert not any(p.exists() for p in junk)
    assert (
        not (root / "tokenizers" / ".tmp-x-1234").exists() and not (root / "router" / "0123456789ab").exists()
    )
    Bundle.open(root).verify()  # everything the manifest names is still there
    assert sweep(root) == (0, 0)


def test_a_killed_builds_temporary_package_is_swept_a_running_ones_kept(tmp_path: Path) -> None:
    import os

    from wallbreak.coe.engine import aot

    dead = tmp_path / f"{aot.TMP_PREFIX}999999999-x.pt2"
    alive = tmp_path / f"{aot.TMP_PREFIX}{os.getpid()}-y.pt2"
    for p in (dead, alive):
        p.write_bytes(b"\0" * 1000)
    assert aot.sweep(tmp_path) == (1, 1000)
    assert alive.exists() and not dead.exists()
