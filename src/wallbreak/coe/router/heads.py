"""Classifiers over prompt embeddings, and the calibration that turns their scores into confidence.

Every head maps unit-length embeddings [n, d] to per-expert scores [n, C]; the confidence is
softmax(scale * scores), with `scale` fitted on held-out (cross-validation) predictions so that a
confidence of 0.7 means the router is right about 70% of the time. That is what makes the
fallback threshold mean something.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wallbreak.errors import BundleError

HEAD_KINDS = ("knn", "centroid", "logreg")


@dataclass
class Head:
    kind: str
    n_classes: int
    params: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def scores(self, emb: np.ndarray) -> np.ndarray:
        if self.kind == "centroid":
            return emb @ self.arrays["centroids"].T
        if self.kind == "logreg":
            return emb @ self.arrays["weight"].T + self.arrays["bias"]
        if self.kind == "knn":
            return _knn_scores(
                emb, self.arrays["bank"], self.arrays["labels"], self.n_classes, self.params["k"]
            )
        raise BundleError(f"unknown router head kind {self.kind!r}; known: {', '.join(HEAD_KINDS)}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_classes": self.n_classes, "params": self.params}

    @classmethod
    def from_json(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Head:
        head = cls(meta["kind"], int(meta["n_classes"]), dict(meta.get("params", {})), dict(arrays))
        need = {"centroid": {"centroids"}, "logreg": {"weight", "bias"}, "knn": {"bank", "labels"}}
        missing = need.get(head.kind, set()) - set(arrays)
        if head.kind not in need or missing:
            raise BundleError(
                f"router head {head.kind!r} is incomplete (missing {sorted(missing)}); refit it"
            )
        return head


def _knn_scores(emb: np.ndarray, bank: np.ndarray, labels: np.ndarray, n_classes: int, k: int) -> np.ndarray:
    """Each expert's score: the summed similarity of its prompts among the k nearest, over k."""
    sims = emb @ bank.T
    k = min(k, bank.shape[0])
    # Stable sort: ties fall to the earlier example, so the result never depends on the platform.
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    out = np.zeros((emb.shape[0], n_classes), np.float32)
    rows = np.arange(emb.shape[0])[:, None]
    np.add.at(out, (np.broadcast_to(rows, top.shape), labels[top]), sims[rows, top])
    return out / k


def fit_head(kind: str, emb: np.ndarray, y: np.ndarray, n_classes: int, **params: Any) -> Head:
    emb = np.asarray(emb, np.float32)
    if kind == "knn":
        return Head(
            kind, n_classes, {"k": int(params.get("k", 5))}, {"bank": emb, "labels": y.astype(np.int64)}
        )
    if kind == "centroid":
        cents = np.zeros((n_classes, emb.shape[1]), np.float32)
        for c in range(n_classes):
            if (y == c).any():
                v = emb[y == c].mean(0)
                cents[c] = v / max(float(np.linalg.norm(v)), 1e-12)
        return Head(kind, n_classes, {}, {"centroids": cents})
    if kind == "logreg":
        return _fit_logreg(emb, y, n_classes, float(params.get("C", 10.0)))
    raise ValueError(f"unknown head kind {kind!r}")


def _fit_logreg(emb: np.ndarray, y: np.ndarray, n_classes: int, c: float) -> Head:
    from sklearn.linear_model import LogisticRegression  # deferred: loads sklearn

    present = np.unique(y)
    weight = np.zeros((n_classes, emb.shape[1]), np.float32)
    # An expert missing from this training split can never win: a large negative bias.
    bias = np.full(n_classes, -1e4, np.float32)
    if len(present) == 1:
        bias[present[0]] = 0.0
    else:
        lr = LogisticRegression(C=c, max_iter=5000).fit(emb, y)
        coef, icpt = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
        if len(present) == 2:  # sklearn gives one row for two classes: split it as +-z/2
            coef = np.stack([-coef[0] / 2, coef[0] / 2])
            icpt = np.array([-icpt[0] / 2, icpt[0] / 2], np.float32)
        weight[present] = coef
        bias[present] = icpt
    return Head("logreg", n_classes, {"C": c}, {"weight": weight, "bias": bias})


def softmax(scores: np.ndarray, scale: float) -> np.ndarray:
    z = scores.astype(np.float64) * scale
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_scale(scores: np.ndarray, y: np.ndarray) -> float:
    """The softmax scale minimising the negative log-likelihood of held-out predictions.

    A deterministic search over a log grid, refined once around the best point: one parameter,
    so nothing fancier is needed, and the result does not depend on an optimizer's start.
    """
    if len(y) == 0:
        return 1.0

    def nll(s: float) -> float:
        p = softmax(scores, s)[np.arange(len(y)), y]
        return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())

    grid = np.logspace(-1, 3.5, 91)
    best = min(grid, key=nll)
    fine = best * np.logspace(-0.05, 0.05, 21)
    return float(min(fine, key=nll))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over confidence bins, weighted by bin size."""
    if len(y) == 0:
        return 0.0
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    err = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            err += sel.mean() * abs(right[sel].mean() - conf[sel].mean())
    return float(err)
