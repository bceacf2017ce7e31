"""What the compiled prefill's arithmetic costs in quality: a compact expert's kernels against its
dense bf16 matmuls (`compact.dequantized_matmuls`, what the prefill package is traced with), both
against the float expert, teacher-forced over a text.

    python benchmarks/dense_quality.py --reference B32 --reference-expert NAME \\
        --bundle B --expert NAME [--text FILE] [--tokens 2048]

Runs eagerly (the package fuses the same operations; only their rounding order may differ). Prints
per run its perplexity on the text, the mean KL divergence from the float expert's next-token
distribution, and how often its top token is the float expert's; then how often kernels and dense
agree. One JSON object. Default text: this repository's ARCHITECTURE.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from wallbreak.coe.bundle import compact
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.tiers.device import load_standalone


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, type=Path, help="a bundle holding the float expert")
    p.add_argument("--reference-expert", required=True)
    p.add_argument("--bundle", required=True, type=Path, help="a bundle holding the compact expert")
    p.add_argument("--expert", required=True)
    p.add_argument("--text", type=Path, default=Path(__file__).resolve().parent.parent / "ARCHITECTURE.md")
    p.add_argument("--tokens", type=int, default=2048)
    a = p.parse_args()
    from transformers import AutoTokenizer

    torch.set_grad_enabled(False)
    ref_bundle, bundle = Bundle.open(a.reference), Bundle.open(a.bundle)
    tok = AutoTokenizer.from_pretrained(str(ref_bundle.tokenizer_path(a.reference_expert)))
    ids = torch.tensor([tok(a.text.read_text())["input_ids"][: a.tokens]])
    ref = load_standalone(ref_bundle, a.reference_expert)(input_ids=ids).logits[0].float().log_softmax(-1)
    model = load_standalone(bundle, a.expert)
    kernel = model(input_ids=ids).logits[0].float().log_softmax(-1)
    with compact.dequantized_matmuls():
        dense = model(input_ids=ids).logits[0].float().log_softmax(-1)
    target = ids[0, 1:, None]
    out: dict[str, object] = {"expert": a.expert, "tokens": int(ids.shape[1])}
    for name, lp in (("float", ref), ("kernels", kernel), ("dense", dense)):
        kl = F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).mean()
        out[name] = {
            "perplexity": round(float((-lp[:-1].gather(1, target).mean()).exp()), 3),
            "kl_from_float": round(float(kl), 5),
            "top1_as_float": round(float((lp.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
        }
    out["top1_kernels_as_dense"] = round(float((kernel.argmax(-1) == dense.argmax(-1)).float().mean()), 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
