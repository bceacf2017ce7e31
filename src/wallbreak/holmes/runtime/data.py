"""Training text: any local file or directory, tokenized without downloads, sharded deterministically.

With no --data, the default corpus is the Python standard library's source of the running
interpreter: text every machine with Python already has. The tokenizer is byte-level (vocab 256)
unless --tokenizer names a Hugging Face tokenizer folder (e.g. one inside a bundle).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wallbreak.errors import ConfigError

DEFAULT_CORPUS_BYTES = 8 << 20
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".c", ".h", ".yaml", ".yml"}


def default_corpus() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_text(path: Path, limit: int = DEFAULT_CORPUS_BYTES) -> str:
    if not path.exists():
        raise ConfigError(f"--data {path} does not exist")
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    )
    parts, size = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(t)
        size += len(t)
        if size >= limit:
            break
    text = "\n".join(parts)
    if not text.strip():
        raise ConfigError(f"--data {path} holds no readable text")
    return text


def tokenize(text: str, tokenizer_dir: Path | None, vocab: int) -> torch.Tensor:
    if tokenizer_dir is None:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        need = 256
    else:
        from transformers import AutoTokenizer  # deferred: loads transformers

        tok: Any = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        ids = np.array(tok(text)["input_ids"], dtype=np.int64)
        need = int(ids.max()) + 1
    if need > vocab:
        raise ConfigError(f"the tokenizer needs a vocabulary of {need}, but the model's is {vocab}")
    return torch.from_numpy(ids)


class Batches:
    """Global batch `step`: a fixed shuffle of all sequences, cycled; data-parallel rank d takes
    its contiguous slice, then micro-batches split that slice in order."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, global_batch: int, seed: int = 0) -> None:
        n = (len(tokens) - 1) // seq_len
        if n < global_batch:
            raise ConfigError(
                f"the corpus has {len(tokens)} tokens: {n} sequences of {seq_len + 1}, fewer than one global "
                f"batch of {global_batch}; give more text with --data"
            )
        self.tokens, self.seq_len, self.global_batch, self.n = tokens, seq_len, global_batch, n
        self.order = torch.from_numpy(np.random.default_rng(seed).permutation(n))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [(step * self.global_batch + i) % self.n for i in range(self.global_batch)]
        starts = self.order[idx] * self.seq_len
        rows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def shard(
        self, step: int, dp_index: int, dp: int, micro_batch: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.batch(step)
        per = self.global_batch // dp
        x, y = x[dp_index * per : (dp_index + 1) * per], y[dp_index * per : (dp_index + 1) * per]
        return [(x[i : i + micro_batch], y[i : i + micro_batch]) for i in range(0, per, micro_batch)]
