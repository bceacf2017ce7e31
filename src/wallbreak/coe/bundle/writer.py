"""Writing a bundle: blobs and tokenizer folders under fresh names, then the manifest replaced by
rename (the commit point), under the bundle's writer lock; and the sweep of what an interrupted
write left. The format itself, and reading, are `manifest.py`'s."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wallbreak.coe.bundle.manifest import (
    BLOB_ALIGN,
    DTYPE_NAMES,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TENSOR_ALIGN,
    TENSOR_DTYPE_NAMES,
    Bundle,
    ExpertEntry,
    TensorEntry,
    align_up,
    check_expert_name,
    check_relative,
)
from wallbreak.common.atomic import atomic_write_json, fsync_dir, fsync_tree
from wallbreak.errors import BundleError, ConfigError


@dataclass
class ExpertSource:
    """Everything needed to write one expert: tensors in state-dict order plus metadata."""

    name: str
    model_type: str
    config: dict[str, Any]
    tensors: Iterable[tuple[str, torch.Tensor]]
    tokenizer_dir: Path | None = None
    description: str = ""
    examples: Sequence[str] = ()
    source: str = ""


def plan_layout(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[list[int], int]:
    """Offsets for tensors laid end to end at TENSOR_ALIGN, and the blob size padded to BLOB_ALIGN."""
    offsets, pos = [], 0
    for _, dtype, shape in specs:
        pos = align_up(pos, TENSOR_ALIGN)
        offsets.append(pos)
        pos += math.prod(shape) * dtype.itemsize
    return offsets, align_up(max(pos, 1), BLOB_ALIGN)


class BundleWriter:
    """Adds experts to a bundle (creating it if needed); the manifest is replaced once, at commit.

    Use as a context manager: leaving the block normally commits, an exception rolls back by
    deleting the files this writer created, and the old manifest stays untouched either way.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._entries: list[ExpertEntry] = []
        self._created: list[Path] = []
        self._lock_fd: int | None = None
        self._existing: dict[str, Any] | None = None
        self._router: dict[str, Any] | None = None
        self._router_set = False
        self._removed: set[str] = set()

    def __enter__(self) -> BundleWriter:
        if self.root.exists() and not self.root.is_dir():
            raise BundleError(f"{self.root} exists and is not a directory")
        (self.root / "experts").mkdir(parents=True, exist_ok=True)
        (self.root / "tokenizers").mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise BundleError(
                f"another process is writing bundle {self.root}; try again when it finishes"
            ) from None
        if (self.root / MANIFEST).exists():
            self._existing = Bundle.open(self.root).raw
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._commit()
            else:
                self._rollback()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def add(
        self,
        src: ExpertSource,
        dtype: torch.dtype | None = None,
        progress: Any = None,
        quant: dict[str, Any] | None = None,
    ) -> ExpertEntry:
        """Write one expert's blob and tokenizer under fresh names; returns its manifest entry.

        `quant`: the record of a compact expert whose tensors `compact.compact_tensors` produced."""
        check_expert_name(src.name)
        if any(e.name == src.name for e in self._entries):
            raise ConfigError(f"expert {src.name!r} is added twice in one write")
        tensors = []
        seen_ptrs: set[tuple[int, int]] = set()
        for tname, t in src.tensors:
            key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
            if key in seen_ptrs and t.numel() > 0:
                continue  # a tied weight: stored once, the skeleton ties it again on load
            seen_ptrs.add(key)
            t = t.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if t.dtype not in TENSOR_DTYPE_NAMES or (quant is None and t.dtype not in DTYPE_NAMES):
                raise ConfigError(f"tensor {tname!r} has dtype {t.dtype}; bundles hold {', '.join(DTYPES)}")
            tensors.append((tname, t.contiguous()))
        if not tensors:
            raise ConfigError(f"expert {src.name!r} has no tensors")
        offsets, total = plan_layout([(n, t.dtype, tuple(t.shape)) for n, t in tensors])
        stem = f"{src.name}-{uuid.uuid4().hex[:8]}"
        blob_rel = f"experts/{stem}.blob"
        blob = self.root / blob_rel
        tmp = blob.with_name(f".tmp-{blob.name}")
        self._created.append(tmp)
        entries = []
        with open(tmp, "wb") as f:
            pos = 0
            for (tname, t), off in zip(tensors, offsets, strict=True):
                f.write(b"\0" * (off - pos))
                data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
                mv = memoryview(data.tobytes()) if not data.flags.c_contiguous else data.data.cast("B")
                f.write(mv)
                entries.append(
                    TensorEntry(
                        tname,
                        TENSOR_DTYPE_NAMES[t.dtype],
                        tuple(t.shape),
                        off,
                        len(mv),
                        hashlib.sha256(mv).hexdigest(),
                    )
                )
                pos = off + len(mv)
                if progress is not None:
                    progress(len(mv))
            f.write(b"\0" * (total - pos))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, blob)
        fsync_dir(blob.parent)
        self._created.append(blob)
        tok_rel, tok_files = self._write_tokenizer(src.tokenizer_dir, stem)
        dtypes = {t.dtype for t in entries}
        entry = ExpertEntry(
            name=src.name,
            model_type=src.model_type,
            config=src.config,
            dtype=quant["form"] if quant else (dtypes.pop() if len(dtypes) == 1 else "float32"),
            blob=blob_rel,
            total_bytes=total,
            tensors=tuple(entries),
            tokenizer_dir=tok_rel,
            tokenizer_files=tok_files,
            description=src.description,
            examples=tuple(src.examples),
            source=src.source,
            quant=quant,
        )
        self._entries.append(entry)
        return entry

    @property
    def existing(self) -> dict[str, Any] | None:
        """The manifest this write started from (None: a new bundle)."""
        return self._existing

    def remove(self, name: str) -> None:
        """Drop an expert at commit; its files go once the new manifest is in place."""
        have = [d["name"] for d in (self._existing or {"experts": []})["experts"]]
        if name not in have:
            listed = ", ".join(have) or "(none)"
            raise BundleError(f"no expert {name!r} in bundle {self.root}; it has: {listed}")
        self._removed.add(name)

    def _write_tokenizer(self, src_dir: Path | None, stem: str) -> tuple[str | None, dict[str, str]]:
        if src_dir is None:
            return None, {}
        rel = f"tokenizers/{stem}"
        tmp = self.root / "tokenizers" / f".tmp-{stem}"
        self._created.append(tmp)
        shutil.copytree(src_dir, tmp, symlinks=False)
        files = {
            str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        fsync_tree(tmp)
        os.replace(tmp, self.root / rel)
        fsync_dir(self.root / "tokenizers")
        self._created.append(self.root / rel)
        return rel, files

    def new_router_dir(self) -> Path:
        """A fresh directory for router files; it is referenced (and so live) only after commit."""
        path = self.root / "router" / uuid.uuid4().hex[:12]
        path.mkdir(parents=True)
        self._created.append(path)
        return path

    def set_router(self, router: dict[str, Any] | None) -> None:
        """Stage router state (its `dir` from new_router_dir) to be written with the manifest."""
        self._router = router
        self._router_set = True

    def _commit(self) -> None:
        base = self._existing or {"format": FORMAT, "version": FORMAT_VERSION, "experts": []}
        gone = {e.name for e in self._entries} | self._removed
        kept = [d for d in base["experts"] if d["name"] not in gone]
        replaced = [d for d in base["experts"] if d["name"] in gone]
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "generation": int(base.get("generation", 0)) + 1,
            "experts": kept + [e.to_json() for e in self._entries],
            "router": self._router if self._router_set else base.get("router"),
        }
        for sub in ("experts", "tokenizers", "router"):  # the new names are durable before they are live
            fsync_dir(self.root / sub)
        atomic_write_json(self.root / MANIFEST, manifest)
        fsync_dir(self.root)
        # Only after the new manifest is in place are the replaced and removed experts' files
        # unreferenced (a server still serving one keeps it open: coe/live.py);
        # every path deleted was checked to lie inside the bundle when the old manifest was opened,
        # and is checked again here.
        for d in replaced:
            with contextlib.suppress(FileNotFoundError):
                check_relative(self.root, d["blob"], "replaced blob", "experts").unlink()
            if d.get("tokenizer"):
                tok = check_relative(self.root, d["tokenizer"]["dir"], "replaced tokenizer", "tokenizers")
                shutil.rmtree(tok, ignore_errors=True)
        old_router = (base.get("router") or {}).get("dir")
        if self._router_set and old_router and old_router != (self._router or {}).get("dir"):
            shutil.rmtree(check_relative(self.root, old_router, "old router", "router"), ignore_errors=True)
        self._created.clear()

    def _rollback(self) -> None:
        for p in reversed(self._created):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        self._created.clear()


def sweep(root: Path) -> tuple[int, int]:
    """Remove what interrupted writes left in a bundle: temporary files and folders, and blobs,
    tokenizer folders and router folders the manifest does not name. Only while no writer holds
    the bundle's lock (and where we may write); returns (entries, bytes) removed."""
    try:
        fd = os.open(root / ".lock", os.O_RDWR)
    except OSError:
        return 0, 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0, 0  # a writer is at work: what looks unreferenced may be its
        raw = Bundle.open(root, lenient=True).raw
        live = {d["blob"] for d in raw["experts"]}
        live |= {d["tokenizer"]["dir"] for d in raw["experts"] if d.get("tokenizer")}
        live |= {(raw.get("router") or {}).get("dir")}
        stale = list(root.glob(".tmp-*"))
        for sub in ("experts", "tokenizers", "router"):
            if (root / sub).is_dir():
                stale += [p for p in (root / sub).iterdir() if f"{sub}/{p.name}" not in live]
        count = nbytes = 0
        for p in stale:
            folder = p.is_dir() and not p.is_symlink()
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if folder else p.lstat().st_size
            try:
                if folder:
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError:
                continue
            count, nbytes = count + 1, nbytes + size
        return count, nbytes
    finally:
        os.close(fd)
