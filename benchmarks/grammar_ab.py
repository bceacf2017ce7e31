"""llguidance against xgrammar on one expert's tokenizer and one 10-field JSON Schema: the one-time
tokenizer set-up, a new schema's compile plus first mask, and the masks of 8 rows per decode step
(each row a matcher of its own, walking a random valid path), row by row as the engine asks and in
each library's own batched call. Prints one JSON object.

    python benchmarks/grammar_ab.py [--tokenizer DIR] [--steps 60] [--repeats 5]

Without --tokenizer it uses SmolLM2-135M-Instruct's from the default bundle (`wallbreak serve`
builds it once)."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROWS = 8
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "maxLength": 40},
        "city": {"type": "string", "maxLength": 20},
        "country": {"enum": ["FR", "DE", "NO", "US", "JP"]},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "maxLength": 8},
            },
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        "notes": {"type": ["string", "null"], "maxLength": 40},
    },
    "required": ["name", "age", "email", "city", "country", "score", "active", "tags", "address", "notes"],
    "additionalProperties": False,
}


def allowed_ids(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = ((bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[:vocab]
    return bits.nonzero().flatten().tolist()


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class Llg:
    name = "llguidance"

    def __init__(self, hf: Any, eos: list[int]) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf, eos_token=eos)
        self.setup_ms = ms(t0)
        self.vocab = self.tok.vocab_size
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict[str, Any]) -> Any:
        g = self.llg.LLMatcher.grammar_from_json_schema(
            {**schema, "x-guidance": {"whitespace_flexible": False}}
        )
        return self.llg.LLMatcher(self.tok, g)

    def matchers(self, compiled: Any) -> list[Any]:
        return [compiled.deep_copy() for _ in range(ROWS)]

    def bitmask(self) -> torch.Tensor:
        return torch.full((ROWS, (self.vocab + 31) // 32), -1, dtype=torch.int32)

    def fill(self, m: Any, bm: torch.Tensor, i: int) -> None:
        row = bm[i]  # as coe.grammar does (llguidance.torch would import torch's compiler)
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def fill_all(self, ms_: list[Any], bm: torch.Tensor) -> None:
        self.executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(ms_)], bm.data_ptr(), bm.shape[1] * 4, ROWS
        )

    def accept(self, m: Any, t: int) -> None:
        assert m.consume_token(t), m.get_error()

    def done(self, m: Any) -> bool:
        return bool(m.is_stopped() or m.is_accepting())


class Xgr:
    name = "xgrammar"

    def __init__(self, hf: Any, eos: list[int]) -> None:
        import xgrammar

        self.xgr = xgrammar
        t0 = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf, stop_token_ids=eos)
        self.compiler = xgrammar.GrammarCompiler(self.info, cache_enabled=False)
        self.setup_ms = ms(t0)
        self.vocab = self.info.vocab_size
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: dict[str, Any]) -> Any:
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, strict_mode=True
        )
        return compiled

    def matchers(self, compiled: Any) -> list[Any]:
        return [self.xgr.GrammarMatcher(compiled) for _ in range(ROWS)]

    def bitmask(self) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(ROWS, self.vocab)

    def fill(self, m: Any, bm: torch.Tensor, i: int) -> None:
        m.fill_next_token_bitmask(bm, i)

    def fill_all(self, ms_: list[Any], bm: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(ms_, bm)

    def accept(self, m: Any, t: int) -> None:
        assert m.accept_token(t)

    def done(self, m: Any) -> bool:
        return bool(m.is_terminated())


def first_mask_ms(lib: Any) -> float:
    """A schema never seen before (a fresh field name defeats any cache): compile, then one mask."""
    schema = json.loads(json.dumps(SCHEMA))
    schema["properties"][f"f{random.randrange(1 << 30)}"] = {"type": "boolean"}
    t0 = time.perf_counter()
    compiled = lib.compile(schema)
    m = lib.matchers(compiled)[0]
    bm = lib.bitmask()
    lib.fill(m, bm, 0)
    return ms(t0)


def walk(lib: Any, steps: int, batched: bool, seed: int) -> list[float]:
    """ms per decode step for the masks of ROWS rows; each row takes a random allowed id."""
    rng = random.Random(seed)
    rows = lib.matchers(lib.compile(SCHEMA))
    bm = lib.bitmask()
    eos = set(lib.eos)
    per_step = []
    for _ in range(steps):
        live = [i for i, m in enumerate(rows) if not lib.done(m)]
        if len(live) < ROWS:
            break
        t0 = time.perf_counter()
        if batched:
            lib.fill_all(rows, bm)
        else:
            for i, m in enumerate(rows):
                lib.fill(m, bm, i)
        per_step.append(ms(t0))
        for i, m in enumerate(rows):
            ids = [t for t in allowed_ids(bm[i], lib.vocab) if t not in eos]
            lib.accept(m, rng.choice(ids))
    return per_step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, help="a Hugging Face tokenizer folder")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    from transformers import AutoTokenizer

    from wallbreak.coe import defaults

    tok_dir = a.tokenizer
    if tok_dir is None:
        from wallbreak.coe.bundle.manifest import Bundle

        b = Bundle.open(defaults.default_bundle_dir())
        tok_dir = b.tokenizer_path("smollm2-135m-instruct")
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    eos = [int(hf.eos_token_id)]
    out: dict[str, Any] = {
        "tokenizer": str(Path(tok_dir).name),
        "vocab": len(hf),
        "schema_fields": len(SCHEMA["properties"]),
        "rows": ROWS,
        "torch_threads": torch.get_num_threads(),
    }
    for cls in (Llg, Xgr):
        lib = cls(hf, eos)
        lib.eos = eos
        firsts = [first_mask_ms(lib) for _ in range(a.repeats)]
        seq = [x for r in range(a.repeats) for x in walk(lib, a.steps, False, r)]
        par = [x for r in range(a.repeats) for x in walk(lib, a.steps, True, r)]
        out[lib.name] = {
            "tokenizer_setup_ms": round(lib.setup_ms, 1),
            "compile_and_first_mask_ms_median": round(statistics.median(firsts), 2),
            "compile_and_first_mask_ms_max": round(max(firsts), 2),
            "mask_ms_per_step_8_rows_one_by_one": round(statistics.mean(seq), 3),
            "mask_ms_per_step_8_rows_batched": round(statistics.mean(par), 3),
            "steps_timed": len(seq),
        }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
