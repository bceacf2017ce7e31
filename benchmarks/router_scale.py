"""The router at many experts: fit it on a `bundle synth --like` bundle's examples (its topics'
prompts, four per expert), then score it on two held-out sets: other phrasings that name the topic
(two per expert), and a question that names neither the topic nor a word of it (one per expert),
each against plain k-nearest-neighbours over the same encoder's embeddings of the same examples.
Reports fit time, top-1 accuracy, and routing latency (one prompt at a time, p50/p99).
Writes the fitted router into the bundle (a server on it routes with it). Prints one JSON object.

    python benchmarks/router_scale.py BUNDLE [--methods logreg,knn,...] [--no-fit] [--threads 2,1]

`--threads`: score the router with each of these torch intra-op thread counts in turn (`serve`
routes on one: coe/cores.py); the default scores once, with torch's own count.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from wallbreak.coe.bundle import topics
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.router import FitOptions, Router, fit_router
from wallbreak.coe.router.evaluate import evaluate
from wallbreak.coe.router.fit import METHODS, Example


def topic_index(bundle: Bundle, name: str) -> int:
    """Which topic an expert was given (its source records its index)."""
    return int(bundle.expert(name).source.rsplit("index=", 1)[1])


def knn_accuracy(router: Router, train: list[Example], test: list[Example], k: int) -> float:
    """Majority of the k nearest training examples by cosine similarity (ties: the nearest)."""
    assert router.encoder is not None
    a = router.encoder.encode([e.prompt for e in train]).vectors
    b = router.encoder.encode([e.prompt for e in test]).vectors
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sims = b @ a.T
    right = 0
    for row, ex in zip(sims, test, strict=True):
        near = np.argsort(-row)[:k]
        votes = Counter(train[i].expert for i in near)
        top = max(votes.values())
        pick = next(train[i].expert for i in near if votes[train[i].expert] == top)
        right += pick == ex.expert
    return right / len(test)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--methods", default=",".join(METHODS), help="the fit's candidates, comma-separated")
    ap.add_argument("--no-fit", action="store_true", help="score the router the bundle already has")
    ap.add_argument("--threads", default="", help="intra-op thread counts to score with, comma-separated")
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    out: dict[str, object] = {"experts": len(bundle.names)}
    if not args.no_fit:
        t0 = time.perf_counter()
        report = fit_router(args.bundle, FitOptions(methods=tuple(args.methods.split(","))), progress=False)
        out["fit_s"] = round(time.perf_counter() - t0, 1)
        assert report is not None
        out["fit"] = {"chosen": report.chosen, "cv_accuracy": round(report.cv_accuracy, 4),
                      "candidates": report.candidates, "tune_steps": report.tune_steps}  # fmt: skip
    bundle = Bundle.open(args.bundle)
    router = Router.load(bundle)
    train = [Example(p, n) for n in bundle.names for p in bundle.expert(n).examples]
    sets = {"named": topics.heldout, "unnamed": topics.heldout_unnamed}
    keys = ("method", "n", "accuracy", "p50_ms", "p99_ms", "batch32_prompts_per_s")
    tests = {
        label: [Example(p, n) for n in bundle.names for p in prompts(topic_index(bundle, n))]
        for label, prompts in sets.items()
    }
    for label, test in tests.items():
        out[f"knn_{label}"] = {f"k={k}": round(knn_accuracy(router, train, test, k), 4) for k in (1, 5)}
    for threads in [int(t) for t in args.threads.split(",") if t] or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        tag = f"_threads{threads}" if args.threads else ""
        for label, test in tests.items():
            scored = evaluate(router, test)
            out[f"router_{label}{tag}"] = {k: scored[k] for k in keys}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
