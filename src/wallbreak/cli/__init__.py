"""One entry point, one verb per job: `wallbreak bundle|router|serve|plan|train|data|export|emulate|bench`.

The command line's one layer: each verb's parser and handler live in this package (`bundle`, `coe`,
`holmes`, `emulate`), beside the shared parser types (`args`). User mistakes (WallbreakError) become
one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from wallbreak import __version__
from wallbreak.cli import coe, emulate, experts, holmes
from wallbreak.cli.args import Parser
from wallbreak.cli.bundle import add_bundle_parser, run_bundle_command
from wallbreak.errors import WallbreakError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="wallbreak", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"wallbreak {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=Parser)
    add_bundle_parser(verbs)
    coe.add_router_parsers(verbs)
    coe.add_serve_parser(verbs)
    experts.add_experts_parser(verbs)
    holmes.add_plan_parsers(verbs)
    holmes.add_data_and_export_parsers(verbs)
    bench = verbs.add_parser("bench", help="benchmarks that print JSON")
    bb = bench.add_subparsers(dest="what", required=True, parser_class=Parser)
    coe.add_bench_parsers(bb)
    emulate.add_bench_holmes_parser(bb)
    emulate.add_emulate_parser(verbs)
    return p


def _run(args: argparse.Namespace) -> int:
    if args.verb == "bundle":
        return run_bundle_command(args)
    if args.verb == "plan":
        return holmes.run_plan(args)
    if args.verb == "train":
        return holmes.run_train(args)
    if args.verb == "data":
        return holmes.run_data(args)
    if args.verb == "export":
        return holmes.run_export(args)
    if args.verb == "emulate" or (args.verb == "bench" and args.what == "holmes"):
        return emulate.run_emulate_command(args)
    if args.verb == "serve":
        return coe.run_serve(args)
    if args.verb == "experts":
        return experts.run_experts(args)
    if args.verb in ("router", "route"):
        return coe.run_router(args)
    return coe.run_bench(args)


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
