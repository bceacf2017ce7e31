"""The router at serving time: prompts -> Decisions (expert, confidence, ranked top-k, fallback)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.router.encoder import Encoder, default_encoder_path, weights_sha256
from wallbreak.coe.router.heads import Head, softmax
from wallbreak.errors import BundleError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    expert: str
    confidence: float
    top_k: tuple[tuple[str, float], ...]  # best first; what the engine prefetches
    fallback: bool  # confidence was under the threshold, so the generalist answers
    truncated: bool = False  # the prompt was longer than the encoder's window

    def to_json(self) -> dict[str, Any]:
        return {
            "expert": self.expert,
            "confidence": self.confidence,
            "top_k": [{"expert": e, "score": s} for e, s in self.top_k],
            "fallback": self.fallback,
            "truncated": self.truncated,
        }


def check_prompts(prompts: Sequence[str]) -> None:
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ConfigError(f"prompt {i} is a {type(p).__name__}, not text")
        if not p.strip():
            raise ConfigError(f"prompt {i} is empty; the router needs text to route")


class Router:
    """Load once (`Router.load`), then `route(prompts)`; safe to call from one thread at a time."""

    def __init__(
        self,
        experts: Sequence[str],
        labels: Sequence[str] = (),
        encoder: Encoder | None = None,
        head: Head | None = None,
        scale: float = 1.0,
        threshold: float = 0.0,
        generalist: str | None = None,
        method: str = "none",
    ) -> None:
        self.experts = list(experts)
        self.labels = list(labels)
        self.encoder = encoder
        self.head = head
        self.scale = scale
        self.threshold = threshold
        self.generalist = generalist
        self.method = method
        # Experts fitted but since removed from the bundle can no longer be chosen.
        self._live = np.array([lb in set(self.experts) for lb in self.labels], bool)

    @property
    def fitted(self) -> bool:
        return self.head is not None

    @classmethod
    def load(
        cls,
        bundle: Bundle | str | Path,
        encoder: str | Path | None = None,
        generalist: str | None = None,
        threshold: float | None = None,
        reuse: Router | None = None,
    ) -> Router:
        """`reuse`: a router loaded before, whose encoder is kept when the new state names the same
        weights (a live server picking up a head updated in place)."""
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        names = b.names
        if generalist is not None and generalist not in names:
            raise ConfigError(f"generalist {generalist!r} is not in the bundle; it has: {', '.join(names)}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must be between 0 and 1, got {threshold}")
        meta = b.router
        if len(names) == 1:
            return cls(names, method="single-expert")
        if not meta:
            fallback = generalist or names[0]
            log.warning(
                "bundle %s has no fitted router; every prompt goes to the generalist %s "
                "(fit one with `wallbreak router fit`)",
                b.root,
                fallback,
            )
            return cls(names, generalist=fallback, method="none")
        head, enc = load_parts(b, meta, encoder, reuse.encoder if reuse is not None else None)
        labels = list(meta["labels"])
        gone = [lb for lb in labels if lb not in names]
        new = [n for n in names if n not in labels]
        if gone:
            log.warning("router was fitted with expert(s) %s that the bundle no longer has", ", ".join(gone))
        if new:
            log.warning(
                "expert(s) %s joined after the router was fitted; refit to route to them", ", ".join(new)
            )
        g = generalist if generalist is not None else meta.get("generalist")
        if g is not None and g not in names:
            raise BundleError(f"the router's generalist {g!r} is no longer in the bundle; refit the router")
        t = threshold if threshold is not None else float(meta.get("threshold", 0.0))
        return cls(names, labels, enc, head, float(meta["scale"]), t, g, str(meta["method"]))

    def route(self, prompts: Sequence[str], top_k: int = 3) -> list[Decision]:
        check_prompts(prompts)
        if top_k < 1:
            raise ConfigError(f"top-k must be at least 1, got {top_k}")
        if self.head is None or self.encoder is None:
            only = self.generalist or self.experts[0]
            fell = self.method == "none"
            conf = 0.0 if fell else 1.0
            return [Decision(only, conf, ((only, conf),), fell) for _ in prompts]
        enc = self.encoder.encode(prompts)
        probs = softmax(self.head.scores(enc.vectors), self.scale)
        if not self._live.all():
            probs = probs * self._live
            probs /= np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
        k = min(top_k, int(self._live.sum()))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out = []
        for row, idx, trunc in zip(probs, order, enc.truncated, strict=True):
            ranked = tuple((self.labels[i], float(row[i])) for i in idx)
            best, conf = ranked[0]
            g = self.generalist
            fell = g is not None and conf < self.threshold
            out.append(Decision(g if g is not None and fell else best, conf, ranked, fell, bool(trunc)))
        return out


def _same_weights(enc: Encoder, identity: dict[str, Any]) -> bool:
    try:
        return bool(enc.sha256 == identity.get("sha256"))
    except OSError:  # its folder went with the router state it came from
        return False


def load_parts(
    b: Bundle, meta: dict[str, Any], encoder: str | Path | None, loaded: Encoder | None = None
) -> tuple[Head, Encoder]:
    from safetensors.numpy import load_file  # deferred: loads safetensors

    try:
        d = b.root / meta["dir"]
        arrays = load_file(str(d / "head.safetensors"))
        head = Head.from_json(meta["head"], arrays)
        enc_meta = meta["encoder"]
    except (KeyError, TypeError) as e:
        raise BundleError(f"router state in {b.root} is incomplete ({e}); refit it") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read the router's head in {b.root}: {e}; refit it") from None
    base = enc_meta["base"]
    if loaded is not None and _same_weights(loaded, (enc_meta["tuned"] if enc_meta.get("stored") else base)):
        return head, loaded
    if enc_meta.get("stored"):
        folder = d / "encoder"
        want = enc_meta["tuned"]["sha256"]
        if not folder.is_dir() or weights_sha256(folder) != want:
            raise BundleError(
                f"the router's tuned encoder in {folder} is missing or altered; refit the router"
            )
        return head, Encoder(folder, name=enc_meta["tuned"]["name"])
    if encoder is not None:
        path = Path(encoder)
    elif Path(enc_meta.get("source", "")).is_dir():
        path = Path(enc_meta["source"])
    else:
        path = default_encoder_path()
    enc = Encoder(path, name=base["name"])
    if enc.sha256 != base["sha256"]:
        raise ConfigError(
            f"the router was fitted with encoder {base['name']} (sha256 {base['sha256'][:12]}...), "
            f"but {path} holds different weights (sha256 {enc.sha256[:12]}...); "
            "use the original encoder or refit with `wallbreak router fit`"
        )
    return head, enc
