"""The training verbs: `wallbreak plan` (place and predict) and `wallbreak train` (run a plan here)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from wallbreak.cli.args import Parser, default_arg, fill
from wallbreak.errors import ConfigError, WallbreakError
from wallbreak.holmes.plan.calibrate import calibration_for
from wallbreak.holmes.plan.launch import TRAIN_MODULE, emit_launch
from wallbreak.holmes.plan.plan_file import load_plan
from wallbreak.holmes.plan.planner import PLACEMENTS
from wallbreak.holmes.plan.report import format_report, make_report, plot_report
from wallbreak.holmes.plan.source import resolve_model
from wallbreak.holmes.plan.spec import DTYPE_BYTES, MASTER_PORT, PRESETS, RECOMPUTE, ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import load_topology


def add_plan_parsers(verbs: Any) -> None:
    pl = verbs.add_parser("plan", help="place LLM training on clusters with different NICs, and predict it")
    pl.add_argument("cluster", type=Path, help="cluster spec (YAML), e.g. examples/two-clusters.yaml")
    pl.add_argument(
        "--model", metavar="SRC",
        help=f"a Hugging Face model folder (config.json [+ safetensors + tokenizer]), a .gguf file, or a "
        f"preset: {', '.join(PRESETS)}",
    )  # fmt: skip
    for flag in ("--layers", "--hidden", "--heads"):
        pl.add_argument(flag, type=int, help="custom Llama shape (all three, instead of --model)")
    default_arg(pl, ModelSpec, "--seq-len", int)
    pl.add_argument("--vocab", type=int, help="vocabulary of a preset or custom shape (default: 256 for "
                    "llama-*, 51200 otherwise)")  # fmt: skip
    pl.add_argument("--global-batch", type=int, required=True)
    default_arg(pl, TrainingSpec, "--micro-batch", int)
    default_arg(pl, TrainingSpec, "--recompute", str, " or ".join(RECOMPUTE))
    default_arg(pl, TrainingSpec, "--dtype", str, ", ".join(DTYPE_BYTES))
    default_arg(pl, TrainingSpec, "--efficiency", float, "achieved share of peak FLOPs")
    default_arg(pl, TrainingSpec, "--schedule", str, "auto (the faster predicted of 1f1b and interleaved), "
                "1f1b, interleaved or gpipe")  # fmt: skip
    default_arg(pl, TrainingSpec, "--virtual-stages", int, "model chunks per pipeline rank when interleaved")
    pl.add_argument(
        "--placement", default=PLACEMENTS[0], help=f"{' or '.join(PLACEMENTS)} (default {PLACEMENTS[0]})"
    )
    for flag in ("--tp", "--pp", "--dp"):
        pl.add_argument(flag, type=int, help="force this degree")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--plot", type=Path, help="draw one iteration per stage into this PNG")
    pl.add_argument(
        "--emit-launch", type=Path, help="write plan.json, per-node torchrun scripts, Megatron args"
    )
    pl.add_argument(
        "--master-port",
        type=int,
        default=MASTER_PORT,
        help=f"rendezvous port in the launch scripts ({MASTER_PORT})",
    )
    cal = pl.add_mutually_exclusive_group()
    cal.add_argument(
        "--calibrate",
        type=Path,
        nargs="+",
        metavar="RESULTS",
        help="fit compute efficiency, link efficiency and latency to measured runs "
        "(`wallbreak bench holmes --json` output), then plan with them",
    )
    cal.add_argument("--calibration", type=Path, help="plan with a calibration saved by --save-calibration")
    pl.add_argument("--save-calibration", type=Path, help="with --calibrate: save the fit here")

    tr = verbs.add_parser(
        "train",
        help="run a plan on this machine under torchrun (the runtime's options pass through)",
        description=f"Wraps `torchrun --standalone --nproc-per-node N -m {TRAIN_MODULE}`; "
        "options after the known ones (--steps, --schedule, --checkpoint-dir, --resume, --data, ...) "
        f"go to the runtime (see python -m {TRAIN_MODULE} --help).",
    )
    tr.add_argument("--plan", required=True, type=Path)
    tr.add_argument("--nproc", type=int, help="processes (default: the plan's world size)")
    tr.add_argument("--max-restarts", type=int, default=0, help="torchrun elastic restarts after a failure")


def add_data_and_export_parsers(verbs: Any) -> None:
    da = verbs.add_parser("data", help="prepare training data: tokenize once into a memory-mapped file")
    dv = da.add_subparsers(dest="action", required=True, parser_class=Parser)
    dp = dv.add_parser(
        "prepare", help="tokenize text or JSONL files (a 'text' field) into DATA for `wallbreak train --data`"
    )
    dp.add_argument(
        "sources", type=Path, nargs="+", metavar="SRC", help="files or folders of .txt/.md/.jsonl/..."
    )
    dp.add_argument("--tokenizer", type=Path, required=True, help="the model's Hugging Face tokenizer folder")
    dp.add_argument("--out", type=Path, required=True, help="the DATA folder to create (must not exist)")

    ex = verbs.add_parser(
        "export", help="a training checkpoint as a Hugging Face folder (or straight into a bundle)"
    )
    ex.add_argument("checkpoint", type=Path, metavar="CKPT", help="the run's --checkpoint-dir")
    ex.add_argument("--step", type=int, help="which step (default: the latest complete one)")
    ex.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the model source's)")
    dest = ex.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, help="write a Hugging Face model folder here")
    dest.add_argument("--bundle", type=Path, help="import into this CoE bundle (with --name)")
    ex.add_argument("--name", help="the expert's name in --bundle")
    ex.add_argument("--dtype", help="the expert's form in --bundle: fp32, bf16, fp16, int8 or int4")
    ex.add_argument("--description", default="", help="what the expert is for (the router reads it)")
    ex.add_argument("--example", action="append", default=[], help="an example prompt (repeatable)")


def run_data(args: argparse.Namespace) -> int:
    from wallbreak.holmes.runtime.data import prepare  # deferred: loads torch

    index = prepare(args.sources, args.tokenizer, args.out)
    print(f"wrote {args.out}: {index['tokens']} tokens in {index['documents']} document(s), {index['dtype']}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from wallbreak.holmes.export import export, export_to_bundle  # deferred: loads transformers

    if args.bundle is None:
        if args.name or args.dtype:
            raise ConfigError(
                "--name and --dtype go with --bundle; --out writes the trained weights as they are"
            )
        out = export(args.checkpoint, args.out, step=args.step, tokenizer=args.tokenizer)
        print(
            f"wrote {out} (load it with AutoModelForCausalLM.from_pretrained, or `wallbreak bundle import`)"
        )
        return 0
    if not args.name:
        raise ConfigError("--bundle needs --name, the expert's name")
    export_to_bundle(args.checkpoint, args.bundle, args.name, step=args.step, tokenizer=args.tokenizer,
                     dtype=args.dtype, description=args.description, examples=args.example)  # fmt: skip
    print(f"imported {args.name} into {args.bundle}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    nproc = args.nproc or plan.world_size
    if nproc != plan.world_size:
        raise WallbreakError(f"--nproc {nproc}: the plan {args.plan} needs {plan.world_size} processes")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--max-restarts={args.max_restarts}", "-m", TRAIN_MODULE, "--plan", str(args.plan),
        *args.rest,
    ]  # fmt: skip
    return subprocess.call(cmd)


def run_plan(args: argparse.Namespace) -> int:
    custom = [args.layers, args.hidden, args.heads]
    if args.model and any(v is not None for v in custom):
        raise ConfigError("give either --model or --layers/--hidden/--heads, not both")
    if args.model:
        model = resolve_model(args.model, args.seq_len, args.vocab)
    elif all(v is not None for v in custom):
        name = f"llama-custom-{args.layers}x{args.hidden}"
        model = ModelSpec.llama(name, args.layers, args.hidden, args.heads, args.seq_len, args.vocab or 51200)
    else:
        raise ConfigError(
            "name a model: --model SRC (a folder, a .gguf or a preset such as gpt-7.5b), "
            "or all of --layers, --hidden, --heads"
        )
    training = fill(TrainingSpec, args)
    if not 0 < args.master_port < 65536:
        raise ConfigError(f"--master-port must be 1-65535, got {args.master_port}")
    cal = calibration_for(args.calibrate, args.calibration, args.save_calibration)
    topo = load_topology(args.cluster)
    report = make_report(
        cal.apply(topo) if cal else topo, model, training,
        placement=args.placement, tp=args.tp, pp=args.pp, dp=args.dp,
    )  # fmt: skip
    if args.plot:
        plot_report(report, args.plot)
    if args.emit_launch:
        files = emit_launch(report, args.emit_launch, args.master_port)
        print(f"wrote {len(files)} launch file(s) to {args.emit_launch}", file=sys.stderr)
    out = report.to_json() | ({"calibration": cal.to_json()} if cal else {})
    print(json.dumps(out) if args.json else format_report(report))
    return 0
