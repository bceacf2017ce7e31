"""Compiled slot execution: a switch re-points the weights and never recompiles; bench fuse's contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wallbreak.cli import main
from wallbreak.coe.bench_fuse import Slot, graphs_built, load_expert
from wallbreak.coe.bundle import Bundle


def _next_tokens(slot: Slot, ids: torch.Tensor) -> torch.Tensor:
    from transformers import StaticCache

    config = slot.model.config
    cache = StaticCache(config=config, max_cache_len=slot.capacity)  # type: ignore[arg-type]
    with torch.inference_mode():
        out = slot.fn(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(4))
    return out.logits[:, -1]


@pytest.mark.parametrize(("expert", "form"), [("llama", "fp32"), ("gemma", "fp32"), ("llama", "int8")])
def test_a_switch_rebinds_weights_without_recompiling(arch_bundle_dir: Path, expert: str, form: str) -> None:
    """Two experts of one architecture: the compiled slot, switched to the second expert's weights,
    gives that expert's eager output, and Dynamo builds no new graph (int8: torchao's tensors)."""
    torch._dynamo.reset()
    bundle = Bundle.open(arch_bundle_dir)
    model = load_expert(bundle, expert, form, torch.device("cpu"))
    other = load_expert(bundle, expert, "fp32", torch.device("cpu"))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # a different expert of the same layout
    if form == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(other, Int8WeightOnlyConfig())
    slot = Slot(model, compiled=True, capacity=8)
    slot.weights[1] = [p.data for p in other.parameters()]
    ids = torch.tensor([[1, 2, 3, 4]])
    first = _next_tokens(slot, ids)
    built = graphs_built()
    slot.switch(1)
    switched = _next_tokens(slot, ids)
    assert graphs_built() == built  # no recompilation
    with torch.inference_mode():
        want = other(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(switched, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(first, switched)
    slot.switch(0)
    torch.testing.assert_close(_next_tokens(slot, ids), first, rtol=1e-5, atol=1e-5)
    assert graphs_built() == built


def test_bench_fuse_json_contract(synth_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "fuse", "--bundle", str(synth_bundle_dir), "--dtypes", "fp32,bf16", "--modes", "eager",
            "--prompt-tokens", "8", "--decode-tokens", "4", "--switches", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert [(r["mode"], r["dtype"]) for r in res["runs"]] == [("eager", "fp32"), ("eager", "bf16")]
    fp32, bf16 = res["runs"]
    for r in res["runs"]:
        assert {
            "decode_tps_b1",
            "decode_tps_b8",
            "prefill_tps_b1",
            "ttft_after_switch_s",
            "expert_bytes",
        } <= set(r)
        assert r["recompiles_after_switch"] == 0
    assert bf16["expert_bytes"] * 2 == fp32["expert_bytes"]  # the slot holds the compact bytes
    assert res["speedup_decode_b1"] is None  # no compiled run asked for


def test_bench_fuse_bad_arguments(synth_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["bench", "fuse", "--bundle", str(synth_bundle_dir)]
    assert main([*base, "--dtypes", "fp8"]) == 2
    assert "--dtypes: unknown 'fp8'; this bench runs fp32, bf16, int8" in capsys.readouterr().err
    assert main([*base, "--experts", "nobody"]) == 2
    assert "nobody" in capsys.readouterr().err
