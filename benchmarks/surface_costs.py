"""What the OpenAI surface costs in the engine, on one expert of the default bundle:

- constrained decoding at batch 8: decode tokens/s of 8 rows under a JSON Schema grammar against 8
  free rows (both ban the end ids with logit_bias, so all 8 rows run to max_tokens and the only
  difference is the grammar's masks);
- a new 10-field schema's compile plus first mask through `coe.grammar.Grammars`;
- prompt log-probabilities (echo) of a 512-token prompt against a plain prefill of it.

Prints one JSON object.

    python benchmarks/surface_costs.py [--bundle DIR] [--expert NAME] [--tokens 64] [--repeats 3]

Compiled steps are off (`--compile off`): both sides of each comparison run the same eager forward.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from grammar_ab import SCHEMA

from wallbreak.coe import defaults
from wallbreak.coe.engine import Engine, EngineConfig, Event, Request, SamplingParams
from wallbreak.coe.grammar import Grammars
from wallbreak.coe.server.serve import ServeOptions, build

ROWS = 8
LONG = {  # JSON that cannot end within the tokens timed: every constrained row runs to max_tokens
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 999},
            "minItems": 200,
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}


def run_batch(
    eng: Engine, expert: str, prompts: list[list[int]], params: list[SamplingParams], grammar: Any
) -> float:
    """Submit all at once; decode tokens/s between the first token and the last."""
    tok = eng.tokenizers[expert]
    lock = threading.Lock()
    stamps: list[float] = []
    left = [len(prompts)]
    done = threading.Event()

    def emit(ev: Event) -> None:
        with lock:
            if ev.tokens:
                stamps.append(time.perf_counter())
            if ev.finish_reason:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    for ids, p in zip(prompts, params, strict=True):
        eng.submit(Request(expert, ids, p, emit, tok.stream(), grammar))
    assert done.wait(600), "the batch did not finish"
    # Tokens after each row's first (the prefill's) over the time from the first to the last token.
    return (len(stamps) - len(prompts)) / (max(stamps) - min(stamps))


def constrained_vs_free(eng: Engine, expert: str, tokens: int, repeats: int) -> dict[str, Any]:
    tok = eng.tokenizers[expert]
    ban = tuple((t, -100.0) for t in sorted(tok.eos_ids))
    prompts = [
        tok.encode_chat([{"role": "user", "content": f"List some numbers, please ({i})."}])
        for i in range(ROWS)
    ]
    grammar = Grammars().json_schema(tok, LONG, "schema")
    params = [SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, logit_bias=ban) for i in range(ROWS)]
    run_batch(eng, expert, prompts, params, None)  # warm-up
    free, constrained = [], []
    for _ in range(repeats):
        free.append(run_batch(eng, expert, prompts, params, None))
        constrained.append(run_batch(eng, expert, prompts, params, grammar))
    f, c = statistics.median(free), statistics.median(constrained)
    return {
        "rows": ROWS,
        "tokens_per_row": tokens,
        "free_tokens_per_s": round(f, 1),
        "constrained_tokens_per_s": round(c, 1),
        "constrained_cost_pct": round(100 * (1 - c / f), 1),
        "runs": {"free": [round(x, 1) for x in free], "constrained": [round(x, 1) for x in constrained]},
    }


def first_mask(eng: Engine, expert: str, repeats: int) -> dict[str, Any]:
    tok = eng.tokenizers[expert]
    grammars = Grammars()
    t0 = time.perf_counter()
    grammars.json_schema(tok, {"type": "object"}, "warm")  # the tokenizer's one-time set-up
    setup = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        schema = json.loads(json.dumps(SCHEMA))
        schema["properties"][f"extra{r}"] = {"type": "boolean"}  # a schema the cache has not seen
        t0 = time.perf_counter()
        row = grammars.json_schema(tok, schema, "schema").start()
        row.allowed(len(tok.tokenizer))
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "schema_fields": len(SCHEMA["properties"]) + 1,
        "tokenizer_setup_ms_once_per_expert": round(setup * 1000, 1),
        "compile_and_first_mask_ms_median": round(statistics.median(times), 2),
        "compile_and_first_mask_ms_max": round(max(times), 2),
    }


def timed(eng: Engine, expert: str, ids: list[int], p: SamplingParams) -> float:
    done = threading.Event()
    t0 = time.perf_counter()
    eng.submit(Request(expert, ids, p, lambda ev: done.set() if ev.finish_reason else None))
    assert done.wait(300)
    return time.perf_counter() - t0


def prompt_logprobs_cost(eng: Engine, expert: str, repeats: int) -> dict[str, Any]:
    vocab = len(eng.tokenizers[expert].tokenizer)
    rng = random.Random(0)
    ids = [rng.randrange(100, vocab) for _ in range(512)]
    plain = SamplingParams(max_tokens=1, temperature=0)
    echo = SamplingParams(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1)
    timed(eng, expert, ids, plain)
    timed(eng, expert, ids, echo)
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(eng, expert, ids, plain))
        b.append(timed(eng, expert, ids, echo))
    pa, pb = statistics.median(a), statistics.median(b)
    return {
        "prompt_tokens": len(ids),
        "plain_prefill_s": round(pa, 3),
        "prefill_with_prompt_logprobs_s": round(pb, 3),
        "ratio": round(pb / pa, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--expert", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    bundle = a.bundle or defaults.default_bundle_dir()
    opts = ServeOptions(bundle=bundle, engine=EngineConfig(compile="off", max_batch=ROWS, max_wait_s=0.05))
    eng, _, tiers, _ = build(opts, with_router=False)
    eng.start()
    try:
        out = {
            "bundle": str(Path(bundle).name),
            "expert": a.expert,
            "compile": "off",
            "batch8": constrained_vs_free(eng, a.expert, a.tokens, a.repeats),
            "first_mask": first_mask(eng, a.expert, 5),
            "prompt_logprobs": prompt_logprobs_cost(eng, a.expert, 5),
        }
    finally:
        eng.stop(timeout=5)
        tiers.close()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
