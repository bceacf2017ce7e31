"""The serving verbs: `wallbreak serve`, `router fit|eval`, `route`, `bench switch|fuse|serve`."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from wallbreak.cli.args import Parser, default_arg, default_of, fill, ints, names, on_off
from wallbreak.coe import defaults
from wallbreak.coe.bench.fuse import BenchFuseArgs, format_bench_fuse
from wallbreak.coe.bench.fuse import run_bench_fuse as bench_fuse
from wallbreak.coe.bench.serve import BenchServeArgs, format_bench_serve, plot_bench_serve
from wallbreak.coe.bench.serve import run_bench_serve as bench_serve
from wallbreak.coe.bench.switch import BenchSwitchArgs, format_bench_switch
from wallbreak.coe.bench.switch import run_bench_switch as bench_switch
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.engine.compiled import Rows, parse_rows
from wallbreak.coe.policy import EVICTIONS, POLICIES, SCHEDULERS, serving_policy
from wallbreak.coe.replicas.placement import read_load
from wallbreak.coe.router import FitOptions, Router, fit_router, read_examples
from wallbreak.coe.router.evaluate import evaluate
from wallbreak.errors import ConfigError
from wallbreak.units import format_bytes, parse_size


def rows_arg(text: str) -> Rows:
    """`serve --compile-rows`: sizes, `built` or `none` (the check is compiled.check_rows')."""
    try:
        return parse_rows(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--compile-rows ")) from None


def cpus_arg(text: str) -> int:
    """`serve --replica-cpus`: a whole number of CPUs (whether the nodes have them, Ray is asked)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of CPUs, at least 1")
    return int(text)


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
    p.add_argument("--prefetch", type=on_off, help="on or off: override the policy's prefetch")
    p.add_argument(
        "--max-wait",
        type=float,
        default=defaults.MAX_WAIT_S,
        help=f"seconds before a waiting expert goes next (default {defaults.MAX_WAIT_S})",
    )


def add_router_parsers(verbs: Any) -> None:
    r = verbs.add_parser("router", help="fit and evaluate the prompt -> expert router of a bundle")
    rv = r.add_subparsers(dest="action", required=True, parser_class=Parser)
    fit = rv.add_parser("fit", help="fit a router on labelled prompts and store it in the bundle")
    fit.add_argument("--bundle", required=True, type=Path)
    fit.add_argument(
        "--examples", type=Path, help='JSON lines of {"prompt", "expert"} (default: the manifest\'s examples)'
    )
    fit.add_argument("--generalist", help="expert that answers when the router is unsure")
    fit.add_argument("--threshold", type=float, help="confidence below which the generalist answers (0-1)")
    fit.add_argument(
        "--methods",
        type=names,
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


def _compile_args(sv: argparse.ArgumentParser) -> None:
    """`serve`'s compiled-step options (the engine's `compile` and `compile_rows`)."""
    sv.add_argument("--compile", choices=defaults.COMPILE_POLICIES, default=defaults.COMPILE,
                    help="compiled decode steps, built in the background while serving: auto (every "
                         "expert; on the CPU at batch size 1, built once by a child process into the "
                         "cache directory), on (as auto), all (every batch size where it can), off "
                         f"(default {defaults.COMPILE})")  # fmt: skip
    sv.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                    help="the same as --compile off")  # fmt: skip
    sv.add_argument("--compile-rows", type=rows_arg, default=defaults.COMPILE_ROWS,
                    metavar="N,N,...|built|none",
                    help="on the CPU, also a compiled decode step for batches of exactly these sizes "
                         "(2 to 16), built after the one-row step if missing; a larger batch is cut "
                         "into runs of them. built: the sizes `bundle compile --rows` left in the cache, "
                         f"building none; none: no row steps (default {defaults.COMPILE_ROWS}; "
                         "docs/benchmarks.md: 2 to 4 rows won most, 16 lost)")  # fmt: skip


def add_serve_parser(verbs: Any) -> None:
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
        "--admin-key",
        help="turn on the admin API (/admin/...: add, replace, remove, pin experts live) under this key "
        "(or WALLBREAK_ADMIN_KEY, or --admin-key-file); off without one",
    )
    sv.add_argument("--admin-key-file", type=Path, metavar="FILE", help="read the admin key from FILE")
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
        "--huge-pages",
        default=defaults.HUGE_PAGES,
        choices=defaults.HUGE_PAGES_MODES,
        help="ask the kernel for 2 MiB pages under the host arena, which on the CPU is where experts "
        "decode from (default %(default)s; /health's tiers.host_memory says what the kernel gave)",
    )
    sv.add_argument(
        "--kv-budget",
        help="KV cache all batches together (paused ones too) may grow to; past it, new requests wait "
        f"(default {format_bytes(defaults.KV_BUDGET)})",
    )
    _compile_args(sv)
    sv.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="serve from replicas on Ray Serve: a local Ray on 127.0.0.1, or the cluster at "
                         "ADDRESS (from `ray start`); needs pip install 'wallbreak[ray]'")  # fmt: skip
    sv.add_argument("--replicas", type=int, default=defaults.REPLICAS,
                    help="with --ray: replica deployments, each with these budgets "
                         f"(default {defaults.REPLICAS})")  # fmt: skip
    sv.add_argument("--replica-cpus", type=cpus_arg, metavar="N",
                    help="with --ray: CPUs each replica reserves and runs torch's threads on (default: "
                         "the Ray cluster's CPUs split evenly over the replicas)")  # fmt: skip
    sv.add_argument("--expert-load", type=Path, metavar="FILE",
                    help="with --ray: spread experts over replicas by measured load: a saved /health "
                         "of an earlier deployment (its requests_by_expert), or {expert: requests} "
                         "JSON")  # fmt: skip


def add_bench_parsers(bench: Any) -> None:
    """`wallbreak bench fuse|switch|serve` (`bench holmes` is the emulator's); defaults are the
    benchmarks' own Args dataclasses'."""
    fu = bench.add_parser(
        "fuse", help="one expert slot's forward: eager vs compiled, per dtype, over switches"
    )
    fu.add_argument("--bundle", required=True, type=Path)
    fu.add_argument("--experts", type=names, help="comma-separated (default: the bundle's first expert)")
    forms = list(default_of(BenchFuseArgs, "dtypes"))
    fu.add_argument("--dtypes", type=names, default=forms, help=f"{','.join(forms)} (default: all)")
    fu.add_argument("--modes", type=names, default=None,
                    help="eager,compiled,graphs (default: eager,compiled; graphs added on CUDA)")  # fmt: skip
    for flag in ("--prompt-tokens", "--decode-tokens", "--switches", "--repeats"):
        default_arg(fu, BenchFuseArgs, flag, int)
    default_arg(fu, BenchFuseArgs, "--device", str, "cpu, cuda or cuda:N")
    fu.add_argument("--json", action="store_true")
    sw = bench.add_parser("switch", help="expert switch time against baselines and ceilings")
    sw.add_argument("--bundle", required=True, type=Path)
    sw.add_argument("--experts", type=names, default=None, help="comma-separated (default: first two)")
    default_arg(sw, BenchSwitchArgs, "--cache", str, "warm, cold or both")
    default_arg(sw, BenchSwitchArgs, "--repeats", int)
    default_arg(sw, BenchSwitchArgs, "--device", str, "cpu, cuda or cuda:N")
    default_arg(sw, BenchSwitchArgs, "--reader-threads", int, "parallel disk reads")
    sw.add_argument("--json", action="store_true")
    _bench_serve_parser(bench)


def _bench_serve_parser(bench: Any) -> None:
    bs = bench.add_parser("serve", help="the HTTP server under a Zipf workload: ours against fcfs-lru")
    bs.add_argument("--bundle", required=True, type=Path)
    bs.add_argument("--device-budget", help="e.g. 400MiB: how many experts fit at once")
    bs.add_argument("--host-budget", help="default: the whole bundle, up to half of free RAM")
    default_arg(bs, BenchServeArgs, "--workload", str, "zipf:S, S the Zipf exponent")
    default_arg(bs, BenchServeArgs, "--requests", int)
    concurrency = list(default_of(BenchServeArgs, "concurrency"))
    bs.add_argument("--concurrency", type=ints, default=concurrency,
                    help=f"client threads; a list runs each, e.g. 16,64 (default {concurrency})")  # fmt: skip
    bs.add_argument("--policy", type=names, default=None,
                    help=f"comma-separated, of: {', '.join(POLICIES)} "
                         "(default: all, each in its own server)")  # fmt: skip
    default_arg(bs, BenchServeArgs, "--max-tokens", int)
    default_arg(bs, BenchServeArgs, "--seed", int)
    bs.add_argument("--no-alone", action="store_true", help="skip the plain transformers generate reference")
    default_arg(bs, BenchServeArgs, "--max-wait", float, "the servers' --max-wait")
    bs.add_argument("--plot", type=Path, help="PNG: p99 against the number of experts (with several "
                    "--experts-subset sizes), else req/s and p99 per policy and concurrency")  # fmt: skip
    compile_default = default_of(BenchServeArgs, "compile")
    bs.add_argument("--compile", choices=defaults.COMPILE_POLICIES, default=compile_default,
                    help="the servers' --compile (default %(default)s; run `wallbreak bundle compile` first, "
                         "or a server builds while it is timed)")  # fmt: skip
    bs.add_argument("--compile-rows", type=ints, default=[], metavar="N,N,...",
                    help="the servers' --compile-rows (built before timing, as the other steps)")  # fmt: skip
    bs.add_argument("--direct-io", choices=defaults.DIRECT_IO_MODES,
                    help="the servers' --direct-io (on: every miss reads disk)")  # fmt: skip
    bs.add_argument("--huge-pages", choices=defaults.HUGE_PAGES_MODES,
                    help="the servers' --huge-pages (default: theirs)")  # fmt: skip
    bs.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before each server (root): cold disk")  # fmt: skip
    bs.add_argument("--ray", action="store_true",
                    help="through Ray Serve: 1 replica vs --replicas, the same budgets each")  # fmt: skip
    bs.add_argument(
        "--replicas", type=int, default=defaults.REPLICAS, help=f"with --ray (default {defaults.REPLICAS})"
    )
    bs.add_argument("--expert-load", type=Path, metavar="FILE",
                    help="with --ray: the servers' --expert-load (a run's requests_by_expert)")  # fmt: skip
    bs.add_argument("--experts-subset", type=ints, default=None, metavar="N,N,...",
                    help="requests over the first N experts of the bundle, a run for each N "
                         "(e.g. 8,16,32,64,150; default: all of them)")  # fmt: skip
    bs.add_argument("--json", action="store_true")


def run_bench(args: argparse.Namespace) -> int:
    if args.what == "fuse":
        return run_bench_fuse(args)
    if args.what == "serve":
        return run_bench_serve(args)
    return run_bench_switch(args)


def run_bench_fuse(args: argparse.Namespace) -> int:
    modes = args.modes or (["eager", "compiled"] + (["graphs"] if args.device.startswith("cuda") else []))
    res = bench_fuse(fill(BenchFuseArgs, args, modes=modes))
    print(json.dumps(res) if args.json else format_bench_fuse(res))
    return 0


def api_key(given: str | None, path: Path | None, flag: str = "--api-key") -> str | None:
    """A key the server checks: --api-key, or the first line of --api-key-file (not both); `flag`
    names the option (the admin key's are --admin-key and --admin-key-file)."""
    if path is None:
        return given
    if given:
        raise ConfigError(f"give {flag} or {flag}-file, not both")
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag}-file {path}: cannot read it ({e.__class__.__name__})") from None
    if not key or "\n" in key:
        raise ConfigError(f"{flag}-file {path}: the file must hold the key alone, on one line")
    return key


def run_serve(args: argparse.Namespace) -> int:
    """`wallbreak serve`, on this machine or (--ray) from Ray Serve replicas."""
    from wallbreak.coe.engine import EngineConfig  # deferred: loads transformers
    from wallbreak.coe.server.serve import ServeOptions, serve  # deferred: loads transformers

    run: Any = serve
    if args.ray is not None:
        from wallbreak.coe.replicas.deploy import serve_ray  # deferred: loads transformers

        run = functools.partial(
            serve_ray,
            address=args.ray or None,
            replicas=args.replicas,
            expert_load=args.expert_load,
            cpus=args.replica_cpus,
        )
    elif args.expert_load is not None:
        raise ConfigError("--expert-load places experts on Ray replicas; use it with --ray")
    elif args.replica_cpus is not None:
        raise ConfigError("--replica-cpus sizes Ray replicas; use it with --ray")
    run(
        ServeOptions(
            bundle=args.bundle,
            host=args.host,
            port=args.port,
            device_budget=parse_size(args.device_budget, "--device-budget") if args.device_budget else None,
            host_budget=parse_size(args.host_budget, "--host-budget") if args.host_budget else None,
            api_key=api_key(args.api_key, args.api_key_file),
            admin_key=api_key(args.admin_key, args.admin_key_file, "--admin-key"),
            max_body=parse_size(args.max_body, "--max-body") if args.max_body else defaults.MAX_BODY,
            device=args.device,
            direct_io=args.direct_io,
            huge_pages=args.huge_pages,
            engine=EngineConfig(
                policy=serving_policy(args.policy, args.scheduler, args.eviction, args.prefetch),
                max_batch=args.max_batch,
                max_wait_s=args.max_wait,
                max_queue=args.max_queue,
                kv_budget=parse_size(args.kv_budget, "--kv-budget") if args.kv_budget else defaults.KV_BUDGET,
                compile=args.compile,
                compile_rows=args.compile_rows,
            ),
        )
    )
    return 0


def run_bench_serve(args: argparse.Namespace) -> int:
    for name in args.policy or ():
        serving_policy(name)  # an unknown name fails here, before any server starts
    if args.expert_load is not None:  # so does a bad load file
        if not args.ray:
            raise ConfigError("--expert-load places experts on Ray replicas; use it with --ray")
        read_load(args.expert_load, Bundle.open(args.bundle, lenient=True).names)
    res = bench_serve(
        fill(
            BenchServeArgs,
            args,
            device_budget=parse_size(args.device_budget, "--device-budget") if args.device_budget else None,
            host_budget=parse_size(args.host_budget, "--host-budget") if args.host_budget else None,
            concurrency=tuple(args.concurrency),
            policies=tuple(args.policy) if args.policy else tuple(POLICIES),
            alone=not args.no_alone,
            replicas=args.replicas if args.ray else None,
            experts_subset=tuple(args.experts_subset) if args.experts_subset else None,
            compile_rows=tuple(args.compile_rows),
        )
    )
    if args.plot:
        plot_bench_serve(res, args.plot)
    print(json.dumps(res) if args.json else format_bench_serve(res))
    return 0


def run_bench_switch(args: argparse.Namespace) -> int:
    out = bench_switch(fill(BenchSwitchArgs, args))
    print(json.dumps(out) if args.json else format_bench_switch(out))
    return 0


def run_router(args: argparse.Namespace) -> int:
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
