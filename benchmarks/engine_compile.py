"""The serving engine's compiled decode step against its eager one, on one expert.

    python benchmarks/engine_compile.py --bundle DIR --expert NAME [--compile all|on|off]
        [--prompt-tokens 128] [--tokens 32] [--repeats 3]

Runs the real engine (tiers, scheduler, continuous batching, the fixed-capacity KV blocks) on one
expert: 1 and then 8 concurrent greedy requests with the same prompt (English text cut to
`--prompt-tokens` tokens), `--repeats` times each. Decode tokens/s is the tokens produced after
every request had its first, over the time from then to the last token (prefill excluded, as
`benchmarks/llamacpp_anchor.py` times llama.cpp; while requests are prefilled one by one, the
compiled prefill's way, the first ones' early tokens are not counted); `e2e` includes prefill;
`ttft_s` is the first request's first token, `ttft_last_s` the last request's. Best of the repeats.
`--compile all` (default) compiles every expert (on the CPU at one row, built ahead of time by a
child process into $WALLBREAK_CACHE/aot); `on` is `serve --compile on`. With either, it serves one
short request, then waits (idle) until the background compile of the expert's decode step is ready,
and reports how long that took. Prints one JSON object (a line per pass on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import make_engine
from wallbreak.coe.engine import Engine, Event, Request, SamplingParams, aot, compiled

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a "
    "goldsmith in Mainz, combined movable metal type, oil-based ink and a wooden press adapted from "
    "those used for wine. Within fifty years presses were at work in more than two hundred cities "
    "across Europe, and the number of books in circulation grew from thousands to millions. "
)


class Timed:
    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.tokens = 0
        self.times: list[float] = []  # when each token arrived
        self.done = threading.Event()

    def __call__(self, ev: Event) -> None:
        if ev.tokens:
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
            self.tokens += len(ev.tokens)
            self.times += [now] * len(ev.tokens)
        if ev.finish_reason:
            self.done.set()


def one_pass(eng: Engine, expert: str, ids: list[int], n: int, tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    runs = [Timed() for _ in range(n)]
    for c in runs:
        eng.submit(Request(expert, ids, SamplingParams(max_tokens=tokens, temperature=0), c))
    for c in runs:
        c.done.wait(900)
    first = min(c.first or t0 for c in runs)
    started = max(c.first or t0 for c in runs)  # every request has its first token: all decoding
    last = max(c.last for c in runs)
    produced = sum(c.tokens for c in runs)
    return {
        "decode_tps": sum(t > started for c in runs for t in c.times) / max(last - started, 1e-9),
        "e2e_tps": produced / (time.perf_counter() - t0),
        "tokens": produced,
        "ttft_s": first - t0,  # the first request's first token (prefill, queueing included)
        "ttft_last_s": started - t0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--expert", required=True)
    p.add_argument("--compile", choices=["all", "on", "off"], default="all")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    eng, tiers = make_engine(a.bundle, max_batch=8, compile=a.compile)
    eng.start()
    out: dict[str, Any] = {"expert": a.expert, "compile": a.compile}
    try:
        tok = eng.tokenizers[a.expert]
        ids = (tok.encode_text(TEXT) * (1 + a.prompt_tokens // 32))[: a.prompt_tokens]
        t0 = time.perf_counter()
        key = eng.layouts[a.expert]
        if a.compile != "off":
            one_pass(eng, a.expert, ids[:16], 1, 4)  # the first decode step starts the compile
        while a.compile != "off" and eng.steps.state.get(key) != "ready":
            if eng.steps.state.get(key) == "eager":
                raise SystemExit("the compiled step gave up; see the warning above")
            time.sleep(0.5)
        out["ready_after_s"] = round(time.perf_counter() - t0, 1)
        if a.compile != "off" and eng.bundle.expert(a.expert).dtype in aot.PREFILL_FROM:
            while eng.steps.prefill_from(key) is None:  # its prefill comes next
                if eng.steps.state.get(key) == "eager":
                    raise SystemExit("the compiled prefill gave up; see the warning above")
                time.sleep(0.5)
            out["prefill_ready_after_s"] = round(time.perf_counter() - t0, 1)
        for _ in range(a.repeats):
            for n in (1, 8):
                r = one_pass(eng, a.expert, ids, n, a.tokens)
                print(f"{a.compile} batch {n}: " + json.dumps(r), file=sys.stderr)
                for k in ("decode_tps", "e2e_tps"):
                    out[f"{k}_b{n}"] = max(out.get(f"{k}_b{n}", 0.0), r[k])
                for k in ("ttft_s", "ttft_last_s"):
                    out[f"{k}_b{n}"] = round(min(out.get(f"{k}_b{n}", 1e9), r[k]), 3)
                out[f"tokens_b{n}"] = r["tokens"]
        out["prompt_tokens"] = len(ids)
        out["graphs"] = compiled.graphs_built()
        out["recompiles_after_ready"] = eng.steps.recompiles
        out["compiled_steps"] = eng.steps.compiled_steps
        out["compiled_prefills"] = eng.steps.compiled_prefills
    finally:
        eng.stop()
        tiers.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
