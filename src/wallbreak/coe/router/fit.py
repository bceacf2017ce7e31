"""Fitting a router: labelled prompts -> candidate classifiers -> cross-validation -> the bundle.

Candidates are heads over frozen encoder embeddings (kNN with k in 1/3/5, centroid, logistic
regression), each with and without the experts' descriptions as extra training text, and the
same heads over an encoder tuned contrastively on the examples (SetFit-style). Each is scored by
stratified k-fold cross-validation on the user's examples; the best is refitted on everything,
and its held-out scores calibrate the confidence. The router goes into the bundle in a fresh
directory that becomes live only when the manifest is swapped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.bundle.writer import BundleWriter
from wallbreak.coe.router.encoder import Encoder, weights_sha256
from wallbreak.coe.router.heads import expected_calibration_error, fit_head, fit_scale, softmax
from wallbreak.common.atomic import fsync_tree
from wallbreak.common.jsonfile import iter_jsonl
from wallbreak.errors import ConfigError
from wallbreak.progress import progress as progress_bar

log = logging.getLogger(__name__)

METHODS = ("knn", "centroid", "logreg", "tuned")
KNN_KS = (1, 3, 5)
ROUTER_FORMAT = 1
DEFAULT_THRESHOLD = 0.4  # with a generalist: below this calibrated confidence, send it there


@dataclass(frozen=True)
class Example:
    prompt: str
    expert: str
    line: int = 0  # 0: from the bundle's manifest


def read_examples(path: Path, valid: Sequence[str]) -> list[Example]:
    """Parse a JSON-lines file of {"prompt", "expert"}; every problem names its line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"examples file {path} does not exist")
    shape = 'each line must be an object like {"prompt": "...", "expert": "<name>"}'
    out: list[Example] = []
    unknown: dict[str, list[int]] = {}
    for n, text, row in iter_jsonl(path, shape):
        if (
            not isinstance(row, dict)
            or set(row) - {"prompt", "expert"}
            or not {"prompt", "expert"} <= set(row)
        ):
            raise ConfigError(f"{path}:{n}: {shape} (got {text[:80]!r})")
        prompt, expert = row["prompt"], row["expert"]
        if not isinstance(prompt, str) or not isinstance(expert, str):
            raise ConfigError(f"{path}:{n}: prompt and expert must be strings; {shape}")
        if not prompt.strip():
            raise ConfigError(f"{path}:{n}: the prompt is empty")
        if expert not in valid:
            unknown.setdefault(expert, []).append(n)
            continue
        out.append(Example(prompt, expert, n))
    if unknown:
        where = "; ".join(f"{name!r} (line {', '.join(map(str, ls[:5]))})" for name, ls in unknown.items())
        raise ConfigError(f"{path}: unknown expert {where}; this bundle has: {', '.join(valid)}")
    if not out:
        raise ConfigError(f"{path} holds no examples; {shape}")
    return out


@dataclass(frozen=True)
class FitOptions:
    examples: Path | None = None
    generalist: str | None = None
    threshold: float | None = None
    methods: tuple[str, ...] = METHODS  # ("tuned",) alone: only heads over the tuned encoder
    tune_steps: int | None = None  # None: scaled to the number of examples
    encoder: Path | None = None  # None: all-MiniLM-L6-v2 from its PyPI package
    folds: int | None = None  # None: up to 4, fewer when an expert has fewer examples
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"unknown router method(s) {bad}; choose from {', '.join(METHODS)}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be a confidence between 0 and 1, got {self.threshold}")
        if self.threshold is not None and self.threshold > 0 and self.generalist is None:
            raise ConfigError(
                "--threshold sends low-confidence prompts to a generalist: name one with --generalist"
            )
        if self.tune_steps is not None and self.tune_steps < 1:
            raise ConfigError(f"--tune-steps must be at least 1, got {self.tune_steps}")
        if self.folds is not None and self.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.folds}")


@dataclass
class FitReport:
    chosen: str
    cv_accuracy: float
    candidates: dict[str, float]
    n_examples: int
    n_manifest_examples: int
    folds: int
    scale: float
    ece: float
    threshold: float
    generalist: str | None
    encoder: str
    truncated: int
    seconds: float
    tune_steps: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        ranked = sorted(self.candidates.items(), key=lambda kv: -kv[1])
        lines = [
            f"chose {self.chosen}: {self.folds}-fold CV accuracy {self.cv_accuracy:.3f} "
            f"on {self.n_examples} example(s) (+{self.n_manifest_examples} from the manifest)",
            "candidates: " + ", ".join(f"{k} {v:.3f}" for k, v in ranked),
            f"confidence calibrated (scale {self.scale:.1f}, expected calibration error {self.ece:.3f}); "
            + (
                f"below {self.threshold:.2f} a prompt goes to {self.generalist}"
                if self.generalist
                else "no generalist, so no fallback"
            ),
        ]
        if self.truncated:
            lines.append(
                f"{self.truncated} prompt(s) were longer than the encoder's window and were truncated"
            )
        return "\n".join(lines + self.notes) + f"\nfitted in {self.seconds:.1f} s"


def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % k
    return fold


def fold_count(y_cv: np.ndarray, classes: int) -> int:
    """Cross-validation folds: up to 4, fewer when an expert has fewer examples (at least 2)."""
    counts = np.bincount(y_cv, minlength=classes)
    return int(min(4, max(2, counts[counts > 0].min())))


def auto_tune_steps(n_train: int) -> int:
    """About 15 passes over each example in 32-prompt batches, within [30, 200] steps."""
    return int(min(200, max(30, math.ceil(15 * n_train / 32))))


def _head_specs(methods: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """Heads named in `methods`; "tuned" alone means every head, over the tuned encoder only."""
    if set(methods) == {"tuned"}:
        methods = METHODS
    specs: list[tuple[str, str, dict[str, Any]]] = []
    if "knn" in methods:
        specs += [(f"knn-k{k}", "knn", {"k": k}) for k in KNN_KS]
    if "centroid" in methods:
        specs.append(("centroid", "centroid", {}))
    if "logreg" in methods:
        specs.append(("logreg", "logreg", {"C": 10.0}))
    return specs


@dataclass
class _Data:
    texts: list[str]  # CV items first, then always-train extras, then descriptions
    y: np.ndarray
    n_cv: int
    n_extra: int

    def train_mask(self, fold: np.ndarray, f: int, desc: bool) -> np.ndarray:
        m = np.ones(len(self.texts), bool)
        m[: self.n_cv] = fold != f
        if not desc:
            m[self.n_cv + self.n_extra :] = False
        return m

    def all_mask(self, desc: bool) -> np.ndarray:
        m = np.ones(len(self.texts), bool)
        if not desc:
            m[self.n_cv + self.n_extra :] = False
        return m


def _labelled(bundle: Bundle, opts: FitOptions) -> tuple[_Data, bool]:
    """The labelled texts: the examples file's prompts (cross-validated on; else the manifest's), the
    manifest's otherwise, and the experts' descriptions; whether any expert has a description."""
    names = bundle.names
    user = read_examples(opts.examples, names) if opts.examples else []
    manifest = [Example(p, e.name) for e in bundle.experts.values() for p in e.examples if p.strip()]
    cv_items, extras = (user, manifest) if user else (manifest, [])
    if not cv_items:
        raise ConfigError('no labelled prompts: pass --examples FILE.jsonl (lines of {"prompt", "expert"})')
    index = {n: i for i, n in enumerate(names)}
    covered = {e.expert for e in cv_items + extras}
    missing = [n for n in names if n not in covered and n != opts.generalist]
    if missing:
        raise ConfigError(
            f"expert(s) {', '.join(missing)} have no labelled prompts, so nothing could ever be routed to "
            "them; add lines for them to the examples file"
        )
    descs = [(e.description, e.name) for e in bundle.experts.values() if e.description.strip()]
    data = _Data(
        texts=[e.prompt for e in cv_items + extras] + [d for d, _ in descs],
        y=np.array([index[e.expert] for e in cv_items + extras] + [index[n] for _, n in descs], np.int64),
        n_cv=len(cv_items),
        n_extra=len(extras),
    )
    return data, bool(descs)


def _frozen_scores(
    data: _Data,
    vectors: np.ndarray,
    specs: list[tuple[str, str, dict[str, Any]]],
    fold: np.ndarray,
    k: int,
    desc_options: tuple[bool, ...],
    classes: int,
) -> dict[str, np.ndarray]:
    """Out-of-fold scores of every head over the frozen embeddings, with and without descriptions."""
    oof: dict[str, np.ndarray] = {}
    for desc in desc_options:
        for label, kind, params in specs:
            name = label + ("+desc" if desc else "")
            oof[name] = np.zeros((data.n_cv, classes), np.float32)
            for f in range(k):
                tr = data.train_mask(fold, f, desc)
                head = fit_head(kind, vectors[tr], data.y[tr], classes, **params)
                te = np.flatnonzero(fold == f)
                oof[name][te] = head.scores(vectors[te])
    return oof


def _tuned_scores(
    data: _Data,
    encoder: Encoder,
    specs: list[tuple[str, str, dict[str, Any]]],
    fold: np.ndarray,
    k: int,
    desc: bool,
    classes: int,
    steps: int,
    seed: int,
    bar: Any,
) -> dict[str, np.ndarray]:
    """Out-of-fold scores of every head over an encoder tuned on each fold's training part."""
    oof = {label: np.zeros((data.n_cv, classes), np.float32) for label, _, _ in specs}
    for f in range(k):
        tr = data.train_mask(fold, f, desc)
        texts = [t for t, m in zip(data.texts, tr, strict=True) if m]
        enc_f = encoder.tuned(texts, list(data.y[tr]), steps, seed=seed, progress=lambda: bar.update(1))
        te = np.flatnonzero(fold == f)
        emb_tr = enc_f.encode(texts).vectors
        emb_te = enc_f.encode([data.texts[i] for i in te]).vectors
        for label, kind, params in specs:
            oof[label][te] = fit_head(kind, emb_tr, data.y[tr], classes, **params).scores(emb_te)
    return oof


def fit_router(bundle_dir: Path, opts: FitOptions, progress: bool = True) -> FitReport | None:
    """Fit and store a router; None when the bundle has a single expert (it needs none)."""
    t0 = time.perf_counter()
    bundle = Bundle.open(bundle_dir)
    names = bundle.names
    if len(names) < 2:
        return None
    if opts.generalist is not None and opts.generalist not in names:
        raise ConfigError(
            f"--generalist {opts.generalist!r} is not in the bundle; it has: {', '.join(names)}"
        )
    data, has_descs = _labelled(bundle, opts)
    y_cv = data.y[: data.n_cv]
    k = opts.folds or fold_count(y_cv, len(names))
    fold = stratified_folds(y_cv, k, opts.seed)
    encoder = Encoder(opts.encoder)
    frozen = encoder.encode(data.texts)
    specs = _head_specs(opts.methods)
    C = len(names)
    oof = _frozen_scores(data, frozen.vectors, specs, fold, k, (False, True) if has_descs else (False,), C)
    acc = {n: float((s.argmax(1) == y_cv).mean()) for n, s in oof.items()}
    use_desc = has_descs and max(v for n, v in acc.items() if n.endswith("+desc")) > max(
        v for n, v in acc.items() if not n.endswith("+desc")
    )
    steps = 0
    if "tuned" in opts.methods:
        n_train = int(data.all_mask(use_desc).sum())
        steps = opts.tune_steps or auto_tune_steps(n_train)
        fold_steps = opts.tune_steps or auto_tune_steps(int(n_train * (k - 1) / k))
        bar = progress_bar(
            fold_steps * k + steps,
            "tuning the encoder (cross-validation, then final)",
            "step",
            enabled=progress,
        )
        tuned_oof = _tuned_scores(data, encoder, specs, fold, k, use_desc, C, fold_steps, opts.seed, bar)
        for label, s in tuned_oof.items():
            name = "tuned-" + label + ("+desc" if use_desc else "")
            oof[name] = s
            acc[name] = float((s.argmax(1) == y_cv).mean())
    if set(opts.methods) == {"tuned"}:
        oof = {n: s for n, s in oof.items() if n.startswith("tuned-")}
    # Ties go to the candidate listed first: frozen before tuned, simpler before richer.
    chosen = max(oof, key=lambda n: (acc[n], -list(oof).index(n)))
    tuned = chosen.startswith("tuned-")
    desc = chosen.endswith("+desc")
    label = chosen.removeprefix("tuned-").removesuffix("+desc")
    kind, params = next((kd, pr) for lb, kd, pr in specs if lb == label)
    mask = data.all_mask(desc)
    final_encoder, vectors = encoder, frozen.vectors[mask]
    if tuned:  # the final encoder is tuned on every training text
        train_texts = [t for t, m in zip(data.texts, mask, strict=True) if m]
        final_encoder = encoder.tuned(train_texts, list(data.y[mask]), steps, seed=opts.seed,
                                      progress=lambda: bar.update(1))  # fmt: skip
        vectors = final_encoder.encode(train_texts).vectors
    if "tuned" in opts.methods:
        bar.close()
    head = fit_head(kind, vectors, data.y[mask], C, **params)
    scale = fit_scale(oof[chosen], y_cv)
    ece = expected_calibration_error(softmax(oof[chosen], scale), y_cv)
    threshold = (
        opts.threshold if opts.threshold is not None else DEFAULT_THRESHOLD if opts.generalist else 0.0
    )
    report = FitReport(
        chosen=chosen,
        cv_accuracy=acc[chosen],
        candidates=acc,
        n_examples=data.n_cv,
        n_manifest_examples=data.n_extra,
        folds=k,
        scale=scale,
        ece=ece,
        threshold=threshold,
        generalist=opts.generalist,
        encoder=encoder.name,
        truncated=int(frozen.truncated.sum()),
        seconds=0.0,
        tune_steps=steps if tuned else 0,
    )
    train = TrainingSet(vectors, data.y[mask], (np.arange(len(data.texts)) < data.n_cv)[mask])
    _store(bundle_dir, names, head, final_encoder if tuned else None, encoder, report, train)
    report.seconds = time.perf_counter() - t0
    return report


def _store(
    bundle_dir: Path,
    labels: list[str],
    head: Any,
    tuned: Encoder | None,
    base: Encoder,
    report: FitReport,
    train: TrainingSet,
) -> None:
    with BundleWriter(bundle_dir) as w:
        d = w.new_router_dir()
        save_arrays(d, head, train)
        enc_meta: dict[str, Any] = {"base": base.identity(), "source": str(base.path), "stored": False}
        if tuned is not None:
            tuned.save(d / "encoder")
            enc_meta.update(stored=True, tuned={"name": tuned.name, "sha256": weights_sha256(d / "encoder")})
        fsync_tree(d)
        w.set_router(
            {
                "format": ROUTER_FORMAT,
                "dir": str(d.relative_to(bundle_dir)),
                "method": report.chosen,
                "labels": labels,
                "head": head.to_json(),
                "encoder": enc_meta,
                "scale": report.scale,
                "threshold": report.threshold,
                "generalist": report.generalist,
                "cv": {
                    "folds": report.folds,
                    "accuracy": report.cv_accuracy,
                    "candidates": report.candidates,
                },
                "n_examples": report.n_examples,
                "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "train": TRAIN_FILE,
            }
        )


TRAIN_FILE = "train.safetensors"


@dataclass
class TrainingSet:
    """The head's training rows as the router's encoder embeds them, kept beside the head so that an
    expert can be added or removed without encoding the others again (router/incremental.py)."""

    vectors: np.ndarray  # [n, d] float32, unit length
    y: np.ndarray  # [n] int64: index into the router's labels
    cv: np.ndarray  # [n] bool: a user example (cross-validated on), not a description or extra

    def arrays(self) -> dict[str, np.ndarray]:
        return {"vectors": self.vectors, "y": self.y, "cv": self.cv.astype(np.uint8)}


def save_arrays(d: Path, head: Any, train: TrainingSet) -> None:
    """A router directory's arrays: the head's, and the training set's."""
    from safetensors.numpy import save_file  # deferred: loads safetensors

    save_file({k: np.ascontiguousarray(v) for k, v in head.arrays.items()}, str(d / "head.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in train.arrays().items()}, str(d / TRAIN_FILE))
