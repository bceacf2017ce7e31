"""Fit the cost model to measured runs: `wallbreak plan CLUSTER --calibrate RESULTS.json`.

Three terms of the cost model are facts of the hardware and software, not of the cluster file:
- `compute_efficiency`: the share of each GPU's peak_tflops the trainer's matmuls achieve;
- `link_efficiency`: the share of each network link's nominal rate a collective or send achieves;
- `latency_us`: a fixed cost added to every network message (link latency plus software overhead).

Every measured run carries a `job` record (cluster file, reference, scale, degrees, stage order
and split, model, training), so the fit re-predicts the *same* plan under trial values and keeps the
values that minimise the squared log error. A calibration fitted on one cluster file then applies
to another (`--calibration FILE`): that is how the prediction is checked, on runs it never saw.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wallbreak.common.atomic import atomic_open
from wallbreak.common.jsonfile import read_json
from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.plan_file import model_json, model_spec, training_json, training_spec
from wallbreak.holmes.plan.planner import Plan, build
from wallbreak.holmes.plan.rates import emulated_rates, reference_topology
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import Topology, load_topology

CALIBRATION_FORMAT = "wallbreak-calibration"
CALIBRATION_VERSION = 1
# The coarse grid the fit starts from; Nelder-Mead then refines its best points.
_EFFICIENCY_GRID = [10 ** (-3 + 3 * i / 15) for i in range(16)]  # 0.001 .. 1
_LINK_GRID = [10 ** (-2 + 2.3 * i / 11) for i in range(12)]  # 0.01 .. 2
_LATENCY_GRID = [0.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0]


@dataclass(frozen=True)
class Calibration:
    compute_efficiency: float
    link_efficiency: float
    latency_us: float
    fitted_on: list[dict[str, Any]] = field(default_factory=list, compare=False)

    def apply(self, topo: Topology) -> Topology:
        """The topology as the measured hardware behaves: every GPU at the fitted efficiency, every
        network link at the fitted share of its rate and with the fitted extra latency."""
        eff = min(1.0, self.compute_efficiency)
        clusters = tuple(replace(c, gpu=replace(c.gpu, efficiency=eff)) for c in topo.clusters)
        share, extra = self.link_efficiency, self.latency_us
        return replace(topo, clusters=clusters).map_network(
            lambda ln: replace(ln, gbps=ln.gbps * share, latency_us=ln.latency_us + extra)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "compute_efficiency": self.compute_efficiency,
            "link_efficiency": self.link_efficiency,
            "latency_us": self.latency_us,
            "fitted_on": self.fitted_on,
            "rms_error_pct": rms_error_pct(self.fitted_on),
        }

    def save(self, path: Path) -> None:
        with atomic_open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")


def rms_error_pct(rows: list[dict[str, Any]]) -> float:
    errs = [r["error_pct"] for r in rows if "error_pct" in r]
    return math.sqrt(sum(e * e for e in errs) / len(errs)) if errs else 0.0


def load_calibration(path: Path) -> Calibration:
    raw = read_json(path, "calibration")
    if not isinstance(raw, dict) or raw.get("format") != CALIBRATION_FORMAT:
        raise ConfigError(
            f"{path}: not a wallbreak calibration (write one with `wallbreak plan ... --calibrate`)"
        )
    if raw.get("version") != CALIBRATION_VERSION:
        raise ConfigError(
            f"{path}: calibration version {raw.get('version')!r}; this wallbreak reads version 1"
        )
    vals = {}
    for key, lo in (("compute_efficiency", 0.0), ("link_efficiency", 0.0), ("latency_us", -1e-9)):
        v = raw.get(key)
        if not isinstance(v, int | float) or isinstance(v, bool) or not v > lo:
            kind = "non-negative" if lo < 0 else "positive"
            raise ConfigError(f"{path}: {key} must be a {kind} number, got {v!r}")
        vals[key] = float(v)
    return Calibration(fitted_on=list(raw.get("fitted_on") or []), **vals)


# ----------------------------------------------------------------------------------------------
# What a measured run records, and how it is re-predicted


def job_record(
    plan: Plan, cluster: Path, reference: str | None, scale: float, host_cores: float | None = None
) -> dict[str, Any]:
    """Everything needed to predict this run's plan again, under other cost-model terms."""
    return {
        "cluster": str(Path(cluster).resolve()),
        "reference": reference,
        "scale": scale,
        "host_cores": host_cores,
        "placement": plan.placement,
        **plan.layout.to_json(),
        "order": list(plan.cluster_order),
        "split": [s.layers for s in plan.stages],
        "model": model_json(plan.model),
        "training": training_json(plan.training),
    }


@dataclass
class _Run:
    label: str
    topo: Topology  # as emulated: reference applied, rates scaled
    job: dict[str, Any]
    model: ModelSpec
    training: TrainingSpec
    measured_s: float
    predicted_s: float  # what the run predicted when it ran

    def predict(self, cal: Calibration | None) -> float:
        topo = cal.apply(self.topo) if cal else self.topo
        j = self.job
        p = build(topo, self.model, self.training, placement=j["placement"], tp=j["tp"], pp=j["pp"],
                  dp=j["dp"], order=j["order"], network=j["placement"], split=j["split"])  # fmt: skip
        assert p is not None  # a fixed split is always built
        return p.predicted.iteration_s


def _runs_in(doc: Any, where: str) -> Iterable[tuple[str, dict[str, Any]]]:
    if isinstance(doc, list):
        for i, d in enumerate(doc):
            yield from _runs_in(d, f"{where}[{i}]")
    elif isinstance(doc, dict) and isinstance(doc.get("placements"), dict):
        for name, r in doc["placements"].items():
            yield f"{where}: {name}", r
    elif isinstance(doc, dict) and "measured" in doc:
        yield f"{where}: {doc.get('placement', 'run')}", doc
    else:
        raise ConfigError(
            f"{where}: not a measured run; give the JSON of `wallbreak bench holmes --json` or "
            "`wallbreak emulate run --json`"
        )


def load_runs(paths: list[Path]) -> list[_Run]:
    topos: dict[str, Topology] = {}
    runs = []
    for path in paths:
        for label, r in _runs_in(read_json(path, "results"), str(path)):
            job = r.get("job")
            measured = (r.get("measured") or {}).get("iteration_s")
            if not isinstance(job, dict) or not isinstance(measured, int | float) or measured <= 0:
                raise ConfigError(
                    f"{label}: no job record or measured iteration time (written by an older wallbreak?); "
                    "re-run `wallbreak bench holmes ... --json`"
                )
            try:
                if job["cluster"] not in topos:
                    topos[job["cluster"]] = load_topology(Path(job["cluster"]))
                topo = topos[job["cluster"]]
                if job["reference"]:
                    topo = reference_topology(topo, job["reference"])
                model, training = model_spec(job["model"]), training_spec(job["training"])
                predicted = float(r["predicted"]["iteration_s"])
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{label}: the job record lacks {e}; re-run the benchmark") from None
            shaped = emulated_rates(topo, job["scale"], job["host_cores"])
            runs.append(_Run(label, shaped, job, model, training, measured, predicted))
    if not runs:
        raise ConfigError("no measured runs in " + ", ".join(map(str, paths)))
    return runs


# ----------------------------------------------------------------------------------------------
# The fit


def _loss(runs: list[_Run], cal: Calibration) -> float:
    return sum(math.log(r.predict(cal) / r.measured_s) ** 2 for r in runs)


def _from_vector(v: Any) -> Calibration:
    """(log efficiency, log link share, log(1 + latency / 10 us)) -> terms: every vector is valid."""
    return Calibration(min(1.0, math.exp(v[0])), math.exp(v[1]), 10.0 * math.expm1(max(0.0, v[2])))


def fit(runs: list[_Run]) -> Calibration:
    """The three terms that best explain the measured runs (least squares on log time): a coarse grid,
    then Nelder-Mead (scipy, which scikit-learn brings) from its three best points."""
    from scipy.optimize import minimize  # deferred: loads scipy

    grid = itertools.product(_EFFICIENCY_GRID, _LINK_GRID, _LATENCY_GRID)
    starts = heapq.nsmallest(3, grid, key=lambda g: _loss(runs, Calibration(*g)))
    best: tuple[float, Calibration] | None = None
    for e, b, lat in starts:
        x0 = [math.log(e), math.log(b), math.log1p(lat / 10.0)]
        res = minimize(lambda v: _loss(runs, _from_vector(v)), x0, method="Nelder-Mead",
                       options={"xatol": 1e-4, "fatol": 1e-10, "maxiter": 2000})  # fmt: skip
        if best is None or res.fun < best[0]:
            best = (float(res.fun), _from_vector(res.x))
    assert best is not None
    return replace(best[1], fitted_on=compare(runs, best[1]))


def compare(runs: list[_Run], cal: Calibration | None) -> list[dict[str, Any]]:
    """Each run measured beside its prediction under `cal` (and as it predicted when it ran)."""
    out = []
    for r in runs:
        p = r.predict(cal)
        out.append(
            {
                "run": r.label,
                "measured_s": r.measured_s,
                "predicted_s": p,
                "error_pct": 100 * (p - r.measured_s) / r.measured_s,
                "uncalibrated_error_pct": 100 * (r.predicted_s - r.measured_s) / r.measured_s,
            }
        )
    return out


def format_fit(rows: list[dict[str, Any]], cal: Calibration, title: str) -> str:
    lines = [
        f"{title}: compute efficiency {cal.compute_efficiency:.3g}, link efficiency "
        f"{cal.link_efficiency:.3g}, extra latency {cal.latency_us:.0f} us per message"
    ]
    for r in rows:
        lines.append(
            f"  {r['run']}: measured {r['measured_s']:.3f} s, predicted {r['predicted_s']:.3f} s "
            f"({r['error_pct']:+.0f}%; uncalibrated {r['uncalibrated_error_pct']:+.0f}%)"
        )
    lines.append(f"  rms error {rms_error_pct(rows):.1f}%")
    return "\n".join(lines)


def calibration_for(
    calibrate: list[Path] | None, calibration: Path | None, save: Path | None
) -> Calibration | None:
    """`wallbreak plan`'s calibration options: fit to measured runs, or load a saved fit."""
    if save and not calibrate:
        raise ConfigError("--save-calibration needs --calibrate RESULTS.json (the runs to fit)")
    if calibration:
        cal = load_calibration(calibration)
        print(format_fit(cal.fitted_on, cal, f"calibration {calibration}").splitlines()[0], file=sys.stderr)
        return cal
    if not calibrate:
        return None
    runs = load_runs(calibrate)
    print(f"calibrating on {len(runs)} measured run(s) ...", file=sys.stderr, flush=True)
    cal = fit(runs)
    print(format_fit(cal.fitted_on, cal, "calibration"), file=sys.stderr)
    if save:
        cal.save(save)
        print(f"wrote {save}", file=sys.stderr)
    return cal
