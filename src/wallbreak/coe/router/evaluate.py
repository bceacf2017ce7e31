"""Scoring a router on labelled prompts: accuracy, per-expert precision/recall, fallbacks, latency."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wallbreak.coe.router.fit import Example
from wallbreak.coe.router.router import Router
from wallbreak.common.plots import save_figure
from wallbreak.errors import ConfigError

BATCH = 32


def evaluate(router: Router, examples: Sequence[Example], confusion: Path | None = None) -> dict[str, Any]:
    """Route each prompt alone (the latency a lone request sees), then in batches of 32 (throughput).

    A fallback counts as wrong unless the labelled expert is the generalist itself.
    """
    if not examples:
        raise ConfigError("no examples to evaluate")
    prompts = [e.prompt for e in examples]
    router.route(prompts[:1])  # the first call pays one-off costs; a server pays them at start-up
    lat, decisions = [], []
    for p in prompts:
        t0 = time.perf_counter()
        decisions.extend(router.route([p]))
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for s in range(0, len(prompts), BATCH):
        router.route(prompts[s : s + BATCH])
    batch_rate = len(prompts) / (time.perf_counter() - t0)
    truth = [e.expert for e in examples]
    pred = [d.expert for d in decisions]
    names = sorted(
        set(truth) | set(pred),
        key=lambda n: (n not in router.experts, router.experts.index(n) if n in router.experts else 0, n),
    )
    per_expert = {}
    for n in names:
        tp = sum(t == n and p == n for t, p in zip(truth, pred, strict=True))
        n_pred = sum(p == n for p in pred)
        n_true = sum(t == n for t in truth)
        per_expert[n] = {
            "precision": tp / n_pred if n_pred else 0.0,
            "recall": tp / n_true if n_true else 0.0,
            "support": n_true,
        }
    out = {
        "n": len(examples),
        "accuracy": float(np.mean([t == p for t, p in zip(truth, pred, strict=True)])),
        "per_expert": per_expert,
        "fallback_rate": float(np.mean([d.fallback for d in decisions])),
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "batch32_prompts_per_s": float(batch_rate),
        "truncated": int(sum(d.truncated for d in decisions)),
        "method": router.method,
    }
    if confusion is not None:
        plot_confusion(truth, pred, names, confusion)
    return out


def plot_confusion(truth: Sequence[str], pred: Sequence[str], names: Sequence[str], out: Path) -> None:
    import matplotlib  # deferred: loads matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: loads matplotlib

    idx = {n: i for i, n in enumerate(names)}
    m = np.zeros((len(names), len(names)), np.int64)
    for t, p in zip(truth, pred, strict=True):
        m[idx[t], idx[p]] += 1
    size = max(4.0, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("routed to")
    ax.set_ylabel("labelled")
    for i in range(len(names)):
        for j in range(len(names)):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    str(m[i, j]),
                    ha="center",
                    va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black",
                )
    ax.set_title(f"router confusion ({len(truth)} prompts)")
    fig.tight_layout()
    save_figure(fig, out, "the confusion matrix", dpi=120)
