"""The real packaged experts through our path (slow: dequantising each GGUF takes 30-80 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wallbreak.coe.bundle.importers import DEFAULT_EXPERTS, import_expert
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.tiers import TierConfig, TierManager


@pytest.fixture(scope="module")
def smol_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    smol = DEFAULT_EXPERTS[0]
    out = tmp_path_factory.mktemp("smol") / "b"
    import_expert(smol.locate(), smol.name, out, description=smol.description, examples=smol.examples)
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


@pytest.mark.slow
def test_gemma3_past_its_sliding_window_batched_matches_transformers(tmp_path: Path) -> None:
    """Gemma-3-270M (sliding window 512 in 15 of its 18 layers) on a prompt of ~700 tokens, joined
    mid-decode by two short requests: our batch must produce what transformers' generate does."""
    from wallbreak.coe.engine import Request, SamplingParams
    from wallbreak.coe.engine.runner import Batch
    from wallbreak.coe.tokenization import load_tokenizers

    gemma = DEFAULT_EXPERTS[1]
    out = tmp_path / "b"
    import_expert(gemma.locate(), gemma.name, out, description=gemma.description, examples=gemma.examples)
    bundle = Bundle.open(out)
    tok = load_tokenizers(bundle, [bundle.expert(gemma.name)])[gemma.name]
    assert tok.context == 32768  # the model's own context, not its window
    text = "the river runs past the old mill and the village wakes to the sound of water " * 40
    long = tok.encode_text(text)
    assert len(long) > 600
    short = [tok.encode_text("Once upon a time in a small village,"), tok.encode_text("def fibonacci(n):")]
    size = bundle.expert(gemma.name).total_bytes
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def req(i: int, ids: list[int]) -> Request:
        return Request(
            gemma.name, ids, SamplingParams(max_tokens=12, temperature=0), lambda ev: got[i].extend(ev.tokens)
        )

    with (
        TierManager(bundle, TierConfig(host_budget=size, device_budget=size)) as mgr,
        mgr.acquire(gemma.name) as lease,
    ):
        model = lease.model
        b = Batch(gemma.name, tok.eos_ids, tok.context, prefill_chunk=256)
        b.admit(model, [req(0, long)])
        for _ in range(3):
            b.step(model)
        b.admit(model, [req(1, short[0]), req(2, short[1])])
        while len(b):
            b.step(model)
        for i, ids in enumerate([long, *short]):
            ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[
                0, len(ids) :
            ].tolist()
            ends = [k for k, t in enumerate(ref) if t in tok.eos_ids]
            assert got[i] == (ref[: ends[0]] if ends else ref), i
