"""Expert bundles on disk: a `bundle.json` manifest plus one 4 KiB-aligned weight blob per expert.

The manifest is the commit point. Blobs and tokenizer folders are written under fresh names first,
and only then does a new manifest replace the old one by rename, so a crash at any moment leaves
either the old bundle or the new one, never a half bundle that opens as valid.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import torch

from wallbreak.common.atomic import atomic_write_json, fsync_dir, fsync_tree
from wallbreak.errors import BundleError, ConfigError

MANIFEST = "bundle.json"
FORMAT = "wallbreak-bundle"
FORMAT_VERSION = 1
BLOB_ALIGN = 4096  # O_DIRECT needs file offsets, lengths and buffers aligned to the block size
TENSOR_ALIGN = 64  # every tensor starts on a cache line, so views into a flat buffer stay aligned
RESERVED_NAMES = frozenset({"coe"})  # the virtual model name the router answers to
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# What a tensor may be stored as: the float dtypes, plus the integer payloads of compact experts.
TENSOR_DTYPES: dict[str, torch.dtype] = {**DTYPES, "int8": torch.int8, "uint8": torch.uint8}
TENSOR_DTYPE_NAMES = {v: k for k, v in TENSOR_DTYPES.items()}
# An expert's form: a float dtype, or a compact form (coe/bundle/compact.py owns those).
EXPERT_FORMS = (*DTYPES, "int8", "int4")


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def check_relative(root: Path, rel: Any, where: str, under: str | None = None) -> Path:
    """`root / rel` for a path a manifest names, which must be relative, normalised (no '.', '..'
    or empty parts) and, followed through any link, inside `root`; `under`: the folder it must be
    directly in (blobs in experts/, tokenizers in tokenizers/, routers in router/)."""
    parts = rel.split("/") if isinstance(rel, str) else []
    bad = (
        not parts
        or rel.startswith("/")
        or any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts)
        or (under is not None and (len(parts) != 2 or parts[0] != under))
    )
    if not bad:
        path = root / rel
        base = root.resolve()
        bad = path.resolve() != base and base not in path.resolve().parents
    if bad:
        inside = f"{under}/NAME" if under else "a relative path inside the bundle"
        raise BundleError(f"{where}: path {rel!r} is not allowed: it must be {inside}, with no '..'")
    return root / rel


def check_expert_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(
            f"expert name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise ConfigError(f"expert name {name!r} is reserved for the router; choose another")
    return name


_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "dtype", "shape", "offset", "nbytes", "sha256"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "dtype": {"enum": sorted(TENSOR_DTYPES)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "offset": {"type": "integer", "minimum": 0},
        "nbytes": {"type": "integer", "minimum": 0},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
}
MANIFEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "version", "experts"],
    "properties": {
        "format": {"const": FORMAT},
        "version": {"const": FORMAT_VERSION},
        "experts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "arch", "dtype", "blob", "total_bytes", "tensors", "tokenizer"],
                "properties": {
                    "name": {"type": "string", "pattern": _NAME.pattern},
                    "description": {"type": "string"},
                    "examples": {"type": "array", "items": {"type": "string"}},
                    "arch": {
                        "type": "object",
                        "required": ["model_type", "config"],
                        "properties": {"model_type": {"type": "string"}, "config": {"type": "object"}},
                    },
                    "dtype": {"enum": sorted(EXPERT_FORMS)},
                    "quant": {"type": ["object", "null"]},
                    "blob": {"type": "string", "pattern": "^experts/[^/]+$"},
                    "total_bytes": {"type": "integer", "minimum": 0, "multipleOf": BLOB_ALIGN},
                    "tensors": {"type": "array", "minItems": 1, "items": _TENSOR_SCHEMA},
                    "tokenizer": {
                        "type": ["object", "null"],
                        "required": ["dir", "files"],
                        "properties": {
                            "dir": {"type": "string", "pattern": "^tokenizers/[^/]+$"},
                            "files": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                    "source": {"type": "string"},
                },
            },
        },
        "router": {"type": ["object", "null"]},
    },
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    sha256: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return TENSOR_DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class ExpertEntry:
    name: str
    model_type: str
    config: dict[str, Any]
    dtype: str
    blob: str
    total_bytes: int
    tensors: tuple[TensorEntry, ...]
    tokenizer_dir: str | None
    tokenizer_files: dict[str, str]
    description: str = ""
    examples: tuple[str, ...] = ()
    source: str = ""
    quant: dict[str, Any] | None = None  # compact experts: form, group, kernel layout (coe/bundle/compact.py)

    @functools.cached_property
    def layout_key(self) -> str:
        """Experts with equal keys can share one device slot: same skeleton, same byte layout."""
        h = hashlib.sha256()
        h.update(json.dumps(_arch_identity(self.config), sort_keys=True).encode())
        h.update(self.model_type.encode())
        h.update(str(self.total_bytes).encode())
        for t in self.tensors:
            h.update(f"{t.name}|{t.dtype}|{t.shape}|{t.offset}".encode())
        return h.hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        tok = (
            None if self.tokenizer_dir is None else {"dir": self.tokenizer_dir, "files": self.tokenizer_files}
        )
        return {
            "name": self.name,
            "description": self.description,
            "examples": list(self.examples),
            "arch": {"model_type": self.model_type, "config": self.config},
            "dtype": self.dtype,
            "quant": self.quant,
            "blob": self.blob,
            "total_bytes": self.total_bytes,
            "tensors": [t.to_json() for t in self.tensors],
            "tokenizer": tok,
            "source": self.source,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> ExpertEntry:
        tok = d.get("tokenizer")
        return ExpertEntry(
            name=d["name"],
            model_type=d["arch"]["model_type"],
            config=d["arch"]["config"],
            dtype=d["dtype"],
            blob=d["blob"],
            total_bytes=d["total_bytes"],
            tensors=tuple(
                TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"], t["sha256"])
                for t in d["tensors"]
            ),
            tokenizer_dir=None if tok is None else tok["dir"],
            tokenizer_files={} if tok is None else dict(tok["files"]),
            description=d.get("description", ""),
            examples=tuple(d.get("examples", ())),
            source=d.get("source", ""),
            quant=d.get("quant"),
        )


def _arch_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that shapes the module (names and bookkeeping keys do not)."""
    skip = {"_name_or_path", "transformers_version", "name_or_path"}
    return {k: v for k, v in config.items() if k not in skip}


@dataclass
class Bundle:
    """An opened, structurally validated bundle. Checksums are checked on demand (`verify`)."""

    root: Path
    experts: dict[str, ExpertEntry]
    router: dict[str, Any] | None = None
    # Experts whose files failed the structural checks; only filled when opened with lenient=True.
    damaged: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    def expert(self, name: str) -> ExpertEntry:
        try:
            return self.experts[name]
        except KeyError:
            raise BundleError(
                f"no expert {name!r} in bundle {self.root}; it has: {', '.join(self.experts) or '(none)'}"
            ) from None

    def blob_path(self, name: str) -> Path:
        return self.root / self.expert(name).blob

    def read_blob(self, name: str) -> torch.Tensor:
        """The expert's whole blob as a writable uint8 tensor (outside the tiers: benches, checks)."""
        return torch.frombuffer(bytearray(self.blob_path(name).read_bytes()), dtype=torch.uint8)

    def tokenizer_path(self, name: str) -> Path | None:
        e = self.expert(name)
        return None if e.tokenizer_dir is None else self.root / e.tokenizer_dir

    @staticmethod
    def open(root: str | Path, lenient: bool = False) -> Bundle:
        """Open and check a bundle; `lenient` records experts with bad files in `damaged` instead of
        failing, so a server can keep serving the others."""
        root = Path(root)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"bundle directory {root} does not exist")
        if not mpath.is_file():
            raise BundleError(f"{root} is not a bundle: it has no {MANIFEST} (was a write interrupted?)")
        try:
            raw = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(
                f"{mpath}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
        _validate_schema(raw, mpath)
        _check_paths(root, raw, mpath)
        experts: dict[str, ExpertEntry] = {}
        damaged: dict[str, str] = {}
        for d in raw["experts"]:
            entry = ExpertEntry.from_json(d)
            if entry.name in experts:
                raise BundleError(f"{mpath}: expert {entry.name!r} appears twice")
            try:
                _check_expert_files(root, entry)
            except BundleError as e:
                if not lenient:
                    raise
                damaged[entry.name] = str(e)
            experts[entry.name] = entry
        return Bundle(root=root, experts=experts, router=raw.get("router"), raw=raw, damaged=damaged)

    def verify(self, names: Sequence[str] | None = None) -> None:
        """Check every tensor checksum; raise BundleError naming the first bad expert and tensor."""
        for name in names or self.names:
            e = self.expert(name)
            buf = bytearray(e.total_bytes)
            with open(self.blob_path(name), "rb") as f:  # one pass: the tiers' fast reader buys nothing
                got_bytes = f.readinto(buf)
            if got_bytes != e.total_bytes:
                raise BundleError(
                    f"expert {name!r}: blob is {got_bytes} bytes, the manifest says {e.total_bytes}"
                )
            for t in e.tensors:
                got = hashlib.sha256(memoryview(buf)[t.offset : t.offset + t.nbytes]).hexdigest()
                if got != t.sha256:
                    raise BundleError(
                        f"expert {name!r}: tensor {t.name!r} is corrupt (checksum {got[:12]}..., "
                        f"manifest says {t.sha256[:12]}...) in {self.blob_path(name)}"
                    )
            for fname, digest in e.tokenizer_files.items():
                p = self.root / str(e.tokenizer_dir) / fname
                if hashlib.sha256(p.read_bytes()).hexdigest() != digest:
                    raise BundleError(f"expert {name!r}: tokenizer file {fname!r} is corrupt ({p})")


def _validate_schema(raw: Any, mpath: Path) -> None:
    try:
        jsonschema.validate(raw, MANIFEST_SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise BundleError(f"{mpath}: invalid manifest at {where}: {e.message}") from None


def _check_paths(root: Path, raw: dict[str, Any], mpath: Path) -> None:
    """Every path in the manifest stays inside the bundle: what a write deletes comes from here."""
    for i, d in enumerate(raw["experts"]):
        where = f"{mpath}: experts[{i}]"
        check_relative(root, d["blob"], f"{where}.blob", "experts")
        tok = d.get("tokenizer")
        if tok:
            check_relative(root, tok["dir"], f"{where}.tokenizer.dir", "tokenizers")
            for fname in tok["files"]:
                check_relative(root / tok["dir"], fname, f"{where}.tokenizer.files")
    router = raw.get("router")
    if router and "dir" in router:
        check_relative(root, router["dir"], f"{mpath}: router.dir", "router")


def _check_expert_files(root: Path, e: ExpertEntry) -> None:
    blob = root / e.blob
    if not blob.is_file():
        raise BundleError(f"expert {e.name!r}: blob {blob} is missing")
    size = blob.stat().st_size
    seen: set[str] = set()
    for t in e.tensors:
        if t.name in seen:
            raise BundleError(f"expert {e.name!r}: tensor {t.name!r} appears twice in the manifest")
        seen.add(t.name)
        expect = math.prod(t.shape) * t.torch_dtype.itemsize  # Python ints: numpy's int64 would wrap
        if expect != t.nbytes:
            raise BundleError(
                f"expert {e.name!r}: tensor {t.name!r} says {t.nbytes} bytes but shape {list(t.shape)} "
                f"of {t.dtype} needs {expect}"
            )
        if t.offset % TENSOR_ALIGN:
            raise BundleError(f"expert {e.name!r}: tensor {t.name!r} offset {t.offset} is not aligned")
        if t.offset + t.nbytes > e.total_bytes:
            raise BundleError(f"expert {e.name!r}: tensor {t.name!r} runs past the blob's declared size")
        if t.offset + t.nbytes > size:
            raise BundleError(
                f"expert {e.name!r}: tensor {t.name!r} is truncated: blob {blob} has {size} bytes, "
                f"the tensor ends at {t.offset + t.nbytes}"
            )
    if size != e.total_bytes:
        raise BundleError(
            f"expert {e.name!r}: blob {blob} has {size} bytes, the manifest says {e.total_bytes}"
        )
    if e.tokenizer_dir is not None:
        for fname in e.tokenizer_files:
            if not (root / e.tokenizer_dir / fname).is_file():
                raise BundleError(f"expert {e.name!r}: tokenizer file {e.tokenizer_dir}/{fname} is missing")


# ----------------------------------------------------------------------------------------------
# Writing


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
        new_names = {e.name for e in self._entries}
        kept = [d for d in base["experts"] if d["name"] not in new_names]
        replaced = [d for d in base["experts"] if d["name"] in new_names]
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "experts": kept + [e.to_json() for e in self._entries],
            "router": self._router if self._router_set else base.get("router"),
        }
        for sub in ("experts", "tokenizers", "router"):  # the new names are durable before they are live
            fsync_dir(self.root / sub)
        atomic_write_json(self.root / MANIFEST, manifest)
        fsync_dir(self.root)
        # Only after the new manifest is in place are the replaced experts' files unreferenced;
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


def iter_blob_tensors(buf: torch.Tensor, entry: ExpertEntry) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of each tensor inside a flat uint8 buffer holding the expert's blob."""
    for t in entry.tensors:
        raw = buf[t.offset : t.offset + t.nbytes]
        yield t.name, raw.view(t.torch_dtype).view(t.shape)
