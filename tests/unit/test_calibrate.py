"""Calibration: the fit re-predicts the runs' own plans, recovers known terms, and refuses bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wallbreak.cli import main
from wallbreak.errors import ConfigError
from wallbreak.holmes.emulate.run import PLACEMENTS
from wallbreak.holmes.plan.calibrate import Calibration, fit, job_record, load_calibration, load_runs
from wallbreak.holmes.plan.rates import emulated_rates, reference_topology
from wallbreak.holmes.plan.report import make_report
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import load_topology

EXAMPLES = Path(__file__).parents[2] / "examples" / "clusters"
SMALL = EXAMPLES / "emu-small.yaml"
TRUTH = Calibration(compute_efficiency=0.04, link_efficiency=0.55, latency_us=1500.0)


def results(tmp: Path, cluster: Path, model: ModelSpec, truth: Calibration, name: str = "r.json") -> Path:
    """What `bench holmes --json` writes, with 'measured' times made by the cost model under `truth`."""
    topo = load_topology(cluster)
    training = TrainingSpec(8, 2, "none", "fp32")
    placements = {}
    for name_ in PLACEMENTS:
        ref = None if name_ in ("holmes", "megatron") else name_
        shaped = emulated_rates(reference_topology(topo, ref) if ref else topo, 0.01, 2)
        plan = make_report(
            shaped,
            model,
            training,
            placement="megatron" if name_ == "megatron" else "holmes",
            tp=1,
            pp=2,
            dp=2,
        ).plan
        placements[name_] = {
            "placement": name_,
            "measured": {"iteration_s": 1.0},
            "predicted": {"iteration_s": plan.predicted.iteration_s},
            "job": job_record(plan, cluster, ref, 0.01, 2),
        }
    path = tmp / name
    path.write_text(json.dumps({"placements": placements}))
    for run in load_runs([path]):  # now the 'measurements'
        placements[run.label.split(": ")[1]]["measured"]["iteration_s"] = run.predict(truth)
    path.write_text(json.dumps({"placements": placements}))
    return path


def test_the_fit_explains_its_runs_and_predicts_another_model(tmp_path: Path) -> None:
    small = ModelSpec.llama("tiny", 4, 128, 4, 64, 256, kv_heads=1)
    runs = load_runs([results(tmp_path, SMALL, small, TRUTH)])
    assert {r.label.split(": ")[1] for r in runs} == set(PLACEMENTS)
    before = [abs(r.predict(None) / r.measured_s - 1) for r in runs]
    cal = fit(runs)
    assert max(before) > 0.5  # uncalibrated, the model is far off these 'measurements'
    assert all(abs(row["error_pct"]) < 2 for row in cal.fitted_on), cal.fitted_on
    # Held out: a model twice as deep and wide, never seen by the fit.
    other = load_runs(
        [results(tmp_path, SMALL, ModelSpec.llama("wider", 8, 256, 4, 64, 256, kv_heads=1), TRUTH, "o.json")]
    )
    for r in other:
        assert r.predict(cal) == pytest.approx(r.measured_s, rel=0.05), r.label


def test_plan_cli_fits_saves_and_reuses_a_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = results(tmp_path, SMALL, ModelSpec.llama("tiny", 4, 128, 4, 64, 256, kv_heads=1), TRUTH)
    shape = "--layers 4 --hidden 128 --heads 4 --seq-len 64 --vocab 256 --global-batch 8 --micro-batch 2"
    argv = ["plan", str(SMALL), *shape.split(), "--dtype", "fp32", "--json"]
    saved = tmp_path / "cal.json"
    assert main([*argv, "--calibrate", str(res), "--save-calibration", str(saved)]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["calibration"]["rms_error_pct"] < 2 and "rms error" in cap.err
    cal = load_calibration(saved)
    assert cal.compute_efficiency == pytest.approx(out["calibration"]["compute_efficiency"])
    assert main([*argv, "--calibration", str(saved)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["predicted"]["iteration_s"] == pytest.approx(out["predicted"]["iteration_s"])
    assert again["predicted"]["iteration_s"] != pytest.approx(
        json.loads((main([*argv]), capsys.readouterr().out)[1])["predicted"]["iteration_s"]
    )


def test_bad_calibration_input_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"placements": {"holmes": {"measured": {"iteration_s": 0.1}}}}))
    with pytest.raises(ConfigError, match="no job record or measured iteration time"):
        load_runs([old])
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="not a measured run"):
        load_runs([junk])
    with pytest.raises(ConfigError, match="not a wallbreak calibration"):
        load_calibration(junk)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(Calibration(0.5, -1.0, 0.0).to_json()))
    with pytest.raises(ConfigError, match="link_efficiency must be a positive number"):
        load_calibration(bad)
    argv = ["plan", str(SMALL), "--model", "gpt-1.7b", "--global-batch", "8"]
    assert main([*argv, "--save-calibration", str(tmp_path / "x.json")]) == 2
    assert "--save-calibration needs --calibrate" in capsys.readouterr().err
    assert main([*argv, "--calibrate", str(tmp_path / "missing.json")]) == 2
    assert "cannot read results" in capsys.readouterr().err
