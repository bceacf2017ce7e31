"""The router learning experts one at a time (what `bundle import` does to a fitted router) against
one full refit, on examples/router: 11 domains, 12 training prompts each (as manifest examples),
scored on the 255 held-out prompts. The experts are tiny synthetic Llamas: only their names
and examples matter here. Both fits use the frozen MiniLM encoder (kNN, centroid, logistic
regression): the tuned encoder of a full `router fit` takes minutes and is not what an
incremental update can touch. Prints one JSON object.

    python benchmarks/router_incremental.py [--start 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from wallbreak.coe.bundle.importers import byte_tokenizer_dir, synth_shape, synth_tensors
from wallbreak.coe.bundle.writer import BundleWriter, ExpertSource
from wallbreak.coe.router import FitOptions, Router, fit_router, read_examples
from wallbreak.coe.router.evaluate import evaluate
from wallbreak.coe.router.incremental import learn_expert

ROOT = Path(__file__).resolve().parent.parent / "examples" / "router"
FROZEN = ("knn", "centroid", "logreg")


def add_expert(out: Path, tok: Path, name: str, index: int, examples: list[str]) -> None:
    """A tiny synthetic Llama (the project's synth_tensors) with the domain's prompts as examples."""
    config = synth_shape(100_000).llama_config()
    with BundleWriter(out) as w:
        w.add(
            ExpertSource(
                name, "llama", config, synth_tensors(config, index, torch.float32), tok, examples=examples
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--start", type=int, default=2, help="experts in the first, full fit")
    args = ap.parse_args()
    train: dict[str, list[str]] = {}
    for line in (ROOT / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        train.setdefault(row["expert"], []).append(row["prompt"])
    names = list(train)
    with tempfile.TemporaryDirectory() as tmp:
        tok = byte_tokenizer_dir(Path(tmp) / "tok")
        out = Path(tmp) / "b"
        for i, n in enumerate(names[: args.start]):
            add_expert(out, tok, n, i, train[n])
        t0 = time.perf_counter()
        fit_router(out, FitOptions(methods=FROZEN), progress=False)
        first_fit_s = time.perf_counter() - t0
        steps = []
        for i, n in enumerate(names[args.start :], args.start):
            add_expert(out, tok, n, i, train[n])
            inc = learn_expert(out, n)
            assert inc is not None
            steps.append(
                {"expert": n, "seconds": round(inc.seconds, 2), "cv_accuracy": round(inc.cv_accuracy, 3)}
            )
        heldout = read_examples(ROOT / "heldout.jsonl", names)
        incremental = evaluate(Router.load(out), heldout)
        t0 = time.perf_counter()
        report = fit_router(out, FitOptions(methods=FROZEN), progress=False)
        refit_s = time.perf_counter() - t0
        full = evaluate(Router.load(out), heldout)
    print(
        json.dumps(
            {
                "experts": len(names),
                "first_fit_experts": args.start,
                "first_fit_s": round(first_fit_s, 1),
                "incremental_steps": steps,
                "incremental": {
                    "heldout_accuracy": incremental["accuracy"],
                    "p50_ms": incremental.get("p50_ms"),
                },
                "full_refit": {
                    "heldout_accuracy": full["accuracy"],
                    "chosen": report.chosen if report else None,
                    "seconds": round(refit_s, 1),
                    "p50_ms": full.get("p50_ms"),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
