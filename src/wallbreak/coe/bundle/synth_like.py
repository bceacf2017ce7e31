"""`wallbreak bundle synth --like SRC`: many experts of a real architecture, as many fine-tunes of one
base model would be.

Each expert is SRC's weights plus seeded Gaussian noise (`perturb` times each matrix's RMS; norms
and biases are kept), so every expert differs in every byte of its matrices yet answers much as
SRC does, with SRC's config and tokenizer. Each gets a topic from a fixed list (`topics.py`), with
a description and example prompts, so the router has one class per expert to learn.

Writing is streamed: one expert's tensors exist at a time (SRC's stay loaded), and the bundle is
committed every `commit_every` experts, so an interrupted run keeps what it committed; run it
again and the experts already written (same source and seed) are skipped.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from wallbreak.coe.bundle import compact, topics
from wallbreak.coe.bundle.importers import DTYPES, hf_source, parse_form
from wallbreak.coe.bundle.manifest import MANIFEST, Bundle, check_expert_name
from wallbreak.coe.bundle.writer import BundleWriter, ExpertSource
from wallbreak.errors import ConfigError
from wallbreak.progress import progress, say

COMMIT_EVERY = 10


def perturbed(
    tensors: Sequence[tuple[str, torch.Tensor]], seed: int, perturb: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """SRC's tensors with noise on every float matrix, one at a time; a tied weight stays tied (the
    same noisy tensor is yielded for every name that shares its storage)."""
    done: dict[tuple[int, int], torch.Tensor] = {}
    gen = torch.Generator()
    for j, (name, t) in enumerate(tensors):
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if key in done:
            yield name, done[key]
            continue
        if perturb > 0 and t.is_floating_point() and t.dim() >= 2 and t.numel():
            gen.manual_seed(seed * 1_000_003 + j)
            x = t.detach().float()
            rms = float(x.pow(2).mean().sqrt())
            noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).mul_(perturb * rms)
            t = x.add_(noise) if x.data_ptr() != t.data_ptr() else x.add(noise)
            t = t.to(tensors[j][1].dtype)
        done[key] = t
        yield name, t
    done.clear()


def expert_names(prefix: str, experts: int) -> list[str]:
    width = max(3, len(str(experts - 1)))
    names = [f"{prefix}-{i:0{width}d}" for i in range(experts)]
    for n in names:
        check_expert_name(n)
    return names


def synth_like_bundle(
    out: str | Path,
    src: str | Path,
    *,
    experts: int,
    dtype: str | None = None,
    perturb: float = 0.01,
    seed: int = 0,
    prefix: str = "expert",
    commit_every: int = COMMIT_EVERY,
) -> list[str]:
    """Write `experts` perturbed copies of SRC (a HF folder or .gguf) into the bundle at `out`;
    returns their names. `dtype`: as `bundle import` takes it (int8, bf16, ...)."""
    if experts < 1:
        raise ConfigError(f"--experts must be >= 1, got {experts}")
    if not 0.0 <= perturb <= 1.0:
        raise ConfigError(f"--perturb must be between 0 and 1 (a share of each matrix's RMS); got {perturb}")
    form = parse_form(dtype)
    names = expert_names(prefix, experts)
    with tempfile.TemporaryDirectory(prefix="wallbreak-synth-like-") as tmp:
        say(f"loading {Path(src).name}")
        base = hf_source(Path(src), "base", Path(tmp))
        origin = f"{base.source},perturb={perturb},seed={seed}"
        tensors = list(base.tensors)
        have = _already(out, origin)
        todo = [(i, n) for i, n in enumerate(names) if have.get(n) != i]
        if len(todo) < experts:
            say(f"{experts - len(todo)} expert(s) already written; writing the other {len(todo)}")
        one = _expert_bytes(tensors, form)
        with progress(one * len(todo), f"synth experts like {Path(src).name}", "B", unit_scale=True) as bar:
            for start in range(0, len(todo), max(1, commit_every)):
                with BundleWriter(out) as w:
                    for i, name in todo[start : start + max(1, commit_every)]:
                        _add(w, base, tensors, i, name, form, perturb, seed, origin, bar.update)
    return names


def _add(
    w: BundleWriter,
    base: ExpertSource,
    tensors: Sequence[tuple[str, torch.Tensor]],
    i: int,
    name: str,
    form: str | None,
    perturb: float,
    seed: int,
    origin: str,
    update: object,
) -> None:
    """One expert: noise, then the form's quantization, then the blob, then it is let go."""
    items: object = perturbed(tensors, seed * 100_003 + i, perturb)
    quant = None
    if form in compact.FORMS:
        items, quant = compact.compact_tensors(base.model_type, base.config, items, form)  # type: ignore[arg-type]
    src = ExpertSource(
        name=name,
        model_type=base.model_type,
        config=base.config,
        tensors=items,  # type: ignore[arg-type]
        tokenizer_dir=base.tokenizer_dir,
        description=topics.description(i),
        examples=topics.examples(i),
        source=f"{origin},index={i}",
    )
    w.add(src, dtype=DTYPES.get(form) if form else None, progress=update, quant=quant)


def _already(out: str | Path, origin: str) -> dict[str, int]:
    """Experts of this run (same source, noise and seed) that the bundle already holds: name -> index."""
    if not (Path(out) / MANIFEST).is_file():
        return {}
    found = {}
    for e in Bundle.open(out, lenient=True).experts.values():
        if e.source.startswith(origin + ",index="):
            found[e.name] = int(e.source.rsplit("=", 1)[1])
    return found


def _expert_bytes(tensors: Sequence[tuple[str, torch.Tensor]], form: str | None) -> int:
    """About what one expert's blob holds (for the progress bar): compact forms ~1 byte a weight."""
    unique = {t.untyped_storage().data_ptr(): t for _, t in tensors}.values()
    if form in compact.FORMS:
        return sum(t.numel() for t in unique)
    size = DTYPES[form].itemsize if form else None
    return sum(t.numel() * (size or t.element_size()) for t in unique)
