"""The compiled decode step: compiled once per architecture in the background, shared by its slots.

What it compiles: one decode step (q = 1 column for every row) of a transformers module over the
batch's KV blocks (`engine.kv`), whose rows and capacity are marked dynamic, so one graph serves
every batch of two rows or more and another the single row (the compiler specialises size 1), and
the blocks doubling as a context grows does not recompile. The module is an input of the compiled
function, not a constant (Dynamo inlines nn.Modules and lifts their parameters), so every slot of
one architecture, and every expert switched into it (on the CPU a switch re-points the parameters
at the host arena; on a device it copies into the slot's fixed buffer), reuses the same graphs:
`recompiles` counts anything else, and a test holds it at zero across switches.

Prefill: on the CPU the build process makes a second package once the decode step is ready: one
row's prompt chunk (compact weights traced dequantized into bf16 matmuls, `engine.aot`,
`compact.dequantized_matmuls`), used for chunks of at least `aot.PREFILL_FROM` columns
(`CompiledSteps.prefill`). `benchmarks/prefill_ab.py` on SmolLM2: int8 1.7-1.9x eager from 16
tokens, int4 1.5x from 128, bf16 2.9x at 16 to 1.2x at 512, fp32 1.2x to 1.03x. Several prompts
admitted together go one by one (`runner.ALONE_FROM`). The CUDA path prefills eagerly.

When: the first time an architecture runs, its step is made ready in the background while the
engine keeps serving eagerly; from the next step after it is ready, the engine calls it. Who
compiles (`CompiledSteps.backend_for`): on the CPU, a child process builds an ahead-of-time package
(`engine.aot`: no tracing in this process, built once per architecture and kept on disk for later
processes; one row); on CUDA, a thread here runs torch.compile on throwaway caches (one row, then
more). A build or compile that fails (no C++ compiler, an unsupported operator) logs one warning
line and leaves that architecture eager; so does a compiled step that raises at serving time (the
step is redone eagerly: its cache writes are idempotent).

Why not torch.compile on the CPU: Dynamo traces in Python, holding the GIL that the engine thread
takes back after every operator, and Inductor's C++ builds take the cores. On a 2-core x86 CPU,
`serve --compile on` over SmolLM2 + Gemma-3 int4 with Inductor's cache cleared: a first answer took
23.7 s and an 11-request burst 151 s, against 0.6 s and 26.5 s with `--no-compile`; dropping
Python's switch interval to 0.2 ms while compiling (`_gil_handed_back_often`, kept for CUDA)
brought that to 9.6 s and 103 s. With the build process instead: 1.5 s and 33.5 s while it builds
(against 0.6 s and 19.7 s eager in that run), 0.66 s and 26.2 s once the package is on disk.

Where (`policy`, `serve --compile`), from what was measured on SmolLM2 (docs/benchmarks.md): the
ahead-of-time step at one row against eager, interleaved (`benchmarks/step_ab.py`, two runs each):
int4 1.79x/2.03x, int8 1.45x/1.56x, fp32 1.81x/1.61x, bf16 1.52x/1.50x. At eight rows the compiled
step did not win for any form (0.60x to 0.88x in-process; int4 built ahead of time with dynamic
rows, 1.04x at 8 rows and 0.93x at 16), so on the CPU it runs single rows by default. Packages
built for a fixed number of rows did win at 2 to 4 rows (`benchmarks/step_table.py --buckets`,
SmolLM2 int8: 1.35-1.52x eager at 2 and 1.12-1.32x at 4; 1.08-1.21x at 8, slower at 16); serving
150 experts, a compiled 2-row step cost 1.23-1.26 one-row steps where an eager one cost 2.0-2.1
(the bench's `steps_by_rows`). So `serve --compile-rows 2,3,4` adds one package per such size,
after the prefill (`rows`). A batch of a size with no package is cut into runs that have one
(`split_rows`, over views of its KV rows): serving, 5 to 8 rows cut so cost 1.1-1.3x less than
eagerly, and 14 to 16 rows more. Whether a batch then runs compiled or eagerly is chosen by what
each path has cost while serving (`engine.path_costs`).
- `auto` (default): every expert at every batch size on CUDA; on the CPU every expert at one row,
  by the build process (never by tracing in this process).
- `on`: as auto, and on the CPU at one row whichever backend.
- `all`: every expert, every batch size where the backend can (the ahead-of-time step: one row);
  `off`: nothing.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wallbreak.coe import defaults
from wallbreak.coe.cores import take_all_cores
from wallbreak.coe.engine import aot
from wallbreak.coe.engine.kv import KVCache
from wallbreak.coe.engine.path_costs import PathCosts
from wallbreak.coe.engine.step import decode_logits, run_step
from wallbreak.errors import ConfigError, first_line

log = logging.getLogger(__name__)

POLICIES = defaults.COMPILE_POLICIES
BACKENDS = ("auto", "aot", "dynamo")  # who compiles: see CompiledSteps.backend_for


ROW_WORDS = ("built", "none")  # `--compile-rows` other than sizes: see defaults.COMPILE_ROWS
Rows = tuple[int, ...] | str  # batch sizes (built if missing), or one of ROW_WORDS


def check_rows(rows: Rows) -> Rows:
    """The one check of `--compile-rows`: batch sizes from 2 to aot.MAX_ROWS, `built` or `none`."""
    allowed = f"give batch sizes from 2 to {aot.MAX_ROWS} (comma-separated), {' or '.join(ROW_WORDS)}"
    if isinstance(rows, str):
        if rows not in ROW_WORDS:
            raise ConfigError(f"--compile-rows {rows!r}: {allowed}")
        return rows
    bad = [r for r in rows if not 2 <= r <= aot.MAX_ROWS]
    if bad:
        raise ConfigError(f"--compile-rows {bad[0]}: {allowed}")
    return tuple(sorted(set(rows)))


def parse_rows(text: str) -> Rows:
    """`--compile-rows` as typed: `2,3,4`, `built` or `none`."""
    word = text.strip().lower()
    if word in ROW_WORDS:
        return word
    try:
        return check_rows(tuple(int(n) for n in text.split(",") if n.strip()))
    except ValueError:
        return check_rows(text)  # neither sizes nor a word: the one message


def check_policy(policy: str) -> str:
    """The one check of a `--compile` value (the engine's config and `CompiledSteps` both ask)."""
    if policy not in POLICIES:
        raise ConfigError(f"--compile: unknown {policy!r}; choose from {', '.join(POLICIES)}")
    return policy


_compiled: Any = None
_compiled_lock = threading.Lock()


def _compiled_decode() -> Any:
    """One compiled function for the process: its graphs are keyed by Dynamo's guards (the
    module's class and config, the cache's shape), so architectures do not share a graph."""
    global _compiled
    with _compiled_lock:
        if _compiled is None:
            import torch._dynamo  # deferred: loads torch._dynamo

            # Graphs per architecture: one row, several rows. Room for many architectures.
            torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
            torch._dynamo.config.accumulated_recompile_limit = max(
                1024, torch._dynamo.config.accumulated_recompile_limit
            )
            _compiled = torch.compile(decode_logits, dynamic=None)
        return _compiled


def graphs_built() -> int:
    """Graphs Dynamo has compiled in this process (a recompilation adds one)."""
    from torch._dynamo.utils import counters  # deferred: loads torch._dynamo

    return int(counters["stats"]["unique_graphs"])


class CompiledSteps:
    """Which architectures have a compiled decode step ready, and the background compiles."""

    def __init__(
        self,
        policy: str = "auto",
        bundle_root: Path | None = None,
        backend: str = "auto",
        rows: Rows = (),
    ) -> None:
        """`rows`: the batch sizes above one that also get an ahead-of-time step of their own
        (`serve --compile-rows`), built if missing; `built`: the sizes whose packages are already in
        the cache (`bundle compile --rows`), building none; `none`. A batch of another size is cut
        into runs of those sizes (`split_rows`) or runs eagerly."""
        self.policy = check_policy(policy)
        if backend not in BACKENDS:
            raise ConfigError(f"compile backend {backend!r}: choose from {', '.join(BACKENDS)}")
        self.backend = backend
        rows = check_rows(rows)
        self.rows: tuple[int, ...] = () if isinstance(rows, str) else rows
        self.use_built_rows = rows == "built"
        self.row_steps: dict[str, dict[int, Any]] = {}  # architecture key -> rows -> aot.AotStep
        self.compiled_row_steps = 0  # decode steps of several rows the compiled code ran
        self.path_costs = PathCosts()  # a batch of several rows: compiled or eager, by measured cost
        self.eager_sizes: set[tuple[str, int]] = set()  # (architecture, rows) whose compiled path raised
        self.bundle_root = bundle_root  # where a build process reads an expert (the ahead-of-time step)
        self.state: dict[str, str] = {}  # architecture key -> compiling | ready | eager
        self.aot: dict[str, Any] = {}  # architecture key -> its loaded ahead-of-time step (aot.AotStep)
        # architecture key -> its loaded ahead-of-time prefill, and the shortest chunk it runs
        self.prefills: dict[str, tuple[Any, int]] = {}
        self.builds: set[subprocess.Popen[bytes]] = set()  # build processes running now
        # architectures whose packages are being built, loaded or checked now (a thread each): that
        # work takes the cores, so a benchmark waits for 0 before it times anything
        self.warming = 0
        self.closed = False
        self.recompiles = 0  # graphs built after an architecture was ready (should stay 0)
        self.compiled_steps = 0  # decode steps the compiled code ran
        self.compiled_prefills = 0  # prompt chunks the compiled prefill ran
        self._built_when_ready = 0
        self._lock = threading.Lock()

    def wanted(self, model: nn.Module) -> bool:
        if self.policy in ("off", "all"):
            return self.policy == "all"
        if next(model.parameters()).device.type == "cuda":
            return True
        # on the CPU, auto never traces in this process: that stalls serving (the module's docstring)
        return self.policy == "on" or self.backend_for(model) == "aot"

    def backend_for(self, model: nn.Module) -> str:
        """`aot` (a package built by a child process, `engine.aot`) on the CPU when the bundle is
        known, else `dynamo` (torch.compile in this process)."""
        if self.backend != "auto":
            return self.backend
        on_cpu = next(model.parameters()).device.type == "cpu"
        return "aot" if on_cpu and self.bundle_root is not None else "dynamo"

    def max_rows(self, model: nn.Module) -> int:
        """The largest batch the compiled step runs: the ahead-of-time step is built for one row;
        on the CPU, `on` compiles only the single-row step (at eight rows it did not beat eager)."""
        if self.backend_for(model) == "aot":
            return 1
        if self.policy == "on" and next(model.parameters()).device.type == "cpu":
            return 1
        return 1 << 30

    def ready(self, key: str, model: nn.Module, expert: str = "") -> bool:
        """True when `key`'s compiled step may run; the first call starts compiling it (from
        `expert`, one of the architecture's experts, where a build process needs to read one)."""
        with self._lock:
            state = self.state.get(key)
            if state is None:
                if not self.wanted(model):
                    self.state[key] = "eager"
                    return False
                self.state[key] = "compiling"
                self.warming += 1
                threading.Thread(
                    target=self._warm, args=(key, model, expert), name=f"wb-compile-{key[:24]}", daemon=True
                ).start()
                return False
            return state == "ready"

    def _warm(self, key: str, model: nn.Module, expert: str) -> None:
        torch.set_grad_enabled(False)
        try:
            if self.backend_for(model) == "aot":
                self._load_aot(key, model, expert)
                return
            # Dynamo guards its graphs on the calling thread's intra-op thread count: trace with the
            # engine thread's (every core, coe/cores.py), or its first compiled step recompiles.
            take_all_cores()
            with _gil_handed_back_often():
                self._compile(key, model)
        finally:
            with self._lock:
                self.warming -= 1

    def _load_aot(self, key: str, model: nn.Module, expert: str) -> None:
        """Load `key`'s ahead-of-time decode step (building it first if no earlier process did),
        then ready; then its prefill the same way, for the forms `aot.PREFILL_FROM` names."""
        try:
            step = self._package(key, model, expert, "decode")
        except Exception as e:
            if not self.closed:
                self._give_up(key, f"building it failed ({first_line(e)})")
            return
        with self._lock:
            self.aot[key] = step
            self.state[key] = "ready"
        log.info("compiled decode step ready for %s", expert or key)
        form = aot.model_form(model)
        if form not in aot.PREFILL_FROM or self.closed:
            return
        try:
            prefill = self._package(key, model, expert, "prefill")
        except Exception as e:
            if not self.closed:
                log.warning("prefill of %s stays eager: building it failed (%s)", key, first_line(e))
            return
        with self._lock:
            self.prefills[key] = (prefill, aot.PREFILL_FROM[form])
        log.info("compiled prefill ready for %s", expert or key)
        self._load_rows(key, model, expert)

    def row_sizes(self, key: str) -> list[tuple[int, bool]]:
        """The batch sizes `key` gets a row step for, each with whether it may be built here: those
        asked for, or (`built`) those whose package an earlier build left in the cache."""
        if not self.use_built_rows:
            return [(r, True) for r in self.rows]
        found = [r for r in range(2, aot.MAX_ROWS + 1) if aot.package_path(key, f"decode-rows{r}").is_file()]
        return [(r, False) for r in found]

    def _load_rows(self, key: str, model: nn.Module, expert: str) -> None:
        """The steps for the batch sizes of `row_sizes`, one by one, each usable once it is loaded."""
        for rows, may_build in self.row_sizes(key):
            if self.closed:
                return
            try:
                step = self._package(key, model, expert, f"decode-rows{rows}", build=may_build)
            except Exception as e:
                if not self.closed:
                    log.warning("%d-row steps of %s stay eager: %s", rows, key, first_line(e))
                continue
            self.path_costs.forget(key, rows)  # a new package: its costs are measured afresh
            with self._lock:
                self.row_steps.setdefault(key, {})[rows] = step
            log.info("compiled %d-row decode step ready for %s", rows, expert or key)

    def _package(self, key: str, model: nn.Module, expert: str, part: str, build: bool = True) -> Any:
        """`key`'s loaded `part` package, built in a child process if no earlier process did (a
        package that fails to load is rebuilt once; with `build` False, never), checked on `model`;
        raises if it cannot be."""
        path = aot.package_path(key, part)
        columns = 1 if part.startswith("decode") else aot.MIN_PREFILL + 1

        def checked() -> Any:
            aot.verify(path)  # sealed by this user's builder, bytes unchanged: only then loaded
            step = aot.AotStep(path)
            step.check(model, columns, aot.rows_of(part))  # and it computes what eager computes
            return step

        if path.is_file():
            try:
                return checked()
            except aot.UnsafeCache:
                raise
            except Exception as e:
                if not build:
                    raise
                log.warning("compiled step %s is not used (%s); rebuilding it", path.name, first_line(e))
        if not build:
            raise RuntimeError(f"no package {path.name} in the cache")
        if self.closed:
            raise RuntimeError("the engine stopped")
        assert self.bundle_root is not None
        log.info(
            "building the compiled %s step of %s in a child process, once (%s); serving eagerly meanwhile",
            part,
            expert,
            path,
        )
        t0 = time.monotonic()
        aot.build_in_child(self.bundle_root, expert, path, children=self.builds, part=part)
        log.info("built the compiled %s step of %s in %.0f s", part, expert, time.monotonic() - t0)
        return checked()

    def _compile(self, key: str, model: nn.Module) -> None:
        try:
            device = next(model.parameters()).device
            for rows in (1, 2, 3) if self.max_rows(model) > 1 else (1,):
                cache = KVCache.for_model(model)
                cache.open_rows(rows)
                ids = torch.ones(rows, 1, dtype=torch.long, device=device)
                run_step(model, ids, cache, None)  # eager: the blocks exist before the compiled step
                for _ in range(2):
                    run_step(model, ids, cache, _compiled_decode())
        except Exception as e:
            self._give_up(key, f"compiling failed ({first_line(e)})")
            return
        with self._lock:
            self.state[key] = "ready"
            self._built_when_ready = graphs_built()
        log.info("compiled decode step ready for %s", key)

    def close(self) -> None:
        """End any build process still running (the engine is stopping)."""
        self.closed = True
        for proc in list(self.builds):
            proc.kill()

    def _give_up(self, key: str, why: str) -> None:
        with self._lock:
            self.state[key] = "eager"
            self.aot.pop(key, None)
            self.prefills.pop(key, None)
            self.row_steps.pop(key, None)
        log.warning("decode step of %s stays eager: %s", key, why)

    def prefill_from(self, key: str) -> int | None:
        """The shortest prompt chunk `key`'s compiled prefill runs, or None while it has none."""
        found = self.prefills.get(key)
        return None if found is None else found[1]

    def prefill(self, key: str, model: nn.Module, ids: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """One row's prompt chunk ids [1, q] through `key`'s compiled prefill: the last column's
        logits [1, vocab]; None (nothing done) where it has none, or the chunk is too short for it.
        One that raises is dropped with one warning, and the caller runs the chunk eagerly (a
        chunk's cache writes are idempotent)."""
        found = self.prefills.get(key)
        if found is None or cache.rows != 1 or ids.shape[1] < found[1]:
            return None
        try:
            logits: torch.Tensor = found[0](model, ids, cache)
        except Exception as e:
            with self._lock:
                self.prefills.pop(key, None)
            log.warning("prefill of %s stays eager: the compiled prefill raised (%s)", key, first_line(e))
            return None
        self.compiled_prefills += 1
        return logits

    def step(
        self, key: str, model: nn.Module, ids: torch.Tensor, cache: KVCache, expert: str = ""
    ) -> torch.Tensor:
        """One decode step, compiled if `key` is ready (and, ahead of time, has a step for this
        many rows), else eager; logits [rows, vocab]."""
        if not self.ready(key, model, expert):
            return run_step(model, ids, cache, None)
        if cache.rows > 1 and key in self.aot:
            return self._rows_step(key, model, ids, cache)
        if cache.rows > self.max_rows(model):
            return run_step(model, ids, cache, None)
        aot = self.aot.get(key)
        try:
            logits = (
                aot(model, ids, cache) if aot is not None else run_step(model, ids, cache, _compiled_decode())
            )
        except Exception as e:
            self._give_up(key, f"the compiled step raised ({first_line(e)})")
            return run_step(model, ids, cache, None)
        self.compiled_steps += 1
        if aot is not None:
            return logits
        built = graphs_built()
        with self._lock:
            if "compiling" in self.state.values():  # another architecture's graphs, not ours
                self._built_when_ready = built
        if built > self._built_when_ready:
            self.recompiles += built - self._built_when_ready
            self._built_when_ready = built
        return logits

    def _rows_step(self, key: str, model: nn.Module, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A batch of several rows, where the architecture has row packages: compiled where that has
        been the cheaper path here (`path_costs`), else eager. Compiled is the size's own package
        where one is loaded, else the batch cut into runs of sizes that have one (`split_rows`),
        each through its package over a view of those rows of the cache. If that raises, the step
        is redone eagerly and the size runs eagerly from then on."""
        rows = cache.rows
        if not self.row_steps.get(key) or (key, rows) in self.eager_sizes:
            return run_step(model, ids, cache, None)
        path = self.path_costs.choose(key, rows)
        t0 = time.perf_counter()
        if path == "compiled":
            logits = self._compiled_rows(key, model, ids, cache)
            if logits is None:  # it raised: redone eagerly, and not a timing of either path
                return run_step(model, ids, cache, None)
            self.compiled_row_steps += 1
        else:
            logits = run_step(model, ids, cache, None)
        self.path_costs.record(key, rows, path, time.perf_counter() - t0)
        return logits

    def _compiled_rows(
        self, key: str, model: nn.Module, ids: torch.Tensor, cache: KVCache
    ) -> torch.Tensor | None:
        """The batch through its own package, or cut into runs that have one; None if that raised
        (the size is then left to eager, and a package of its own dropped)."""
        have = dict(self.row_steps.get(key, {}))  # the loader thread may add sizes meanwhile
        rows = cache.rows
        try:
            if rows in have:
                return have[rows](model, ids, cache)
            have[1] = self.aot[key]
            sizes = split_rows(rows, have)
            logits, start = [], 0
            for n, view in zip(sizes, cache.row_views(sizes), strict=True):
                logits.append(have[n](model, ids[start : start + n], view))
                start += n
            cache.advance(1)
            return torch.cat(logits)
        except Exception as e:
            with self._lock:
                self.row_steps.get(key, {}).pop(rows, None)
                self.eager_sizes.add((key, rows))
            self.path_costs.forget(key, rows)
            cut = "+".join(map(str, split_rows(rows, have)))
            how = "the step" if rows in have else f"cut into {cut} rows"
            log.warning("%d-row steps of %s stay eager: %s raised (%s)", rows, key, how, first_line(e))
            return None


def split_rows(rows: int, have: Iterable[int]) -> list[int]:
    """`rows` cut into runs whose sizes have a compiled step (`have`; one row always has), largest
    first: on SmolLM2 int8 a row costs less the more share a step, up to the largest package."""
    sizes = sorted(set(have) | {1}, reverse=True)
    out: list[int] = []
    while rows:
        n = next(s for s in sizes if s <= rows)
        out.append(n)
        rows -= n
    return out


_compiling = 0
_interval: float | None = None
GIL_SLICE_S = 2e-4  # while compiling: how long the tracer may hold the GIL before handing it back


@contextlib.contextmanager
def _gil_handed_back_often() -> Iterator[None]:
    """While a compile runs, Python's switch interval drops from 5 ms to GIL_SLICE_S. The tracer
    holds the GIL in long Python stretches, and the engine thread gives it up at every operator,
    so at 5 ms it waited up to 5 ms per operator."""
    global _compiling, _interval
    with _compiled_lock:
        if _compiling == 0:
            _interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_interval, GIL_SLICE_S))
        _compiling += 1
    try:
        yield
    finally:
        with _compiled_lock:
            _compiling -= 1
            if _compiling == 0 and _interval is not None:
                sys.setswitchinterval(_interval)
