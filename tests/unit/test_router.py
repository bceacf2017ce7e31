"""Router: fit/eval round trip, calibration and fallback, bad input, determinism, identity checks.

A tiny random BERT built here stands in for MiniLM (the encoder is swappable by design); the
labelled prompts come from disjoint topic vocabularies, so a working router separates them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from helpers import make_tiny_bert_folder, router_prompts, write_jsonl
from wallbreak.coe.bundle.manifest import MANIFEST, Bundle
from wallbreak.coe.router import FitOptions, Router, fit_router, read_examples
from wallbreak.coe.router.evaluate import evaluate
from wallbreak.coe.router.heads import fit_head, fit_scale, softmax
from wallbreak.errors import BundleError, ConfigError

FAST = ("knn", "centroid", "logreg")


def _fit(bundle: Path, examples: Path, encoder: Path, **kw: object) -> object:
    opts = FitOptions(examples=examples, encoder=encoder, methods=kw.pop("methods", FAST), **kw)  # type: ignore[arg-type]
    return fit_router(bundle, opts, progress=False)


def test_round_trip_routes_held_out_prompts(router_bundle: Path, tiny_bert: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", router_prompts(12, seed=0))
    report = _fit(router_bundle, train, tiny_bert)
    assert report is not None
    assert report.chosen in report.candidates  # type: ignore[attr-defined]
    assert set(report.candidates) >= {"knn-k5", "centroid", "logreg"}  # type: ignore[attr-defined]
    router = Router.load(router_bundle, encoder=tiny_bert)
    held = read_examples(write_jsonl(tmp_path / "held.jsonl", router_prompts(10, seed=99)), router.experts)
    out = evaluate(router, held, confusion=tmp_path / "conf.png")
    assert out["n"] == 30 and out["accuracy"] >= 0.9
    assert set(out["per_expert"]) == {"alpha", "beta", "gamma"}
    assert all(0.0 <= v["precision"] <= 1.0 and 0.0 <= v["recall"] <= 1.0 for v in out["per_expert"].values())
    assert out["fallback_rate"] == 0.0 and out["p50_ms"] > 0 and out["p99_ms"] >= out["p50_ms"]
    assert (tmp_path / "conf.png").stat().st_size > 1000
    d = router.route(["banana plum the of grape"], top_k=2)[0]
    assert d.expert == "alpha" and len(d.top_k) == 2 and d.top_k[0][0] == "alpha"
    assert d.top_k[0][1] >= d.top_k[1][1] and not d.fallback


def test_scores_of_every_head_rank_the_right_class() -> None:
    rng = np.random.default_rng(0)
    centers = np.eye(3, 8, dtype=np.float32)
    emb = np.concatenate([c + 0.05 * rng.standard_normal((5, 8)).astype(np.float32) for c in centers])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    y = np.repeat(np.arange(3), 5)
    for kind, params in (("knn", {"k": 3}), ("centroid", {}), ("logreg", {"C": 10.0})):
        head = fit_head(kind, emb, y, 3, **params)
        assert (head.scores(emb).argmax(1) == y).all(), kind
    # A class missing from a training split must never win.
    head = fit_head("logreg", emb[:10], y[:10], 3)
    assert (head.scores(emb).argmax(1) != 2).all()


def test_calibration_scale_tracks_how_often_the_top_score_is_right() -> None:
    # Scores that are right 75% of the time: a calibrated confidence sits near 0.75.
    y = np.arange(400) % 2
    scores = np.zeros((400, 2), np.float32)
    right = np.arange(400) % 4 != 0
    top = np.where(right, y, 1 - y)
    scores[np.arange(400), top] = 1.0
    s = fit_scale(scores, y)
    assert softmax(scores, s).max(1).mean() == pytest.approx(0.75, abs=0.02)


def test_threshold_sends_unsure_prompts_to_the_generalist(
    router_bundle: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", router_prompts(8, seed=0))
    _fit(router_bundle, train, tiny_bert, generalist="gamma", threshold=1.0)
    router = Router.load(router_bundle, encoder=tiny_bert)
    assert router.generalist == "gamma" and router.threshold == 1.0
    ds = router.route(["apple pear plum the of", "bus train taxi of a", "red blue pink and it"])
    assert all(d.expert == "gamma" and d.fallback for d in ds)
    assert ds[0].top_k[0][0] == "alpha"  # the ranking still says what the prompt looked like
    held = read_examples(write_jsonl(tmp_path / "h.jsonl", router_prompts(4, seed=5)), router.experts)
    out = evaluate(router, held)
    # Every prompt fell back: only those labelled with the generalist count as right.
    assert out["fallback_rate"] == 1.0 and out["accuracy"] == pytest.approx(1 / 3)
    router = Router.load(router_bundle, encoder=tiny_bert, threshold=0.0)
    assert not any(d.fallback for d in router.route(["apple pear the"]))


def test_default_threshold_applies_only_with_a_generalist(
    router_bundle: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", router_prompts(6, seed=0))
    assert _fit(router_bundle, train, tiny_bert).threshold == 0.0  # type: ignore[attr-defined]
    assert 0 < _fit(router_bundle, train, tiny_bert, generalist="beta").threshold < 1  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="--generalist"):
        FitOptions(threshold=0.5)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        FitOptions(threshold=1.5, generalist="beta")


def test_unknown_expert_lists_valid_names_and_writes_nothing(
    router_bundle: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    rows = [*router_prompts(4, seed=0), ("what is love", "delta"), ("a b", "omega")]
    before = (router_bundle / MANIFEST).read_bytes()
    with pytest.raises(ConfigError) as e:
        _fit(router_bundle, write_jsonl(tmp_path / "t.jsonl", rows), tiny_bert)
    msg = str(e.value)
    assert "'delta'" in msg and "'omega'" in msg and "alpha, beta, gamma" in msg
    assert (router_bundle / MANIFEST).read_bytes() == before
    assert not (router_bundle / "router").exists() or not any((router_bundle / "router").iterdir())


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "line 3|:3:"),
        ('["a", "b"]', ":3:"),
        ('{"prompt": "x"}', ":3:"),
        ('{"prompt": 5, "expert": "alpha"}', ":3: prompt and expert must be strings"),
        ('{"prompt": "   ", "expert": "alpha"}', ":3: the prompt is empty"),
        ('{"prompt": "x", "expert": "alpha", "extra": 1}', ":3:"),
    ],
)
def test_malformed_examples_name_the_line(tmp_path: Path, line: str, match: str) -> None:
    good = json.dumps({"prompt": "apple", "expert": "alpha"})
    f = tmp_path / "e.jsonl"
    f.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(ConfigError, match=match):
        read_examples(f, ["alpha", "beta"])


def test_missing_and_empty_example_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl", ["a"])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no examples"):
        read_examples(tmp_path / "empty.jsonl", ["a"])


def test_expert_without_examples_is_refused(router_bundle: Path, tiny_bert: Path, tmp_path: Path) -> None:
    rows = [r for r in router_prompts(5, seed=0) if r[1] != "gamma"]
    with pytest.raises(ConfigError, match="gamma have no labelled prompts"):
        _fit(router_bundle, write_jsonl(tmp_path / "t.jsonl", rows), tiny_bert)
    # ...unless it is the generalist, which gets the prompts the others are unsure of.
    assert _fit(router_bundle, tmp_path / "t.jsonl", tiny_bert, generalist="gamma") is not None


def test_empty_prompts_are_rejected_and_long_ones_truncated_and_counted(
    router_bundle: Path, tmp_path: Path
) -> None:
    enc = make_tiny_bert_folder(tmp_path / "short-bert", max_positions=16)
    train = write_jsonl(tmp_path / "train.jsonl", router_prompts(5, seed=0))
    _fit(router_bundle, train, enc)
    router = Router.load(router_bundle, encoder=enc)
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        router.route(["apple", "  "])
    long = " ".join(["apple pear plum"] * 20)
    ds = router.route([long, "apple pear"])
    assert ds[0].truncated and not ds[1].truncated
    held = read_examples(
        write_jsonl(tmp_path / "h.jsonl", [(long, "alpha"), ("bus", "beta")]), router.experts
    )
    assert evaluate(router, held)["truncated"] == 1


def test_no_router_routes_to_the_generalist_with_a_warning(
    router_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        router = Router.load(router_bundle, generalist="beta")
    assert "no fitted router" in caplog.text
    d = router.route(["anything at all"])[0]
    assert d.expert == "beta" and d.fallback and not router.fitted


def test_single_expert_needs_no_router(tmp_path: Path, tiny_bert: Path) -> None:
    from wallbreak.coe.bundle.importers import synth_bundle

    synth_bundle(tmp_path / "one", experts=1, params=50_000, names=["solo"])
    train = write_jsonl(tmp_path / "t.jsonl", [("hello there", "solo")])
    assert _fit(tmp_path / "one", train, tiny_bert) is None
    assert Bundle.open(tmp_path / "one").router is None
    d = Router.load(tmp_path / "one").route(["hi"])[0]
    assert d.expert == "solo" and d.confidence == 1.0 and not d.fallback


def test_same_fit_gives_the_same_router(router_bundle: Path, tiny_bert: Path, tmp_path: Path) -> None:
    """Including the contrastive tuning of the encoder (a few steps keep it quick)."""
    from safetensors.numpy import load_file

    train = write_jsonl(tmp_path / "train.jsonl", router_prompts(6, seed=0))

    def fit_once() -> tuple[dict[str, object], dict[str, np.ndarray]]:
        _fit(router_bundle, train, tiny_bert, methods=("logreg", "tuned"), tune_steps=3)
        meta = dict(Bundle.open(router_bundle).router or {})
        arrays = load_file(str(router_bundle / str(meta["dir"]) / "head.safetensors"))
        return meta, arrays

    a_meta, a = fit_once()
    b_meta, b = fit_once()
    assert a_meta["dir"] != b_meta["dir"]
    assert not (router_bundle / str(a_meta["dir"])).exists()  # the refit replaced the old router
    for key in ("method", "scale", "cv", "labels", "head", "encoder"):
        assert a_meta[key] == b_meta[key], key
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert "tuned-logreg" in a_meta["cv"]["candidates"]  # type: ignore[index]


def test_tuned_router_carries_its_encoder_and_detects_tampering(
    router_bundle: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", router_prompts(6, seed=0))
    fit_router(
        router_bundle,
        FitOptions(examples=train, encoder=tiny_bert, methods=("tuned",), tune_steps=2, folds=2),
        progress=False,
    )
    meta = Bundle.open(router_bundle).router or {}
    assert str(meta["method"]).startswith("tuned-") and meta["encoder"]["stored"]
    router = Router.load(router_bundle)  # no encoder argument: the tuned one travels in the bundle
    assert router.route(["apple pear plum"])[0].expert == "alpha"
    weights = router_bundle / meta["dir"] / "encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="altered"):
        Router.load(router_bundle)


def test_a_different_encoder_is_detected(router_bundle: Path, tiny_bert: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", router_prompts(5, seed=0))
    _fit(router_bundle, train, tiny_bert)
    other = make_tiny_bert_folder(tmp_path / "other-bert", seed=3)
    with pytest.raises(ConfigError, match="different weights"):
        Router.load(router_bundle, encoder=other)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown router method"):
        FitOptions(methods=("svm",))
    with pytest.raises(ConfigError, match="--folds"):
        FitOptions(folds=1)
