"""Expert bundles on disk: a `bundle.json` manifest plus one 4 KiB-aligned weight blob per expert.

The manifest is the commit point. Blobs and tokenizer folders are written under fresh names first,
and only then does a new manifest replace the old one by rename, so a crash at any moment leaves
either the old bundle or the new one, never a half bundle that opens as valid.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import torch

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
        "generation": {"type": "integer", "minimum": 0},
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

    @property
    def generation(self) -> int:
        """How many commits made this manifest: a server serving the bundle compares it to pick up
        another writer's change (bundles written before it was recorded read as 0)."""
        return int(self.raw.get("generation", 0))

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
            self.verify_tokenizer(name)

    def verify_tokenizer(self, name: str) -> None:
        """Check the expert's tokenizer files against their checksums; BundleError naming the first
        bad one."""
        e = self.expert(name)
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


def iter_blob_tensors(buf: torch.Tensor, entry: ExpertEntry) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of each tensor inside a flat uint8 buffer holding the expert's blob."""
    for t in entry.tensors:
        raw = buf[t.offset : t.offset + t.nbytes]
        yield t.name, raw.view(t.torch_dtype).view(t.shape)
