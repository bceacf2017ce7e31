"""The command line of the emulator: `wallbreak emulate up|run|show|down` and `wallbreak bench holmes`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wallbreak.cli.args import Parser, default_arg
from wallbreak.common.plots import save_figure
from wallbreak.holmes.emulate import netns as emulate
from wallbreak.holmes.emulate.run import PLACEMENTS, EmuJob, bench_holmes, run_on_emulation
from wallbreak.holmes.plan.calibrate import load_calibration
from wallbreak.holmes.plan.source import resolve_model
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import load_topology

# Models a 2-core machine trains in seconds per step: (layers, hidden, heads, seq_len); byte vocabulary.
EMU_MODELS = {"tiny": (4, 128, 4, 64), "small": (4, 256, 8, 128)}  # layers, hidden, heads, seq


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("cluster", type=Path, help="cluster spec (YAML), e.g. examples/clusters/emu-small.yaml")
    p.add_argument("--prefix", default=emulate.DEFAULT_PREFIX, help="names start with it (default wb)")
    p.add_argument("--scale", type=float, default=emulate.DEFAULT_SCALE, help="multiply every rate (0.01)")
    p.add_argument("--steps", type=int, default=8, help="steps per run; the first 2 are warm-up (default 8)")
    p.add_argument(
        "--model", default="tiny", metavar="SRC",
        help="tiny: a Llama of 4 layers x 128 wide, seq 64 (default); small: 4 x 256, 8 heads (2 key/value "
        "heads), seq 128; or a model folder, .gguf or preset (see `wallbreak plan`)",
    )  # fmt: skip
    for flag in ("--layers", "--hidden", "--heads", "--seq-len"):
        p.add_argument(flag, type=int, help="override one dimension of tiny or small (--seq-len: of any)")
    p.add_argument("--global-batch", type=int, default=8)
    default_arg(p, TrainingSpec, "--schedule", str, "pipeline schedule: auto, 1f1b, interleaved or gpipe")
    p.add_argument("--micro-batch", type=int, default=2)
    for flag in ("--tp", "--pp", "--dp"):
        p.add_argument(flag, type=int, help="force this degree (default: the planner's choice)")
    p.add_argument(
        "--calibration", type=Path, help="predict with a calibration fitted by `wallbreak plan --calibrate`"
    )
    p.add_argument("--json", action="store_true")


def add_emulate_parser(verbs: Any) -> None:
    em = verbs.add_parser("emulate", help="a heterogeneous cluster on this machine: namespaces, shaped links")
    ev = em.add_subparsers(dest="action", required=True, parser_class=Parser)
    eu = ev.add_parser("up", help="one network namespace per node, NICs shaped to the cluster file (root)")
    eu.add_argument("cluster", type=Path, help="cluster spec (YAML), e.g. examples/clusters/emu-small.yaml")
    eu.add_argument("--scale", type=float, default=emulate.DEFAULT_SCALE, help="multiply every rate (0.01)")
    eu.add_argument("--prefix", default=emulate.DEFAULT_PREFIX, help="names start with it (default wb)")
    eu.add_argument("--force", action="store_true", help="replace an emulation with the same prefix")
    eu.add_argument("--json", action="store_true")
    er = ev.add_parser("run", help="the real trainer on the emulated cluster, one placement (root)")
    _model_args(er)
    er.add_argument("--placement", default="holmes", choices=PLACEMENTS)
    ed = ev.add_parser("down", help="remove the emulation (also what a crashed run left behind)")
    ed.add_argument("--prefix", default=emulate.DEFAULT_PREFIX)
    es = ev.add_parser("show", help="the emulation that is up: nodes, addresses, interfaces, rates")
    es.add_argument("--prefix", default=emulate.DEFAULT_PREFIX)
    es.add_argument("--json", action="store_true")


def add_bench_holmes_parser(bench: Any) -> None:
    bh = bench.add_parser("holmes", help="all four placements on the emulated cluster: measured vs predicted")
    _model_args(bh)
    bh.add_argument("--plot", type=Path, help="bar chart of measured and predicted iteration times (PNG)")


def _job(args: argparse.Namespace) -> EmuJob:
    if args.model in EMU_MODELS:
        dims = dict(zip(("layers", "hidden", "heads", "seq_len"), EMU_MODELS[args.model], strict=True))
        dims |= {k: v for k, v in vars(args).items() if k in dims and v is not None}
        model = ModelSpec.llama(f"llama-{args.model}-{dims['layers']}x{dims['hidden']}", vocab=256,
                                kv_heads=max(1, dims["heads"] // 4), **dims)  # fmt: skip
    else:
        model = resolve_model(args.model, args.seq_len or 64)
    training = TrainingSpec(args.global_batch, args.micro_batch, "none", "fp32", schedule=args.schedule)
    cal = load_calibration(args.calibration) if args.calibration else None
    return EmuJob(args.cluster, load_topology(args.cluster), model, training, args.steps,
                  (args.tp, args.pp, args.dp), args.scale, args.prefix, cal)  # fmt: skip


def _line(r: dict[str, Any]) -> str:
    m, p = r["measured"], r["predicted"]
    return (
        f"{r['placement']:<13} tp={r['tp']} pp={r['pp']} dp={r['dp']}: "
        f"measured {m['iteration_s']:.3f} s/iteration "
        f"({m['tokens_per_s']:.0f} tokens/s), predicted {p['iteration_s']:.3f} s ({r['error_pct']:+.0f}%)"
    )


def run_emulate_command(args: argparse.Namespace) -> int:
    if args.verb == "bench":
        res = bench_holmes(_job(args))
        if args.plot:
            plot_bench_holmes(res, args.plot)
        lines = [_line(r) for r in res["placements"].values()]
        lines.append(f"holmes vs megatron, measured: {res['speedup_holmes_vs_megatron']:.2f}x")
        lines.append(f"holmes vs all-rdma, measured: {res['holmes_vs_all_rdma']:.2f} of its speed")
        print(json.dumps(res) if args.json else "\n".join(lines))
        return 0
    if args.action == "down":
        removed = emulate.down(args.prefix)
        print(f"removed {len(removed)} namespace(s) and link(s) of emulation {args.prefix!r}")
        return 0
    if args.action == "run":
        r = run_on_emulation(_job(args), args.placement)
        print(json.dumps(r) if args.json else _line(r))
        return 0
    if args.action == "show":
        emu = emulate.load_state(args.prefix)
    else:
        emu = emulate.plan_emulation(load_topology(args.cluster), args.scale, args.prefix)
        emulate.up(emu, force=args.force)
    print(json.dumps(asdict(emu)) if args.json else emulate.describe(emu))
    return 0


def plot_bench_holmes(res: dict[str, Any], path: Path) -> None:
    import matplotlib  # deferred: loads matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: loads matplotlib

    names = list(res["placements"])
    measured = [res["placements"][n]["measured"]["iteration_s"] for n in names]
    predicted = [res["placements"][n]["predicted"]["iteration_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], measured, 0.4, label="measured")
    kind = "calibrated" if res.get("calibrated") else "uncalibrated"
    ax.bar([x + 0.2 for x in xs], predicted, 0.4, label=f"predicted ({kind})")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names)
    ax.set_ylabel("s / iteration (lower is better)")
    ax.set_title(
        f"wallbreak bench holmes: holmes {res['speedup_holmes_vs_megatron']:.2f}x megatron, measured"
    )
    ax.legend()
    save_figure(fig, path, "the holmes benchmark plot")
