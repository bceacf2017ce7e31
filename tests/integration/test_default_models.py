"""The real packaged SmolLM2 expert through our path (slow: dequantising GGUF takes ~30 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wallbreak.coe.bundle import Bundle
from wallbreak.coe.importers import DEFAULT_EXPERTS, import_expert
from wallbreak.coe.tiers import TierConfig, TierManager


@pytest.fixture(scope="module")
def smol_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    smol = DEFAULT_EXPERTS[0]
    out = tmp_path_factory.mktemp("smol") / "b"
    import_expert(smol.locate(), smol.name, out, smol.description, smol.examples)
    return out


@pytest.mark.slow
def test_smollm2_through_the_tiers_matches_transformers(smol_bundle: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smol = DEFAULT_EXPERTS[0]
    gguf = smol.locate()
    bundle = Bundle.open(smol_bundle)
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


@pytest.mark.slow
def test_the_server_answers_with_smollm2(smol_bundle: Path) -> None:
    openai = pytest.importorskip("openai")
    from helpers import ServerThread
    from wallbreak.coe.server.serve import ServeOptions

    with ServerThread(ServeOptions(bundle=smol_bundle)) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(
            model="coe",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20,
            temperature=0,
        )
    assert r.model == DEFAULT_EXPERTS[0].name
    assert "Paris" in (r.choices[0].message.content or "")
