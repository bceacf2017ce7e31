"""The ahead-of-time compiled decode step (the CPU): built by a child process, loaded without tracing.

Why not `torch.compile` in the serving process: Dynamo traces in Python, and on a small CPU that
stalls serving for as long as it runs (`engine.compiled`'s docstring has the figures: a first answer
in 9.6-23.7 s instead of 0.6 s), and again in every new process, since with Inductor's disk cache
warm the trace itself still took 17.6 of 22 s. Here a child process, at a low CPU priority,
exports one decode step of the architecture (`torch.export`, the KV blocks as inputs whose
capacity is dynamic) and compiles it with AOTInductor into a package under the cache directory;
the server keeps serving eagerly meanwhile, then loads the package (a shared library: no trace, no
GIL held) and from then on each one-row decode step of that architecture runs the compiled code.
A package is built once per architecture, byte layout and torch version and reused by every later
process.

The package holds no weights the model has (AOTInductor's constants stay outside the library): its
loader is pointed at the slot's own tensors (`load_constants(user_managed=True)`, no copy), and
pointed again whenever the tensors under the step change, that is when another expert of the
architecture is switched in. The few constants the compiler made itself (e.g. a quantised matmul's
group size as a tensor) come from the package. So every expert of an architecture shares one
compiled step, as with the in-process compile, and a switch never builds anything.

One row only: that is where compiling paid on the 2-core x86 CPU measured (at eight rows the
compiled step lost to eager for every stored form, `benchmarks/engine_compile.py`), and one fixed
row count keeps the decode package to one dynamic dimension, the blocks' capacity.

Each architecture also gets a second package, its prefill (`part="prefill"`, forms in
`PREFILL_FROM`): one row's chunk of a prompt, whose length is a second dynamic dimension. Compact
(int8/int4) weights are traced dequantized into bf16 matmuls (`compact.dequantized_matmuls`), which
Inductor fuses into one pass per weight; decode keeps the kernels, where one row reads the compact
bytes (2-4x fewer than bf16's). SmolLM2 at 512 tokens (`benchmarks/prefill_ab.py`): int8 888
against 462 tokens/s, int4 810 against 517, bf16 1052 against 854, fp32 570 against 550.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wallbreak.coe import defaults
from wallbreak.coe.bundle import compact
from wallbreak.coe.bundle.manifest import DTYPE_NAMES, Bundle
from wallbreak.coe.cores import intra_op_threads
from wallbreak.coe.engine.kv import DECODE_ATTENTION, MIN_CAPACITY, KVCache, forward_kwargs
from wallbreak.coe.engine.step import decode_logits, forward
from wallbreak.coe.tiers.device import load_standalone
from wallbreak.common.atomic import atomic_write_json
from wallbreak.errors import WallbreakError

log = logging.getLogger(__name__)

FORMAT = 4  # bump when what a package holds or how it is called changes
# A loaded package must predict what the eager forward predicts on a probe: the next-token
# distributions at positions 1-7 of PROBE_IDS, teacher-forced, at a mean total variation distance
# of at most PROBE_MAX_TV; one that does not is stale or foreign, and is rebuilt. Logits alone
# cannot tell: the real int8 packages differ from eager by up to 1.2 (SmolLM2) and 9 (Gemma-3) in a
# logit, from bf16 fused kernels, yet by a mean TV of 0.030 (SmolLM2 decode), 0.029 (its prefill)
# and 0.053 (Gemma-3 decode); one built for another norm epsilon is refused (test_engine_aot).
# Position 0 is left out: with no context, Gemma-3's first position alone reached a TV of 0.4.
PROBE_IDS = (2, 7, 11, 13, 17, 19, 23, 29)
PROBE_MAX_TV = 0.2
TMP_PREFIX = ".tmp-build-"  # + the builder's pid: what `sweep` may delete once that process is gone
MAX_CAPACITY = 1 << 20  # the largest block capacity the package accepts (columns)
BUILD_TIMEOUT_S = 3600.0
# The build's CPU priority. At 19 it got ~2% of a CPU that serving kept busy and never finished
# there; at 10 it takes ~10% while serving is busy, and everything when serving idles.
BUILD_NICE = 10
MODEL = "model"  # the package's model name
PARTS = ("decode", "prefill")  # what a package runs: one decode column, or a chunk of a prompt
# A decode column for a fixed batch of N rows ("decode-rowsN"), 2 <= N <= MAX_ROWS: served where
# `serve --compile-rows` asks (engine.compiled), measured by benchmarks/step_table.py --buckets.
MAX_ROWS = 16
ALL_PARTS = PARTS + tuple(f"decode-rows{n}" for n in range(2, MAX_ROWS + 1))


def rows_of(part: str) -> int:
    """The rows a part's package is built for: N for "decode-rowsN", else one."""
    return int(part.removeprefix("decode-rows")) if part.startswith("decode-rows") else 1


MIN_PREFILL = 2  # the shortest chunk the prefill package takes (one column is a decode step)
# Per expert form (`ExpertEntry.dtype`, `model_form`): the shortest prompt chunk the compiled prefill
# runs, where it stopped losing to eager; a form not named (float16, unmeasured) prefills eagerly.
# SmolLM2, `benchmarks/prefill_ab.py`, compiled/eager at 16 / 128 / 512 tokens: int8 1.70 / 1.84 /
# 1.92x (1.26x at 4); int4 0.59 / 1.50 / 1.57x (1.11x at 64); bfloat16 2.86 / 1.61 / 1.23x;
# float32 1.19 / 1.13 / 1.03x.
PREFILL_FROM = {"int8": MIN_PREFILL, "int4": 64, "bfloat16": MIN_PREFILL, "float32": MIN_PREFILL}


def package_path(layout: str, part: str = "decode") -> Path:
    """The package of one architecture, byte layout and part, for this torch, CPU and format."""
    # threads: fp32 linears are split one block per core into the graph (coe/tiers/cpu_linear.py);
    # the engine thread's count, not the calling thread's (a loader thread keeps to one: coe/cores.py)
    cpu = f"{platform.machine()}|{torch.backends.cpu.get_cpu_capability()}|{intra_op_threads()}"
    stem, ident = layout, f"{layout}|{torch.__version__}|{cpu}|{FORMAT}"
    if part != "decode":  # decode packages keep the names they had before there were parts
        stem, ident = f"{layout}-{part}", f"{ident}|{part}"
    return defaults.cache_dir() / "aot" / f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}.pt2"


# -- integrity: a package is a native library, so only one this user built is ever loaded ----------


class StalePackage(Exception):
    """A package that must not be loaded as it is (no seal, another owner, a changed byte): rebuild it."""


class UnsafeCache(WallbreakError):
    """The cache directory is writable by others: nothing in it is loaded, and nothing built into it."""


def private_dir(d: Path) -> Path:
    """`d`, made if missing (mode 0700, whatever the umask); refused if another user owns it or
    others may write it, since a library planted there would run in the server."""
    if not d.exists():
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    for level in (d, d.parent):
        st = os.stat(level)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UnsafeCache(
                f"the compiled-step cache {level} is owned by uid {st.st_uid} with mode "
                f"{stat.filemode(st.st_mode)}: it must be yours and not writable by others "
                f"(chmod go-w {level}); compiled steps stay off until then"
            )
    return d


def probe_distance(got: torch.Tensor, want: torch.Tensor) -> float:
    """Total variation distance between two next-token distributions given as logits."""
    return 0.5 * float((got.float().softmax(-1) - want.float().softmax(-1)).abs().sum())


def seal_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def seal(path: Path) -> None:
    """Write the package's sha256 beside it (what `verify` checks before loading)."""
    atomic_write_json(
        seal_path(path), {"sha256": _digest(path), "bytes": path.stat().st_size, "format": FORMAT}
    )


def _own_file(path: Path) -> None:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise StalePackage(f"{path.name} is not a plain file")
    if st.st_uid != os.geteuid():
        raise StalePackage(f"{path.name} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o022:
        raise StalePackage(f"{path.name} is writable by others ({stat.filemode(st.st_mode)})")


def verify(path: Path) -> None:
    """Refuse a package that this user's builder did not seal, or whose bytes changed since."""
    private_dir(path.parent)
    _own_file(path)
    sp = seal_path(path)
    if not sp.is_file():
        raise StalePackage(f"{path.name} has no checksum beside it")
    _own_file(sp)
    try:
        sealed = json.loads(sp.read_text())
        want = str(sealed["sha256"])
    except (ValueError, KeyError, TypeError):
        raise StalePackage(f"{sp.name} is not a checksum record") from None
    if sealed.get("format") != FORMAT or _digest(path) != want:
        raise StalePackage(f"{path.name} does not match its checksum")


def sweep(d: Path | None = None) -> tuple[int, int]:
    """Delete the temporary files of builds whose process is gone (a SIGKILLed build leaves a
    full-weight package behind); (files, bytes) removed."""
    d = d or defaults.cache_dir() / "aot"
    files = nbytes = 0
    for p in d.glob(f"{TMP_PREFIX}*"):
        pid = p.name.removeprefix(TMP_PREFIX).split("-", 1)[0]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue  # a build still running (here or in another server)
        with contextlib.suppress(OSError):
            size = p.stat().st_size
            p.unlink()
            files, nbytes = files + 1, nbytes + size
    return files, nbytes


def model_form(model: nn.Module) -> str:
    """A loaded expert's form, as its bundle entry names it (`ExpertEntry.dtype`)."""

    return compact.form_of(model) or DTYPE_NAMES[next(model.parameters()).dtype]


class _Step(nn.Module):
    """The exported function: one row's next columns (one, or a prompt's chunk), written into the
    given blocks; the logits of the last."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = forward_kwargs(model)

    def forward(
        self,
        ids: torch.Tensor,
        masks: Any,
        positions: torch.Tensor,
        write_index: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        cache = KVCache.over(self.model, list(zip(keys, values, strict=True)), write_index)
        kw: dict[str, Any] = {self.names["cache"]: cache}
        if "logits" in self.names:
            kw[self.names["logits"]] = 1
        return decode_logits(self.model, ids, masks, positions, kw)[:, -1]


def flat_inputs(
    ids: torch.Tensor, masks: Any, positions: torch.Tensor, write_index: torch.Tensor, cache: KVCache
) -> list[torch.Tensor]:
    """The step's inputs in the package's order (its call spec's flattening of `_Step.forward`)."""
    blocks = cache.blocks()
    assert blocks is not None
    mask_list = list(masks.values()) if isinstance(masks, dict) else [masks]
    return [ids, *mask_list, positions, write_index, *(k for k, _ in blocks), *(v for _, v in blocks)]


# -- building (the child process) -------------------------------------------------------------------


def _own_storage(model: nn.Module) -> None:
    """Give every weight a storage of its own: the bundle's tensors view one blob, and a package
    pickles a view's whole storage, once per view."""
    for p in model.parameters():
        p.data = p.data.clone()
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.clone()


def _examples(model: nn.Module, part: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs of one step of `part` over a block wider than the smallest (so its capacity is seen to
    vary), and the dynamic-shape spec that says so (for a prefill, the chunk's length varies too)."""
    rows, decode = rows_of(part), part.startswith("decode")
    cache = KVCache.for_model(model)
    cache.open_rows(rows)
    forward(model, torch.ones(rows, MIN_CAPACITY + 1, dtype=torch.long), cache)  # eager: makes the blocks
    q = 1 if decode else MIN_CAPACITY + 3
    ids = torch.ones(rows, q, dtype=torch.long)
    masks, positions = cache.step_inputs(q, ids.device, next(model.parameters()).dtype, whole=True)
    blocks = cache.blocks()
    assert blocks is not None
    keys = [k.clone() for k, _ in blocks]  # out of inference mode: export writes into them
    values = [v.clone() for _, v in blocks]
    cap = torch.export.Dim("capacity", min=MIN_CAPACITY, max=MAX_CAPACITY)
    cols = None if decode else torch.export.Dim("columns", min=MIN_PREFILL, max=MAX_CAPACITY)
    mask = {2: cols, 3: cap} if cols is not None else {3: cap}
    spec = {
        "ids": {1: cols} if cols is not None else None,
        "masks": {k: mask for k in masks} if isinstance(masks, dict) else mask,
        "positions": {1: cols} if cols is not None else None,
        "write_index": {2: cols} if cols is not None else None,
        "keys": [{2: cap}] * len(keys),
        "values": [{2: cap}] * len(values),
    }
    return (ids, masks, positions, cache.write_index, keys, values), spec


@torch.no_grad()  # not set_grad_enabled: `bundle compile` runs this in the caller's process
def build(bundle_root: Path, expert: str, out: Path, part: str = "decode") -> None:
    """Export and compile `expert`'s architecture's `part` step into the package `out`. A prefill
    is traced with compact weights dequantized into its matmuls (`compact.dequantized_matmuls`)."""
    import torch._inductor  # deferred: loads torch._inductor

    model = load_standalone(Bundle.open(bundle_root), expert)
    _own_storage(model)
    config: Any = model.config
    config._attn_implementation = DECODE_ATTENTION  # this copy only: see kv.decode_attention
    args, spec = _examples(model, part)
    t0 = time.monotonic()
    dense = compact.dequantized_matmuls() if part == "prefill" else contextlib.nullcontext()
    with warnings.catch_warnings(), dense:  # the tracer's deprecation notices are not the user's
        warnings.simplefilter("ignore")
        program = torch.export.export(_Step(model), args, dynamic_shapes=spec, strict=False)
    log.info("exported %s's %s step in %.1f s; compiling", expert, part, time.monotonic() - t0)
    private_dir(out.parent)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=".pt2", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=tmp,
                inductor_configs={
                    "aot_inductor.package_constants_in_so": False,
                    "aot_inductor.package_constants_on_disk_format": "pickle_weights",
                },
            )
        _without_model_weights(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


WRITER_OWN = (".data/", "byteorder", "archive_format", "archive_version")  # records a writer adds itself


def _is_model_weight(fqn: str) -> bool:
    """A constant the model has (the server supplies it), not one the compiler made."""
    return fqn.startswith(f"{MODEL}.")


def _weights_table(reader: Any) -> tuple[str, dict[str, Any], str]:
    """A package's table of constants on disk: its record name, name -> (file, shape, stride,
    offset), and the folder of the files."""
    config = next(n for n in reader.get_file_names() if n.endswith(f"{MODEL}/weights_config.json"))
    return config, json.loads(reader.read_string(config)), config.split("aotinductor/")[0] + "weights/"


def _without_model_weights(src: str, out: Path) -> None:
    """Copy the package `src` to `out` less the model's weights (the compiler writes them all; the
    server points the step at the slot's own, so they would only take disk: 543 MB for SmolLM2
    fp32). The table of what is left keeps the compiler's own constants."""
    from torch.export.pt2_archive._package import (  # deferred: loads torch.export
        PT2ArchiveReader,
        PT2ArchiveWriter,
    )

    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=".pt2", dir=out.parent)
    os.close(fd)
    try:
        with PT2ArchiveReader(src) as reader, PT2ArchiveWriter(tmp) as writer:
            config, table, weights_dir = _weights_table(reader)
            dropped = {file for fqn, (file, *_) in table.items() if _is_model_weight(fqn)}
            for name in reader.get_file_names():
                if name.startswith(WRITER_OWN) or name.removeprefix(weights_dir) in dropped:
                    continue
                if name == config:
                    own = {k: v for k, v in table.items() if not _is_model_weight(k)}
                    writer.write_string(name, json.dumps(own))
                else:
                    writer.write_bytes(name, reader.read_bytes(name))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)  # whole or not at all: a reader never sees half a package
        seal(out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_in_child(
    bundle_root: Path,
    expert: str,
    out: Path,
    timeout: float = BUILD_TIMEOUT_S,
    children: set[subprocess.Popen[bytes]] | None = None,
    part: str = "decode",
) -> None:
    """Run `build` in a child process at a low CPU priority (held in `children` while it runs, so
    an engine that stops can end it); raises with the child's last error line."""
    cmd = [sys.executable, "-m", "wallbreak.coe.engine.aot", str(bundle_root), expert, str(out)]
    cmd += ["--part", part]
    children = set() if children is None else children
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        children.add(proc)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"building the step took over {timeout:.0f} s") from None
        finally:
            children.discard(proc)
            if proc.poll() is None:  # timed out or interrupted: leave no child behind
                proc.kill()
                proc.wait()
        if rc != 0:
            err.seek(0)
            lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
            raise RuntimeError(f"the build process exited {rc}: {lines[-1] if lines else 'no message'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build an ahead-of-time compiled step (internal).")
    p.add_argument("bundle", type=Path)
    p.add_argument("expert")
    p.add_argument("out", type=Path)
    p.add_argument("--part", choices=ALL_PARTS, default="decode")
    a = p.parse_args(argv)
    os.nice(BUILD_NICE)  # the server this serves comes first
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(a.bundle, a.expert, a.out, a.part)
    return 0


# -- running (the server) ---------------------------------------------------------------------------


Place = tuple[str, nn.Module, str]  # a constant's name, the module holding it, its attribute there


def _probes(places: list[Place]) -> list[Place]:
    """The places to watch for a switch. An expert's tensors all view one blob of its bytes at
    offsets its layout fixes (`tiers.device`), so they move together and one of them tells for all;
    tensors outside that blob (e.g. a rotary table the skeleton computed) are watched each."""
    storage = [getattr(owner, attr).untyped_storage().data_ptr() for _, owner, attr in places]
    blob = max(set(storage), key=storage.count)
    first = storage.index(blob)
    return [places[first]] + [p for p, st in zip(places, storage, strict=True) if st != blob]


class AotStep:
    """A loaded package: call it with a model of its architecture and one row's decode inputs."""

    def __init__(self, path: Path) -> None:
        from torch.export.pt2_archive._package import PT2ArchiveReader  # deferred: loads torch.export

        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), MODEL, False, 1, -1)
        self.fqns: list[str] = list(self.loader.get_constant_fqns())
        self.own: dict[str, torch.Tensor] = {}  # constants the compiler made, not the model's weights
        with PT2ArchiveReader(str(path)) as archive:
            _, table, weights_dir = _weights_table(archive)
            for fqn, (file, shape, stride, offset) in table.items():
                if not _is_model_weight(fqn):
                    t = torch.load(io.BytesIO(archive.read_bytes(weights_dir + file)), weights_only=True)
                    self.own[fqn] = t.as_strided(shape, stride, offset)
        self.bound: tuple[int, ...] = ()
        self._where: dict[int, tuple[nn.Module, list[Place], list[Place]]] = {}

    def _weights_of(self, model: nn.Module) -> tuple[list[Place], list[Place]]:
        """Per constant the step reads from the model, its name and where it lives; and the few
        places whose addresses say whether any moved (found once per model: a switch replaces
        the tensors in these places, not the modules)."""
        found = self._where.get(id(model))
        if found is None or found[0] is not model:
            places = []
            for fqn in self.fqns:
                if fqn not in self.own:
                    owner, _, attr = fqn.removeprefix(f"{MODEL}.").rpartition(".")
                    places.append((fqn, model.get_submodule(owner), attr))
            found = self._where[id(model)] = (model, places, _probes(places))
        return found[1], found[2]

    def bind(self, model: nn.Module) -> None:
        """Point the compiled code at `model`'s tensors, if they are not already those it reads."""
        places, probes = self._weights_of(model)
        mark = (id(model), *(getattr(owner, attr).data_ptr() for _, owner, attr in probes))
        if mark != self.bound:
            tensors = {fqn: getattr(owner, attr) for fqn, owner, attr in places}
            self.loader.load_constants({**tensors, **self.own}, False, True, True, False)
            self.bound = mark

    def check(self, model: nn.Module, columns: int = 1, rows: int = 1) -> None:
        """Run the probe through the package (a decode package column by column on one cache, each
        of its `rows` rows a different rotation of the probe; a prefill package once per prefix of
        at least `columns` ids) and through the eager forward: a package that does not fit `model`
        raises here, and one that predicts otherwise (stale, or built for other constants, or
        computing some rows otherwise) is refused."""
        device = next(model.parameters()).device
        turns = [r % len(PROBE_IDS) for r in range(rows)]
        ids = torch.tensor([PROBE_IDS[t:] + PROBE_IDS[:t] for t in turns], device=device)
        n = ids.shape[1]
        eager = KVCache.for_model(model)
        eager.open_rows(rows)
        want = forward(model, ids, eager, keep=list(range(n)))  # [rows, n, vocab]
        got: dict[int, torch.Tensor] = {}
        if columns == 1:
            cache = KVCache.for_model(model)
            cache.open_rows(rows)
            for i in range(n):
                got[i] = self(model, ids[:, i : i + 1], cache)
        else:
            for k in range(max(columns, MIN_PREFILL), n + 1):
                cache = KVCache.for_model(model)
                cache.open_rows(1)
                got[k - 1] = self(model, ids[:1, :k], cache)
        width = rows if columns == 1 else 1
        if any(g.shape != (width, want.shape[-1]) for g in got.values()):
            raise StalePackage(f"the compiled step gave logits of shape {list(got[n - 1].shape)}")
        cols = [i for i in got if i]
        tv = max(sum(probe_distance(got[i][r], want[r, i]) for i in cols) / len(cols) for r in range(width))
        if not tv <= PROBE_MAX_TV:  # NaN fails too
            raise StalePackage(
                f"on a probe it predicts otherwise than the eager forward "
                f"(mean total variation {tv:.3f} on its worst row, at most {PROBE_MAX_TV} allowed)"
            )

    def __call__(self, model: nn.Module, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one row its next ids [1, q] (q = 1 for a decode package; a prefill package takes
        q >= MIN_PREFILL), into blocks made now if none exist yet; the last column's logits [1, vocab]."""
        self.bind(model)
        # The compiled code indexes its inputs by the strides it was built with (contiguous) and
        # checks none: a view such as ids[:, i:i+1] of a wider batch would feed rows past the first
        # other rows' tokens, silently.
        ids = ids.contiguous()
        q = ids.shape[1]
        masks, positions = cache.step_inputs(q, ids.device, next(model.parameters()).dtype, whole=True)
        cache.ensure_blocks(model)  # after step_inputs, which set the capacity q needs
        with torch.inference_mode():
            (logits,) = self.loader.boxed_run(flat_inputs(ids, masks, positions, cache.write_index, cache))
        cache.advance(q)
        return logits


if __name__ == "__main__":
    sys.exit(main())
