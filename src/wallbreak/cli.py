"""One entry point, one verb per job: `wallbreak bundle|router|route|serve|plan|bench ...`.

User mistakes (WallbreakError) become one line on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wallbreak import __version__
from wallbreak.coe import defaults
from wallbreak.coe.bundle_cli import add_bundle_parser, run_bundle_command
from wallbreak.coe.policy import EVICTIONS, POLICIES, SCHEDULERS, serving_policy
from wallbreak.errors import ConfigError, WallbreakError
from wallbreak.holmes.spec import MASTER_PORT
from wallbreak.units import format_bytes


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _ints(text: str) -> list[int]:
    try:
        out = [int(n) for n in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give whole numbers, comma-separated (e.g. 16,64)"
        ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of at least 1, comma-separated")
    return out


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: give on or off")
    return text == "on"


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy",
        default=defaults.POLICY,
        choices=list(POLICIES),
        help="ours (switch-aware batching, cost eviction, prefetch), per-expert-lru (what Ray Serve "
        "multiplexing / Ollama do: batch per model, oldest first, LRU, no prefetch) or fcfs-lru "
        "(one request at a time, LRU)",
    )
    p.add_argument("--scheduler", choices=SCHEDULERS, help="override the policy's scheduler")
    p.add_argument("--eviction", choices=EVICTIONS, help="override the policy's eviction rule")
    p.add_argument("--prefetch", type=_on_off, help="on or off: override the policy's prefetch")
    p.add_argument(
        "--max-wait",
        type=float,
        default=defaults.MAX_WAIT_S,
        help=f"seconds before a waiting expert goes next (default {defaults.MAX_WAIT_S})",
    )


def _router_parsers(verbs: Any) -> None:
    r = verbs.add_parser("router", help="fit and evaluate the prompt -> expert router of a bundle")
    rv = r.add_subparsers(dest="action", required=True, parser_class=_Parser)
    fit = rv.add_parser("fit", help="fit a router on labelled prompts and store it in the bundle")
    fit.add_argument("--bundle", required=True, type=Path)
    fit.add_argument(
        "--examples", type=Path, help='JSON lines of {"prompt", "expert"} (default: the manifest\'s examples)'
    )
    fit.add_argument("--generalist", help="expert that answers when the router is unsure")
    fit.add_argument("--threshold", type=float, help="confidence below which the generalist answers (0-1)")
    fit.add_argument(
        "--methods",
        type=_names,
        default=None,
        help="candidates to cross-validate: knn,centroid,logreg,tuned (default: all)",
    )
    fit.add_argument("--tune-steps", type=int, help="contrastive tuning steps (default: scaled to the data)")
    fit.add_argument("--encoder", type=Path, help="Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    fit.add_argument("--folds", type=int, help="cross-validation folds (default: up to 4)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--json", action="store_true", help="print the fit report as JSON")
    ev = rv.add_parser("eval", help="accuracy, fallbacks and latency on labelled prompts")
    ev.add_argument("--bundle", required=True, type=Path)
    ev.add_argument("--examples", required=True, type=Path)
    ev.add_argument("--confusion", type=Path, help="draw the confusion matrix into this PNG")
    ev.add_argument("--encoder", type=Path, help="encoder folder, if not the one recorded")
    ev.add_argument("--json", action="store_true")
    rt = verbs.add_parser("route", help="which expert a prompt goes to, and how sure the router is")
    rt.add_argument("prompt")
    rt.add_argument("--bundle", required=True, type=Path)
    rt.add_argument("--top-k", type=int, default=3)
    rt.add_argument("--encoder", type=Path, help="encoder folder, if not the one recorded")
    rt.add_argument("--json", action="store_true")


def _serve_parser(verbs: Any) -> None:
    sv = verbs.add_parser("serve", help="OpenAI-compatible server over a bundle of experts")
    sv.add_argument("--bundle", type=Path, help="bundle directory (default: build the default bundle once)")
    sv.add_argument("--host", default=defaults.HOST, help=f"address to bind (default {defaults.HOST})")
    sv.add_argument("--port", type=int, default=defaults.PORT)
    sv.add_argument(
        "--device-budget", help="memory for experts on the device, e.g. 2GiB (default: the host budget)"
    )
    sv.add_argument(
        "--host-budget", help="pinned host arena, e.g. 8GiB (default: the bundle, up to half of free RAM)"
    )
    sv.add_argument(
        "--max-queue",
        type=int,
        default=defaults.MAX_QUEUE,
        help=f"waiting requests before 429 (default {defaults.MAX_QUEUE})",
    )
    sv.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (or set WALLBREAK_API_KEY, or --api-key-file)"
    )
    sv.add_argument(
        "--api-key-file", type=Path, metavar="FILE", help="read the API key from FILE (kept out of `ps`)"
    )
    sv.add_argument(
        "--max-body",
        help=f"largest request body, e.g. 8MiB (default {format_bytes(defaults.MAX_BODY)}; larger: 413)",
    )
    sv.add_argument("--device", default=defaults.DEVICE, help="cpu, cuda or cuda:N")
    _policy_args(sv)
    sv.add_argument(
        "--max-batch", type=int, default=defaults.MAX_BATCH, help="sequences decoded together per expert"
    )
    sv.add_argument(
        "--direct-io",
        default=defaults.DIRECT_IO,
        choices=defaults.DIRECT_IO_MODES,
        help="O_DIRECT disk reads: auto (when the blob is not cached), on (always, as for a bundle "
        "larger than RAM), off",
    )
    sv.add_argument(
        "--kv-budget",
        help="KV cache all batches together (paused ones too) may grow to; past it, new requests wait "
        f"(default {format_bytes(defaults.KV_BUDGET)})",
    )
    sv.add_argument("--compile", choices=defaults.COMPILE_POLICIES, default=defaults.COMPILE,
                    help="compiled decode steps, built in the background while serving: auto (every "
                         "expert; on the CPU at batch size 1, built once by a child process into the "
                         "cache directory), on (as auto), all (every batch size where it can), off "
                         f"(default {defaults.COMPILE})")  # fmt: skip
    sv.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                    help="the same as --compile off")  # fmt: skip
    sv.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="serve from replicas on Ray Serve: a local Ray on 127.0.0.1, or the cluster at "
                         "ADDRESS (from `ray start`); needs pip install 'wallbreak[ray]'")  # fmt: skip
    sv.add_argument("--replicas", type=int, default=2,
                    help="with --ray: replica deployments, each with these budgets (default 2)")  # fmt: skip
    sv.add_argument("--expert-load", type=Path, metavar="FILE",
                    help="with --ray: spread experts over replicas by measured load: a saved /health "
                         "of an earlier deployment (its requests_by_expert), or {expert: requests} "
                         "JSON")  # fmt: skip


def _plan_parsers(verbs: Any) -> None:
    pl = verbs.add_parser("plan", help="place LLM training on clusters with different NICs, and predict it")
    pl.add_argument("cluster", type=Path, help="cluster spec (YAML), e.g. examples/two-clusters.yaml")
    pl.add_argument("--model", help="gpt-1.7b, gpt-3.6b, gpt-7.5b, gpt-18.4b, gpt-39.1b, gpt-76.1b")
    for flag in ("--layers", "--hidden", "--heads"):
        pl.add_argument(flag, type=int, help="custom shape (all three, instead of --model)")
    pl.add_argument("--seq-len", type=int, default=2048)
    pl.add_argument("--vocab", type=int, default=51200)
    pl.add_argument("--global-batch", type=int, required=True)
    pl.add_argument("--micro-batch", type=int, default=1)
    pl.add_argument("--recompute", default="none", help="none or full")
    pl.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    pl.add_argument(
        "--efficiency", type=float, default=0.70, help="achieved share of peak FLOPs (default 0.70)"
    )
    pl.add_argument("--placement", default="holmes", help="holmes (default) or megatron")
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
        description="Wraps `torchrun --standalone --nproc-per-node N -m wallbreak.holmes.train`; "
        "options after the known ones (--steps, --schedule, --checkpoint-dir, --resume, --data, ...) "
        "go to the runtime (see python -m wallbreak.holmes.train --help).",
    )
    tr.add_argument("--plan", required=True, type=Path)
    tr.add_argument("--nproc", type=int, help="processes (default: the plan's world size)")
    tr.add_argument("--max-restarts", type=int, default=0, help="torchrun elastic restarts after a failure")


def _bench_parsers(verbs: Any) -> None:
    bench = verbs.add_parser("bench", help="benchmarks that print JSON")
    bb = bench.add_subparsers(dest="what", required=True, parser_class=_Parser)
    from wallbreak.coe.bench_fuse import add_bench_fuse_parser

    add_bench_fuse_parser(bb, _names)
    sw = bb.add_parser("switch", help="expert switch time against baselines and ceilings")
    sw.add_argument("--bundle", required=True, type=Path)
    sw.add_argument("--experts", type=_names, default=None, help="comma-separated (default: first two)")
    sw.add_argument("--cache", default="both", help="warm, cold or both (default)")
    sw.add_argument("--repeats", type=int, default=5)
    sw.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    sw.add_argument("--reader-threads", type=int, default=4, help="parallel disk reads (default 4)")
    sw.add_argument("--json", action="store_true")
    from wallbreak.holmes.emulate_cli import add_bench_holmes_parser

    add_bench_holmes_parser(bb)
    bs = bb.add_parser("serve", help="the HTTP server under a Zipf workload: ours against fcfs-lru")
    bs.add_argument("--bundle", required=True, type=Path)
    bs.add_argument("--device-budget", help="e.g. 400MiB: how many experts fit at once")
    bs.add_argument("--host-budget", help="default: the whole bundle, up to half of free RAM")
    bs.add_argument("--workload", default="zipf:1.0")
    bs.add_argument("--requests", type=int, default=200)
    bs.add_argument(
        "--concurrency", type=_ints, default=[16], help="client threads; a list runs each (e.g. 16,64)"
    )
    bs.add_argument(
        "--policy",
        type=_names,
        default=None,
        help=f"comma-separated, of: {', '.join(POLICIES)} (default: all, each in its own server)",
    )
    bs.add_argument("--max-tokens", type=int, default=32)
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--no-alone", action="store_true", help="skip the plain transformers generate reference")
    bs.add_argument(
        "--max-wait",
        type=float,
        default=defaults.MAX_WAIT_S,
        help=f"the servers' --max-wait (default {defaults.MAX_WAIT_S})",
    )
    bs.add_argument("--plot", type=Path, help="bar chart of req/s and p99 per policy and concurrency (PNG)")
    bs.add_argument(
        "--direct-io",
        choices=defaults.DIRECT_IO_MODES,
        help="the servers' --direct-io (on: every miss reads disk)",
    )
    bs.add_argument(
        "--drop-caches", action="store_true", help="drop the page cache before each server (root): cold disk"
    )
    bs.add_argument("--ray", action="store_true",
                    help="through Ray Serve: 1 replica vs --replicas, the same budgets each")  # fmt: skip
    bs.add_argument("--replicas", type=int, default=2, help="with --ray (default 2)")
    bs.add_argument("--expert-load", type=Path, metavar="FILE",
                    help="with --ray: the servers' --expert-load (a run's requests_by_expert)")  # fmt: skip
    bs.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wallbreak", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"wallbreak {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    from wallbreak.holmes.emulate_cli import add_emulate_parser

    add_bundle_parser(verbs, _Parser, _names)
    for add in (_router_parsers, _serve_parser, _plan_parsers, _bench_parsers):
        add(verbs)
    add_emulate_parser(verbs, _Parser)
    return p


def api_key(given: str | None, path: Path | None) -> str | None:
    """The server's API key: --api-key, or the first line of --api-key-file (not both)."""
    if path is None:
        return given
    if given:
        raise ConfigError("give --api-key or --api-key-file, not both")
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({e.__class__.__name__})") from None
    if not key or "\n" in key:
        raise ConfigError(f"--api-key-file {path}: the file must hold the key alone, on one line")
    return key


def _serve(args: argparse.Namespace) -> int:
    """`wallbreak serve`, on this machine or (--ray) from Ray Serve replicas."""
    from wallbreak.coe.server.serve import ServeOptions, serve
    from wallbreak.units import parse_size

    run: Any = serve
    if args.ray is not None:
        from wallbreak.coe.replicas.deploy import serve_ray

        run = functools.partial(
            serve_ray, address=args.ray or None, replicas=args.replicas, expert_load=args.expert_load
        )
    elif args.expert_load is not None:
        raise ConfigError("--expert-load places experts on Ray replicas; use it with --ray")
    run(
        ServeOptions(
            bundle=args.bundle,
            host=args.host,
            port=args.port,
            device_budget=parse_size(args.device_budget, "--device-budget") if args.device_budget else None,
            host_budget=parse_size(args.host_budget, "--host-budget") if args.host_budget else None,
            max_queue=args.max_queue,
            api_key=api_key(args.api_key, args.api_key_file),
            max_body=parse_size(args.max_body, "--max-body") if args.max_body else defaults.MAX_BODY,
            device=args.device,
            policy=serving_policy(args.policy, args.scheduler, args.eviction, args.prefetch),
            max_batch=args.max_batch,
            max_wait_s=args.max_wait,
            kv_budget=parse_size(args.kv_budget, "--kv-budget") if args.kv_budget else defaults.KV_BUDGET,
            direct_io=args.direct_io,
            compile=args.compile,
        )
    )
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from wallbreak.coe.bench_serve import (
        BenchServeArgs,
        format_bench_serve,
        plot_bench_serve,
        run_bench_serve,
    )
    from wallbreak.units import parse_size

    for name in args.policy or ():
        serving_policy(name)  # an unknown name fails here, before any server starts
    if args.expert_load is not None:  # so does a bad load file
        from wallbreak.coe.bundle import Bundle
        from wallbreak.coe.replicas.placement import read_load

        if not args.ray:
            raise ConfigError("--expert-load places experts on Ray replicas; use it with --ray")
        read_load(args.expert_load, Bundle.open(args.bundle, lenient=True).names)
    res = run_bench_serve(
        BenchServeArgs(
            args.bundle,
            parse_size(args.device_budget, "--device-budget") if args.device_budget else None,
            parse_size(args.host_budget, "--host-budget") if args.host_budget else None,
            args.workload,
            args.requests,
            tuple(args.concurrency),
            tuple(args.policy) if args.policy else tuple(POLICIES),
            args.max_tokens,
            args.seed,
            not args.no_alone,
            args.max_wait,
            args.drop_caches,
            args.direct_io,
            args.replicas if args.ray else None,
            args.expert_load,
        )
    )
    if args.plot:
        plot_bench_serve(res, args.plot)
    print(json.dumps(res) if args.json else format_bench_serve(res))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.verb == "bundle":
        return run_bundle_command(args)
    if args.verb == "plan":
        return _plan(args)
    if args.verb == "train":
        return _train(args)
    if args.verb == "emulate" or (args.verb == "bench" and args.what == "holmes"):
        from wallbreak.holmes.emulate_cli import run_emulate_command

        return run_emulate_command(args)
    if args.verb == "serve":
        return _serve(args)
    if args.verb in ("router", "route"):
        return _router(args)
    if args.verb == "bench" and args.what == "fuse":
        from wallbreak.coe.bench_fuse import run_bench_fuse_command

        return run_bench_fuse_command(args)
    if args.verb == "bench" and args.what == "serve":
        return _bench_serve(args)
    if args.verb == "bench":
        return _bench_switch(args)
    raise AssertionError(args.verb)


def _bench_switch(args: argparse.Namespace) -> int:
    from wallbreak.coe.bench import BenchSwitchArgs, format_bench_switch, run_bench_switch

    a = BenchSwitchArgs(args.bundle, args.experts, args.cache, args.repeats, args.device, args.reader_threads)
    out = run_bench_switch(a)
    print(json.dumps(out) if args.json else format_bench_switch(out))
    return 0


def _train(args: argparse.Namespace) -> int:
    import subprocess

    from wallbreak.holmes.plan_file import load_plan

    plan = load_plan(args.plan)
    nproc = args.nproc or plan.world_size
    if nproc != plan.world_size:
        raise WallbreakError(f"--nproc {nproc}: the plan {args.plan} needs {plan.world_size} processes")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--max-restarts={args.max_restarts}", "-m", "wallbreak.holmes.train", "--plan", str(args.plan),
        *args.rest,
    ]  # fmt: skip
    return subprocess.call(cmd)


def _plan(args: argparse.Namespace) -> int:
    from wallbreak.holmes.calibrate import calibration_for
    from wallbreak.holmes.launch import emit_launch
    from wallbreak.holmes.report import format_report, make_report, plot_report
    from wallbreak.holmes.spec import ModelSpec, TrainingSpec
    from wallbreak.holmes.topology import load_topology

    custom = [args.layers, args.hidden, args.heads]
    if args.model and any(v is not None for v in custom):
        raise ConfigError("give either --model or --layers/--hidden/--heads, not both")
    if args.model:
        model = ModelSpec.preset(args.model)
        model = ModelSpec(model.name, model.layers, model.hidden, model.heads, args.seq_len, args.vocab)
    elif all(v is not None for v in custom):
        name = f"gpt-custom-{args.layers}x{args.hidden}"
        model = ModelSpec(name, args.layers, args.hidden, args.heads, args.seq_len, args.vocab)
    else:
        raise ConfigError("name a model: --model gpt-7.5b (or all of --layers, --hidden, --heads)")
    training = TrainingSpec(
        args.global_batch, args.micro_batch, args.recompute, args.dtype, efficiency=args.efficiency
    )
    if not 0 < args.master_port < 65536:
        raise ConfigError(f"--master-port must be 1-65535, got {args.master_port}")
    cal = calibration_for(args.calibrate, args.calibration, args.save_calibration)
    topo = load_topology(args.cluster)
    report = make_report(
        cal.apply(topo) if cal else topo, model, training, args.placement, args.tp, args.pp, args.dp
    )
    if args.plot:
        plot_report(report, args.plot)
    if args.emit_launch:
        files = emit_launch(report, args.emit_launch, args.master_port)
        print(f"wrote {len(files)} launch file(s) to {args.emit_launch}", file=sys.stderr)
    out = report.to_json() | ({"calibration": cal.to_json()} if cal else {})
    print(json.dumps(out) if args.json else format_report(report))
    return 0


def _router(args: argparse.Namespace) -> int:
    from wallbreak.coe.router import FitOptions, Router, fit_router, read_examples

    if args.verb == "route":
        router = Router.load(args.bundle, encoder=args.encoder)
        d = router.route([args.prompt], top_k=args.top_k)[0]
        if args.json:
            print(json.dumps(d.to_json() | {"method": router.method}))
        else:
            note = " (fell back: the router was unsure)" if d.fallback else ""
            print(f"{d.expert}  confidence {d.confidence:.3f}{note}")
            for name, score in d.top_k:
                print(f"  {name:<28}{score:.3f}")
            if d.truncated:
                print("  (the prompt was truncated to the encoder's window)")
        return 0
    if args.action == "fit":
        opts = FitOptions(
            examples=args.examples,
            generalist=args.generalist,
            threshold=args.threshold,
            methods=tuple(args.methods) if args.methods else FitOptions.methods,
            tune_steps=args.tune_steps,
            encoder=args.encoder,
            folds=args.folds,
            seed=args.seed,
        )
        report = fit_router(args.bundle, opts, progress=not args.json)
        if report is None:
            print(f"{args.bundle} has a single expert: it needs no router, and none was written")
        else:
            print(json.dumps(report.to_json()) if args.json else report.summary())
        return 0
    from wallbreak.coe.router.evaluate import evaluate

    router = Router.load(args.bundle, encoder=args.encoder)
    out = evaluate(router, read_examples(args.examples, router.experts), args.confusion)
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"accuracy {out['accuracy']:.3f} on {out['n']} prompts ({out['method']}), "
            f"fallback rate {out['fallback_rate']:.3f}, "
            f"p50 {out['p50_ms']:.1f} ms, p99 {out['p99_ms']:.1f} ms, "
            f"{out['batch32_prompts_per_s']:.0f} prompts/s at batch 32"
        )
        for name, pr in out["per_expert"].items():
            print(
                f"  {name:<28}precision {pr['precision']:.3f}  recall {pr['recall']:.3f}  ({pr['support']})"
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.verb != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return _run(args)
    except WallbreakError as e:
        print(f"wallbreak: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wallbreak: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `wallbreak bundle show DIR | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
