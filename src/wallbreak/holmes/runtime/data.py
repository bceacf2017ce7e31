"""Training data: prepared token files (`wallbreak data prepare`), or any text tokenized in memory.

A prepared DATA folder holds `tokens.bin` (the documents' token ids, end-of-text between them,
uint16 or uint32) and `index.json` (format, dtype, token count, documents, the tokenizer's hash);
training memory-maps it. `prepare` writes it under a temporary name and renames it, so a DATA
folder is complete or absent. Plain text (a file or a directory) still works for quick runs: with
no --data the corpus is the Python standard library's source, and the tokenizer is byte-level
(vocab 256) unless --tokenizer names a Hugging Face tokenizer folder.

`Batches` owns the sample order: a fixed shuffle of all fixed-length samples, cycled, so the
samples of step k depend on k and the global batch only; a resumed run (on any plan) continues at
the exact sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wallbreak.common.atomic import atomic_dir, atomic_write_json
from wallbreak.common.jsonfile import iter_jsonl, read_json
from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.source import has_tokenizer
from wallbreak.progress import progress

DATA_FORMAT = "wallbreak-tokens"
DATA_VERSION = 1
INDEX, TOKENS = "index.json", "tokens.bin"

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
        tok = load_tokenizer(tokenizer_dir)
        ids = np.array(tok(text)["input_ids"], dtype=np.int64)
        need = int(ids.max()) + 1
    if need > vocab:
        raise ConfigError(f"the tokenizer needs a vocabulary of {need}, but the model's is {vocab}")
    return torch.from_numpy(ids)


def load_tokenizer(tokenizer_dir: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer  # deferred: loads transformers

    if not has_tokenizer(Path(tokenizer_dir)):
        raise ConfigError(f"--tokenizer {tokenizer_dir} is not a Hugging Face tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--tokenizer {tokenizer_dir}: {str(e).splitlines()[0]}") from None


def tokenizer_hash(tok: Any) -> str:
    """What two tokenizers must share to give the same ids: the vocabulary and the special tokens."""
    body = json.dumps(
        {"vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
         "special": sorted(map(str, tok.all_special_tokens))},
        ensure_ascii=False,
    )  # fmt: skip
    return hashlib.sha256(body.encode()).hexdigest()


def _documents(path: Path) -> Iterator[str]:
    """The documents of one source: a JSONL file's `text` fields, or a text file as one document."""
    if path.suffix == ".jsonl":
        shape = "each line needs a string field 'text'"
        for n, _, rec in iter_jsonl(path, shape):
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"{path}:{n}: {shape}")
            yield text
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _sources(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            raise ConfigError(f"data source {p} does not exist")
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES | {".jsonl"})
        else:
            files.append(p)
    if not files:
        raise ConfigError(f"no text or .jsonl files in {', '.join(map(str, paths))}")
    return files


def prepare(paths: Sequence[Path], tokenizer_dir: Path, out: Path) -> dict[str, Any]:
    """Tokenize `paths` (text, or JSONL with a `text` field) into the DATA folder `out`; its index."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} exists; give a new folder (prepared data is never overwritten)")
    files = _sources(paths)
    tok = load_tokenizer(tokenizer_dir)
    vocab = len(tok)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    eos = tok.eos_token_id
    count = docs = 0
    with atomic_dir(out) as tmp:
        with open(tmp / TOKENS, "wb") as f, progress(
            sum(p.stat().st_size for p in files), "tokenizing", "B", unit_scale=True
        ) as bar:  # fmt: skip
            for path in files:
                for text in _documents(path):
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    if eos is not None:
                        ids.append(eos)
                    np.asarray(ids, dtype=dtype).tofile(f)
                    count, docs = count + len(ids), docs + 1
                bar.update(path.stat().st_size)
        index = {
            "format": DATA_FORMAT, "version": DATA_VERSION, "dtype": np.dtype(dtype).name,
            "tokens": count, "documents": docs, "vocab_size": vocab,
            "tokenizer": {"hash": tokenizer_hash(tok), "path": str(Path(tokenizer_dir).resolve())},
            "sources": [str(p.resolve()) for p in files],
        }  # fmt: skip
        atomic_write_json(tmp / INDEX, index)
    return index


def open_prepared(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A DATA folder's tokens (memory-mapped) and its index."""
    index = read_json(path / INDEX, "prepared data")
    if not isinstance(index, dict) or index.get("format") != DATA_FORMAT:
        raise ConfigError(
            f"{path / INDEX} is not a wallbreak token index (write one with `wallbreak data prepare`)"
        )
    if index.get("version") != DATA_VERSION or index.get("dtype") not in ("uint16", "uint32"):
        raise ConfigError(f"{path / INDEX}: version {index.get('version')!r}, dtype {index.get('dtype')!r}; "
                          f"this wallbreak reads version {DATA_VERSION}, uint16 or uint32")  # fmt: skip
    dtype = np.dtype(index["dtype"])
    size = (path / TOKENS).stat().st_size if (path / TOKENS).is_file() else -1
    if size != int(index.get("tokens", -1)) * dtype.itemsize:
        raise ConfigError(
            f"{path / TOKENS} holds {size} bytes; its index promises {index.get('tokens')} tokens"
        )
    return np.memmap(path / TOKENS, dtype=dtype, mode="r"), index


def training_tokens(
    data: Path | None, tokenizer_dir: Path | None, vocab: int, model_tokenizer: str | None
) -> np.ndarray | torch.Tensor:
    """The token stream a run trains on. A prepared folder must come from the model's own tokenizer
    (same hash) where the model names one, and fit its vocabulary in any case."""
    if data is not None and (data / INDEX).is_file():
        tokens, index = open_prepared(data)
        if model_tokenizer:
            want = tokenizer_hash(load_tokenizer(Path(model_tokenizer)))
            if index["tokenizer"].get("hash") != want:
                raise ConfigError(
                    f"--data {data} was tokenized with {index['tokenizer'].get('path')}, which does not "
                    f"match the model's tokenizer {model_tokenizer}; prepare it again with "
                    f"--tokenizer {model_tokenizer}"
                )
        if int(index["vocab_size"]) > vocab:
            raise ConfigError(
                f"--data {data} needs a vocabulary of {index['vocab_size']}, but the model's is {vocab}"
            )
        return tokens
    tok_dir = tokenizer_dir or (Path(model_tokenizer) if model_tokenizer else None)
    return tokenize(read_text(data or default_corpus()), tok_dir, vocab)


class Batches:
    """Global batch `step`: a fixed shuffle of all sequences, cycled; data-parallel rank d takes
    its contiguous slice, then micro-batches split that slice in order."""

    def __init__(
        self, tokens: torch.Tensor | np.ndarray, seq_len: int, global_batch: int, seed: int = 0
    ) -> None:
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
        rows = torch.stack(
            [torch.as_tensor(np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64))
             for s in starts.tolist()]
        )  # fmt: skip
        return rows[:, :-1], rows[:, 1:]

    def shard(
        self, step: int, dp_index: int, dp: int, micro_batch: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.batch(step)
        per = self.global_batch // dp
        x, y = x[dp_index * per : (dp_index + 1) * per], y[dp_index * per : (dp_index + 1) * per]
        return [(x[i : i + micro_batch], y[i : i + micro_batch]) for i in range(0, per, micro_batch)]
