"""The real packaged SmolLM2 expert through our path (slow: dequantising GGUF takes ~30 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wallbreak.coe.bundle import Bundle
from wallbreak.coe.importers import DEFAULT_EXPERTS, import_expert
from wallbreak.coe.tiers import TierConfig, TierManager


@pytest.mark.slow
def test_smollm2_through_the_tiers_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smol = DEFAULT_EXPERTS[0]
    gguf = smol.locate()
    import_expert(gguf, smol.name, tmp_path / "b", smol.description, smol.examples)
    bundle = Bundle.open(tmp_path / "b")
    bundle.verify()
    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path(smol.name)))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    size = bundle.expert(smol.name).total_bytes
    with (
        TierManager(bundle, TierConfig(host_budget=size, device_budget=size)) as mgr,
        mgr.acquire(smol.name) as lease,
    ):
        with torch.no_grad():
            assert torch.equal(lease.model(ids).logits, ref(ids).logits)
        out = lease.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
