"""lm-evaluation-harness as a referee of the completions endpoint: score the multiple-choice items it
scored through `wallbreak serve` (its --log_samples file) with transformers' own forward on the same
fp32 weights and the harness's own tokenization rule, and compare every log-likelihood and the
accuracy. Prints one JSON object.

    lm_eval --model local-completions --model_args base_url=.../v1/completions,model=E,\
        tokenizer_backend=huggingface,tokenizer=TOKDIR,tokenized_requests=True \
        --tasks T --include_path DIR --log_samples --output_path OUT
    python benchmarks/lmeval_referee.py --samples OUT/.../samples_T_*.jsonl --model SRC [--gguf FILE]

SRC is what the expert was imported from (a Hugging Face folder, or with --gguf the folder and file
of the GGUF), loaded as float32."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's rule for causal models: trailing spaces of the context move to the
    continuation; the whole is encoded and split at the context's length (no special tokens)."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx) :]


def loglikelihood(model: Any, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--gguf", default=None)
    p.add_argument("--tokenizer", type=Path, default=None, help="default: --model")
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": a.gguf} if a.gguf else {}
    model = AutoModelForCausalLM.from_pretrained(str(a.model), dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(str(a.tokenizer or a.model), **({} if a.tokenizer else kw))
    rows = [json.loads(line) for line in a.samples.read_text().splitlines() if line.strip()]
    worst, served_right, ours_right = 0.0, 0, 0
    for r in rows:
        served = [float(x[0][0]) for x in r["resps"]]
        mine = []
        for arg in r["arguments"].values():
            ctx, cont = encode_pair(tok, arg["arg_0"], arg["arg_1"])
            mine.append(loglikelihood(model, ctx, cont))
        worst = max(worst, *(abs(x - y) for x, y in zip(served, mine, strict=True)))
        gold = int(r["target"])
        served_right += int(max(range(len(served)), key=served.__getitem__) == gold)
        ours_right += int(max(range(len(mine)), key=mine.__getitem__) == gold)
    print(
        json.dumps(
            {
                "items": len(rows),
                "loglikelihoods": sum(len(r["resps"]) for r in rows),
                "acc_lm_eval_through_wallbreak": round(served_right / len(rows), 4),
                "acc_reported_by_lm_eval": round(sum(r["acc"] for r in rows) / len(rows), 4),
                "acc_transformers_forward": round(ours_right / len(rows), 4),
                "max_abs_loglikelihood_diff": worst,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
