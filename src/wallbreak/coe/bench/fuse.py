"""`wallbreak bench fuse`: one expert slot's forward, eager against compiled, for each stored dtype.

What it measures is the execution path a slot would use: the expert's transformers module with a
static KV cache (fixed capacity, so every step has one shape), called eagerly or through
torch.compile (Inductor) compiled once, or on CUDA with CUDA graphs (`mode="reduce-overhead"`,
captured once per shape). A switch copies another weight set of the same layout into the slot's
tensors, the way the device tier copies an expert's bytes into a slot's fixed buffer; the compiled
code and any captured graph read those same addresses, so a switch must not recompile, and the
bench counts the graphs Dynamo builds across the switches to prove it.

Forms: fp32 and bf16 cast the stored float expert; int8 and int4 are the compact experts of
`coe/bundle/compact.py`, quantized into a temporary bundle and loaded exactly as `wallbreak serve` loads
them (an expert already stored compact runs in its own form only).

This is the slot's forward alone, outside the serving engine, whose own compiled steps
(`coe/engine/compiled.py`, `aot.py`) are measured by `benchmarks/engine_compile.py` and `step_ab.py`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wallbreak.coe.bundle import compact
from wallbreak.coe.bundle.manifest import Bundle, iter_blob_tensors
from wallbreak.coe.bundle.writer import BundleWriter, ExpertSource
from wallbreak.coe.engine.compiled import graphs_built
from wallbreak.coe.tiers.device import load_standalone
from wallbreak.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANTIZED = compact.FORMS
MODES = ("eager", "compiled", "graphs")
# A fixed English text for perplexity (its tokens under each expert's own tokenizer).
PPL_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books faster and more cheaply than any scribe. Within fifty years, presses were working "
    "in more than two hundred cities across Europe, and millions of books had been printed. The new "
    "technology changed how knowledge spread: scholars could compare identical copies of a text, "
    "errors could be corrected in later editions, and ideas reached readers far from where they began."
)


@dataclass(kw_only=True)
class BenchFuseArgs:
    bundle: Path
    experts: list[str] | None = None
    dtypes: Sequence[str] = (*DTYPES, *QUANTIZED)
    modes: Sequence[str] = MODES
    prompt_tokens: int = 128
    decode_tokens: int = 32
    switches: int = 10
    device: str = "cpu"
    repeats: int = 3  # each figure is the median of this many timed runs

    def __post_init__(self) -> None:
        for d in self.dtypes:
            if d not in DTYPES and d not in QUANTIZED:
                allowed = ", ".join([*DTYPES, *QUANTIZED])
                raise ConfigError(f"--dtypes: unknown {d!r}; this bench runs {allowed}")
        for m in self.modes:
            if m not in MODES:
                raise ConfigError(f"--modes: unknown {m!r}; choose from {', '.join(MODES)}")
        for name in ("prompt_tokens", "decode_tokens", "switches", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def slot_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a switch rewrites: parameters and buffers (compact weights are buffers), once each."""
    seen: set[int] = set()
    out = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


@dataclass
class Slot:
    """One expert slot at fixed addresses: a switch copies another expert's weights into place."""

    model: nn.Module
    compiled: bool
    capacity: int  # KV cache columns: fixed per slot, so every call has the same shapes
    weights: list[list[torch.Tensor]] = field(default_factory=list)  # weight sets it switches between
    fn: Any = None

    mode: str = "eager"

    def __post_init__(self) -> None:
        own = [t.detach().clone() for _, t in slot_tensors(self.model)]
        self.weights = [own, [t.clone() for t in own]]  # the second: another expert's bytes, same layout
        if self.mode == "graphs" and next(self.model.parameters()).device.type != "cuda":
            raise ConfigError("mode graphs (CUDA graphs) needs a CUDA device; use --device cuda")
        if self.compiled:
            kind = "reduce-overhead" if self.mode == "graphs" else "default"
            self.fn = torch.compile(self.model, dynamic=False, mode=kind)
        else:
            self.fn = self.model

    def switch(self, to: int) -> None:
        """Copy, not re-point: compiled code and captured graphs keep reading the same storage
        (re-pointing `.data` also works for plain tensors, but tensor subclasses such as torchao's
        then kept serving the old weights under torch.compile, and graphs bake in addresses)."""
        with torch.no_grad():
            for (_, t), w in zip(slot_tensors(self.model), self.weights[to], strict=True):
                t.copy_(w)

    @property
    def expert_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights[0])

    def generate(self, ids: torch.Tensor, new: int) -> tuple[float, float]:
        """Greedy: (seconds to the first new token, i.e. prefill; seconds for `new` more tokens)."""
        from transformers import StaticCache  # deferred: loads transformers

        n = ids.shape[1]
        if n + new > self.capacity:
            raise ConfigError(f"{n} prompt + {new} new tokens exceed the slot's {self.capacity}")
        config: Any = self.model.config
        cache = StaticCache(config=config, max_cache_len=self.capacity)
        dev = ids.device
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.fn(input_ids=ids, past_key_values=cache, use_cache=True,
                          cache_position=torch.arange(n, device=dev))  # fmt: skip
            tok = out.logits[:, -1:].argmax(-1)
            _sync(dev)
            t1 = time.perf_counter()
            for i in range(new):
                pos = torch.tensor([n + i], device=dev)
                out = self.fn(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos)
                tok = out.logits[:, -1:].argmax(-1)
            _sync(dev)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def load_expert(bundle: Bundle, name: str, form: str, device: torch.device) -> nn.Module:
    """The expert's module in `form` (fp32, bf16, int8, int4) on `device`, as a slot would run it."""
    entry = bundle.expert(name)
    stored = entry.quant["form"] if entry.quant else None
    if stored is not None and form != stored:
        raise ConfigError(f"expert {name!r} is stored as {stored}; it runs as {stored} only")
    if stored is None and form in QUANTIZED:
        with tempfile.TemporaryDirectory(prefix="wallbreak-fuse-") as tmp:
            return load_expert(quantized_copy(bundle, name, form, Path(tmp)), name, form, device)
    model = load_standalone(bundle, name)
    if stored is not None:
        return model.to(device)
    return model.to(device=device, dtype=DTYPES[form])


def quantized_copy(bundle: Bundle, name: str, form: str, out: Path) -> Bundle:
    """A one-expert bundle at `out` holding `name` in a compact form, written as import writes it."""
    entry = bundle.expert(name)
    blob = iter_blob_tensors(bundle.read_blob(name), entry)
    tensors, quant = compact.compact_tensors(entry.model_type, entry.config, blob, form)
    with BundleWriter(out) as w:
        w.add(ExpertSource(name, entry.model_type, entry.config, tensors), quant=quant)
    return Bundle.open(out)


def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    return float(torch.exp(F.cross_entropy(logits[0, :-1], ids[0, 1:])))


def _measure(slot: Slot, a: BenchFuseArgs, vocab: int, dev: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    p1 = torch.randint(0, vocab, (1, a.prompt_tokens), generator=gen).to(dev)
    p8 = torch.randint(0, vocab, (8, a.prompt_tokens), generator=gen).to(dev)
    for ids in (p1, p8):  # warm-up: compiles every shape the measurements use
        slot.generate(ids, 2)
    runs1 = [slot.generate(p1, a.decode_tokens) for _ in range(a.repeats)]
    prefill_s = statistics.median(r[0] for r in runs1)
    dec1 = statistics.median(r[1] for r in runs1)
    dec8 = statistics.median(slot.generate(p8, a.decode_tokens)[1] for _ in range(a.repeats))
    before = graphs_built()
    ttft = []
    for i in range(a.switches):
        slot.switch((i + 1) % 2)
        t0 = time.perf_counter()
        slot.generate(p1, 0)
        ttft.append(time.perf_counter() - t0)
    slot.switch(0)
    return {
        "decode_tps_b1": a.decode_tokens / dec1,
        "decode_tps_b8": 8 * a.decode_tokens / dec8,
        "prefill_tps_b1": a.prompt_tokens / prefill_s,
        "ttft_after_switch_s": statistics.median(ttft),
        "expert_bytes": slot.expert_bytes,
        "recompiles_after_switch": graphs_built() - before,
    }


def _ppl_ids(bundle: Bundle, name: str, dev: torch.device) -> torch.Tensor | None:
    path = bundle.tokenizer_path(name)
    if path is None:
        return None
    from transformers import AutoTokenizer  # deferred: loads transformers

    tok = AutoTokenizer.from_pretrained(str(path))
    return torch.tensor([tok(PPL_TEXT)["input_ids"]], device=dev)


def run_bench_fuse(a: BenchFuseArgs) -> dict[str, Any]:
    bundle = Bundle.open(a.bundle)
    names = a.experts or bundle.names[:1]
    for n in names:
        bundle.expert(n)  # unknown names fail before any work
    dev = torch.device(a.device)
    runs: list[dict[str, Any]] = []
    for name in names:
        ppl_ids = _ppl_ids(bundle, name, dev)
        for dname in a.dtypes:
            model = load_expert(bundle, name, dname, dev)
            config: Any = model.config
            vocab = int(config.vocab_size)
            ppl = perplexity(model, ppl_ids) if ppl_ids is not None else None
            for mode in a.modes:
                print(f"bench fuse: {name} {dname} {mode} ...", file=sys.stderr, flush=True)
                row: dict[str, Any] = {"expert": name, "mode": mode, "dtype": dname, "perplexity": ppl}
                try:
                    slot = Slot(model, mode != "eager", a.prompt_tokens + a.decode_tokens, mode=mode)
                    row |= _measure(slot, a, vocab, dev)
                except Exception as e:
                    if mode == "eager":
                        raise
                    print(f"bench fuse: compile failed ({type(e).__name__}: {e}); eager only",
                          file=sys.stderr)  # fmt: skip
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                runs.append(row)
                torch._dynamo.reset()
    return summarise(runs)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def best(mode: str) -> float | None:
        ok = [r for r in runs if r["mode"] == mode and r["dtype"] == "fp32" and "error" not in r]
        vals = [r["decode_tps_b1"] for r in ok]
        return max(vals) if vals else None

    eager, compiled = best("eager"), best("compiled")
    recompiles = [r["recompiles_after_switch"] for r in runs if r["mode"] == "compiled" and "error" not in r]
    return {
        "runs": runs,
        "speedup_decode_b1": compiled / eager if eager and compiled else None,
        "recompiles_after_switch": max(recompiles) if recompiles else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def format_bench_fuse(res: dict[str, Any]) -> str:
    lines = [
        f"{'expert':<24} {'dtype':<5} {'mode':<9} {'decode b1':>10} {'decode b8':>10} {'prefill b1':>11} "
        f"{'ttft/switch':>12} {'MB':>7} {'ppl':>7}"
    ]
    for r in res["runs"]:
        if "error" in r:
            lines.append(f"{r['expert']:<24} {r['dtype']:<5} {r['mode']:<9} failed: {r['error']}")
            continue
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] is not None else "-"
        lines.append(
            f"{r['expert']:<24} {r['dtype']:<5} {r['mode']:<9} {r['decode_tps_b1']:>8.1f}/s "
            f"{r['decode_tps_b8']:>8.1f}/s {r['prefill_tps_b1']:>9.0f}/s {r['ttft_after_switch_s']:>11.3f}s "
            f"{r['expert_bytes'] / 1e6:>7.0f} {ppl:>7}"
        )
    if res["speedup_decode_b1"]:
        lines.append(f"compiled fp32 decode at batch 1: {res['speedup_decode_b1']:.2f}x eager")
    lines.append(f"recompilations across switches: {res['recompiles_after_switch']}")
    return "\n".join(lines)
