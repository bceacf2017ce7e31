"""The serving engine's compiled decode step against its eager one, on one expert (issue 12).

    python benchmarks/engine_compile.py --bundle DIR --expert NAME [--compile on|off] [--tokens 32]

Runs the real engine (tiers, continuous batching, the fixed-capacity KV blocks) on one expert and
measures aggregate decode tokens/s for 1 and then 8 concurrent greedy requests, twice each. With
`--compile on` it first waits, serving, until the background compile of the expert's decode step
is ready, and reports how long that took; so both passes run the compiled step. Prints one JSON
object (a line per pass on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import make_engine, run
from wallbreak.coe.engine import compiled


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--expert", required=True)
    p.add_argument("--compile", choices=["on", "off"], default="on")
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    eng, tiers = make_engine(a.bundle, max_batch=8, compile=a.compile)
    eng.start()
    out: dict[str, object] = {"expert": a.expert, "compile": a.compile}
    try:
        ids = eng.tokenizers[a.expert].encode_text(
            "The history of the printing press begins in the fifteenth century, when"
        )
        t0 = time.perf_counter()
        key = eng.layouts[a.expert]
        while a.compile == "on" and eng.steps.state.get(key) != "ready":
            if eng.steps.state.get(key) == "eager":
                raise SystemExit("the compiled step gave up; see the warning above")
            c = run(eng, a.expert, ids, 4)
            c.done.wait(900)
        out["ready_after_s"] = round(time.perf_counter() - t0, 1)
        for n in (1, 8, 1, 8):
            t0 = time.perf_counter()
            done = [run(eng, a.expert, ids, a.tokens) for _ in range(n)]
            for c in done:
                c.done.wait(900)
            dt = time.perf_counter() - t0
            print(f"{a.compile} batch {n}: {n * a.tokens / dt:.1f} tok/s aggregate", file=sys.stderr)
            out[f"b{n}_tps"] = max(float(out.get(f"b{n}_tps", 0.0)), n * a.tokens / dt)  # type: ignore[arg-type]
        out["prompt_tokens"] = len(ids)
        out["graphs"] = compiled.graphs_built()
        out["recompiles_after_ready"] = eng.steps.recompiles
        out["compiled_steps"] = eng.steps.compiled_steps
    finally:
        eng.stop()
        tiers.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
