"""One expert's prefill, eager against the ahead-of-time compiled one, interleaved in one process.

    WALLBREAK_CACHE=... python benchmarks/prefill_ab.py --bundle DIR --expert NAME [--lengths 128,512]

Like `step_ab.py`, for a prompt instead of a decode step: each round prefills one fresh one-row
cache with a prompt of each length, eagerly and then through the compiled prefill package, and
reports the median tokens/s of each, their ratio, and how far apart the last logits were and
whether their argmax agreed. Prompts longer than --chunk run in chunks, as the engine runs them.
The package must exist (`wallbreak bundle compile DIR`, or a `serve` that built it, with the same
WALLBREAK_CACHE). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from wallbreak.coe import defaults
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.engine import aot
from wallbreak.coe.engine.step import run_step
from wallbreak.coe.engine.kv import KVCache
from wallbreak.coe.tiers.device import load_standalone


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--expert", required=True)
    p.add_argument("--lengths", default="128,512", help="prompt lengths in tokens, comma-separated")
    p.add_argument("--chunk", type=int, default=defaults.PREFILL_CHUNK)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    bundle = Bundle.open(a.bundle)
    path = aot.package_path(bundle.expert(a.expert).layout_key, "prefill")
    if not path.is_file():
        raise SystemExit(f"no compiled prefill at {path}: run `wallbreak bundle compile {a.bundle}` first")
    model = load_standalone(bundle, a.expert)
    package = aot.AotStep(path)
    vocab = int(model.config.vocab_size)

    def prefill(ids: torch.Tensor, mode: str) -> tuple[float, torch.Tensor]:
        cache = KVCache.for_model(model)
        cache.open_rows(1)
        t0 = time.perf_counter()
        for c0 in range(0, ids.shape[1], a.chunk):
            chunk = ids[:, c0 : c0 + a.chunk]
            if mode == "compiled" and chunk.shape[1] >= aot.MIN_PREFILL:
                logits = package(model, chunk, cache)
            else:
                logits = run_step(model, chunk, cache, None)
        return time.perf_counter() - t0, logits

    out: dict[str, object] = {"expert": a.expert, "chunk": a.chunk, "lengths": {}}
    for n in (int(x) for x in a.lengths.split(",")):
        ids = torch.randint(100, vocab, (1, n), generator=torch.Generator().manual_seed(n))
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        last: dict[str, torch.Tensor] = {}
        for _ in range(a.rounds + 1):  # the first round warms both up and is not counted
            for mode in times:
                t, last[mode] = prefill(ids, mode)
                times[mode].append(t)
        tps = {k: round(n / statistics.median(v[1:]), 1) for k, v in times.items()}
        diff = (last["eager"].float() - last["compiled"].float()).abs().max()
        out["lengths"][str(n)] = {  # type: ignore[index]
            "tokens_per_s": tps,
            "speedup": round(tps["compiled"] / tps["eager"], 2),
            "max_logit_diff": round(float(diff), 4),
            "same_argmax": bool(last["eager"].argmax() == last["compiled"].argmax()),
        }
        print(json.dumps({n: out["lengths"][str(n)]}), file=sys.stderr, flush=True)  # type: ignore[index]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
