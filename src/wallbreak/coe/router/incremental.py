"""Teaching a fitted router one more expert, or one fewer, without refitting the encoder.

A fit keeps its training rows as its encoder embeds them (`fit.TrainingSet`). Adding an expert
embeds only that expert's example prompts and description, appends them, refits the head of the
kind the full fit chose (same parameters) on every row, and calibrates again: a stratified k-fold
over the user examples gives held-out scores, and the softmax scale is fitted to them. Removing an
expert drops its rows and does the same, with no encoding at all. `wallbreak router fit` stays
the full refit (it may choose another head or tune the encoder).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.bundle.writer import BundleWriter
from wallbreak.coe.router.fit import TRAIN_FILE, TrainingSet, fold_count, save_arrays, stratified_folds
from wallbreak.coe.router.heads import Head, expected_calibration_error, fit_head, fit_scale, softmax
from wallbreak.coe.router.router import load_parts
from wallbreak.errors import BundleError

log = logging.getLogger(__name__)


@dataclass
class Incremental:
    labels: list[str]
    cv_accuracy: float
    scale: float
    ece: float
    seconds: float

    def summary(self, verb: str, name: str) -> str:
        return (
            f"router {verb} {name} without refitting its encoder: {len(self.labels)} experts, "
            f"CV accuracy {self.cv_accuracy:.3f}, scale {self.scale:.1f}, ECE {self.ece:.3f} "
            f"({self.seconds:.1f} s)"
        )


def _read(root: Path, meta: dict[str, Any] | None) -> tuple[Head, TrainingSet, list[str]] | None:
    """The fitted head, its training rows and labels; None when there is no router, or it was
    fitted before training rows were kept (only a full refit can change its experts then)."""
    from safetensors.numpy import load_file  # deferred: loads safetensors

    if not meta:
        return None
    d = root / meta["dir"]
    if meta.get("train") != TRAIN_FILE or not (d / TRAIN_FILE).is_file():
        return None  # fitted before training rows were kept: only a full refit can add experts
    try:
        t = load_file(str(d / TRAIN_FILE))
        head = Head.from_json(meta["head"], load_file(str(d / "head.safetensors")))
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"the router's state in {d} cannot be read ({e}); refit it") from None
    train = TrainingSet(t["vectors"], t["y"].astype(np.int64), t["cv"].astype(bool))
    return head, train, list(meta["labels"])


def _refit(head: Head, train: TrainingSet, classes: int, seed: int = 0) -> tuple[Head, float, float, float]:
    """The head refitted on every row, and its calibration from k-fold held-out scores:
    (head, accuracy, scale, ece)."""
    params = dict(head.params)
    cv = np.flatnonzero(train.cv)
    y_cv = train.y[cv]
    k = fold_count(y_cv, classes) if len(cv) else 0
    oof = np.zeros((len(cv), classes), np.float32)
    if k and len(np.unique(y_cv)) > 1:
        fold = stratified_folds(y_cv, k, seed)
        for f in range(k):
            keep = np.ones(len(train.y), bool)
            keep[cv[fold == f]] = False
            part = fit_head(head.kind, train.vectors[keep], train.y[keep], classes, **params)
            oof[fold == f] = part.scores(train.vectors[cv[fold == f]])
    full = fit_head(head.kind, train.vectors, train.y, classes, **params)
    scale = fit_scale(oof, y_cv) if len(cv) else 1.0
    acc = float((oof.argmax(1) == y_cv).mean()) if len(cv) else 0.0
    return full, acc, scale, expected_calibration_error(softmax(oof, scale), y_cv)


def _commit(w: BundleWriter, meta: dict[str, Any], labels: list[str], head: Head, train: TrainingSet,
            acc: float, scale: float, ece: float) -> None:  # fmt: skip
    d = w.new_router_dir()
    save_arrays(d, head, train)
    root = w.root
    new = dict(meta)
    if meta["encoder"].get("stored"):  # a tuned encoder moves with the router's state
        shutil.copytree(root / meta["dir"] / "encoder", d / "encoder")
    new.update(
        dir=str(d.relative_to(root)),
        labels=labels,
        head=head.to_json(),
        scale=scale,
        cv=dict(meta.get("cv", {}), accuracy=acc, ece=ece, incremental=True),
        fitted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    w.set_router(new)


def learn_expert(bundle_dir: Path, name: str) -> Incremental | None:
    """Add (or refresh) `name` in the bundle's fitted router from its manifest examples and
    description. None, with nothing changed, when the bundle has no router that keeps its training
    rows, or the expert has no example or description (it is still served by name)."""
    t0 = time.perf_counter()
    bundle = Bundle.open(bundle_dir)
    meta = bundle.router
    entry = bundle.expert(name)
    texts = [p for p in entry.examples if p.strip()]
    extras = [entry.description] if entry.description.strip() else []
    state = _read(bundle.root, meta) if texts or extras else None
    if meta is None or state is None:
        return None
    head, train, labels = state
    if name in labels:  # a replaced expert: its old rows go
        train = _without(train, labels.index(name))
    else:
        labels.append(name)
    encoder = load_parts(bundle, meta, None)[1]  # the router's own encoder (Router.load would warn)
    vecs = encoder.encode(texts + extras).vectors.astype(np.float32)
    cls = labels.index(name)
    train = TrainingSet(
        np.concatenate([train.vectors, vecs]),
        np.concatenate([train.y, np.full(len(vecs), cls, np.int64)]),
        np.concatenate([train.cv, np.arange(len(vecs)) < len(texts)]),
    )
    head, acc, scale, ece = _refit(head, train, len(labels))
    with BundleWriter(bundle_dir) as w:
        _commit(w, meta, labels, head, train, acc, scale, ece)
    return Incremental(labels, acc, scale, ece, time.perf_counter() - t0)


def _without(train: TrainingSet, cls: int) -> TrainingSet:
    """The rows of every class but `cls` (the rows of `cls` kept out; labels keep their places)."""
    keep = train.y != cls
    return TrainingSet(train.vectors[keep], train.y[keep], train.cv[keep])


def forget_expert(w: BundleWriter, name: str) -> Incremental | None:
    """Within an open write that removes `name`: stage the router without it (no encoding).
    None when the router does not know it or keeps no training rows."""
    t0 = time.perf_counter()
    meta = (w.existing or {}).get("router")
    state = _read(w.root, meta)
    if meta is None or state is None or name not in state[2]:
        return None
    head, train, labels = state
    cls = labels.index(name)
    train = _without(train, cls)
    train.y = np.where(train.y > cls, train.y - 1, train.y)  # later labels move up one place
    del labels[cls]
    if len(labels) < 2:
        w.set_router(None)  # one expert left: it needs no router
        return None
    head, acc, scale, ece = _refit(head, train, len(labels))
    if meta.get("generalist") == name:  # no generalist left to fall back to
        meta = dict(meta, generalist=None, threshold=0.0)
    _commit(w, meta, labels, head, train, acc, scale, ece)
    return Incremental(labels, acc, scale, ece, time.perf_counter() - t0)
