"""Compiled slot execution: a switch re-points the weights and never recompiles; bench fuse's contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wallbreak.cli import main
from wallbreak.coe.bench.fuse import Slot, load_expert, slot_tensors
from wallbreak.coe.bundle import compact
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.bundle.writer import BundleWriter, ExpertSource
from wallbreak.coe.engine.compiled import graphs_built


def _next_tokens(slot: Slot, ids: torch.Tensor) -> torch.Tensor:
    from transformers import StaticCache

    config = slot.model.config
    cache = StaticCache(config=config, max_cache_len=slot.capacity)  # type: ignore[arg-type]
    with torch.inference_mode():
        out = slot.fn(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(4))
    return out.logits[:, -1]


@pytest.mark.parametrize(
    ("expert", "form"), [("llama", "fp32"), ("gemma", "fp32"), ("llama", "int8"), ("gemma", "int4")]
)
def test_a_switch_rebinds_weights_without_recompiling(
    arch_bundle_dir: Path, tmp_path: Path, expert: str, form: str
) -> None:
    """Two experts of one architecture: the compiled slot, switched to the second expert's weights,
    gives that expert's eager output, and Dynamo builds no new graph (int8/int4: compact buffers)."""
    torch._dynamo.reset()
    bundle = Bundle.open(arch_bundle_dir)
    model = load_expert(bundle, expert, form, torch.device("cpu"))
    other = load_expert(bundle, expert, "fp32", torch.device("cpu"))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # a different expert of the same layout
    if form in ("int8", "int4"):  # the perturbed expert in the same compact layout, as import writes it
        entry = bundle.expert(expert)
        tensors, quant = compact.compact_tensors(
            entry.model_type, entry.config, other.state_dict().items(), form
        )
        with BundleWriter(tmp_path / "other") as w:
            w.add(ExpertSource(expert, entry.model_type, entry.config, tensors), quant=quant)
        other = load_expert(Bundle.open(tmp_path / "other"), expert, form, torch.device("cpu"))
    slot = Slot(model, compiled=True, capacity=8)
    theirs = dict(slot_tensors(other))
    slot.weights[1] = [theirs[n].detach().clone() for n, _ in slot_tensors(model)]
    ids = torch.tensor([[1, 2, 3, 4]])
    first = _next_tokens(slot, ids)
    built = graphs_built()
    slot.switch(1)
    switched = _next_tokens(slot, ids)
    assert graphs_built() == built  # no recompilation
    with torch.inference_mode():
        want = other(input_ids=ids).logits[:, -1]
    tol = 1e-4 if form == "fp32" else 3e-2  # compact forms compute in bf16; Inductor fuses differently
    torch.testing.assert_close(switched, want, rtol=tol, atol=tol)
    assert not torch.allclose(first, switched, rtol=tol, atol=tol)
    slot.switch(0)
    torch.testing.assert_close(_next_tokens(slot, ids), first, rtol=1e-5, atol=1e-5)
    assert graphs_built() == built


def test_bench_fuse_json_contract(synth_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "fuse", "--bundle", str(synth_bundle_dir), "--dtypes", "fp32,bf16,int8,int4", "--modes",
            "eager", "--prompt-tokens", "8", "--decode-tokens", "4", "--switches", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["dtype"] for r in res["runs"]] == ["fp32", "bf16", "int8", "int4"]
    fp32, bf16, int8, int4 = res["runs"]
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
    assert int4["expert_bytes"] < int8["expert_bytes"] < fp32["expert_bytes"] / 3
    assert all(r["perplexity"] is not None for r in res["runs"])
    assert res["speedup_decode_b1"] is None  # no compiled run asked for


def test_bench_fuse_bad_arguments(synth_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["bench", "fuse", "--bundle", str(synth_bundle_dir)]
    assert main([*base, "--dtypes", "fp8"]) == 2
    assert "--dtypes: unknown 'fp8'; this bench runs fp32, bf16, int8, int4" in capsys.readouterr().err
    assert main([*base, "--experts", "nobody"]) == 2
    assert "nobody" in capsys.readouterr().err


def _greedy(slot: Slot, ids: torch.Tensor, new: int) -> list[int]:
    from transformers import StaticCache

    cache = StaticCache(config=slot.model.config, max_cache_len=slot.capacity)  # type: ignore[arg-type]
    n, out = ids.shape[1], []
    with torch.inference_mode():
        logits = slot.fn(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(n))
        for i in range(new):
            tok = logits.logits[:, -1:].argmax(-1)
            out.append(int(tok))
            pos = torch.tensor([n + i])
            logits = slot.fn(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos)
    return out


@pytest.mark.parametrize("form", ["fp32", "int4"])
def test_compiled_and_eager_give_the_same_greedy_tokens(arch_bundle_dir: Path, form: str) -> None:
    torch._dynamo.reset()
    model = load_expert(Bundle.open(arch_bundle_dir), "llama", form, torch.device("cpu"))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    eager = _greedy(Slot(model, compiled=False, capacity=24), ids, 12)
    assert _greedy(Slot(model, compiled=True, capacity=24), ids, 12) == eager


def test_a_failed_compile_falls_back_to_eager_with_one_line(
    synth_bundle_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("no C compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    argv = ["bench", "fuse", "--bundle", str(synth_bundle_dir), "--dtypes", "fp32", "--prompt-tokens", "8",
            "--decode-tokens", "2", "--switches", "1", "--repeats", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    eager, compiled = json.loads(out.out)["runs"]
    assert eager["decode_tps_b1"] > 0 and "error" not in eager
    assert compiled["error"] == "RuntimeError: no C compiler here"
    assert "compile failed (RuntimeError: no C compiler here); eager only" in out.err
