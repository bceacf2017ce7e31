"""Stages from transformers' modules, and the cost model counted on them: parameters and FLOPs of
real modules (torch's FlopCounterMode) equal the planner's figures; a split model computes
transformers' own loss; `--model SRC` resolves folders and presets and refuses what it cannot use."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from wallbreak.errors import ConfigError
from wallbreak.holmes.plan import cost
from wallbreak.holmes.plan.source import resolve_model
from wallbreak.holmes.plan.spec import ModelSpec
from wallbreak.holmes.runtime.model import build_stage, hf_config, lm_loss
from wallbreak.holmes.runtime.optim import OptimSpec

SHAPE = {"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64, "vocab_size": 96}  # fmt: skip
CONFIGS = {
    "llama": {"model_type": "llama", **SHAPE},
    "llama-tied": {"model_type": "llama", **SHAPE, "tie_word_embeddings": True},
    "llama-biases": {"model_type": "llama", **SHAPE, "attention_bias": True, "mlp_bias": True},
    "qwen2": {"model_type": "qwen2", **SHAPE, "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", **SHAPE, "head_dim": 16, "tie_word_embeddings": False},
    "mistral": {"model_type": "mistral", **SHAPE},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(
        hf_config(ModelSpec(request.param, CONFIGS[request.param], 16))
    ).save_pretrained(out)
    return out


def test_split_stages_compute_transformers_loss_and_hold_the_planned_parameters(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    spec = resolve_model(str(folder), 16)
    assert spec.source["weights"] == str(folder.resolve())
    ref = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, spec.vocab, (2, 17), generator=torch.Generator().manual_seed(1))
    first = build_stage(spec, [0, 1], True, False)
    last = build_stage(spec, [2], False, True)
    with torch.no_grad():
        loss = lm_loss(last(first(ids[:, :-1])), ids[:, 1:])
        assert float(loss) == pytest.approx(float(ref(ids, labels=ids).loss), rel=1e-5)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(first) == cost.stage_params(spec, 2, first=True, last=False)
    assert count(last) == cost.stage_params(spec, 1, first=False, last=True)
    assert count(build_stage(spec, range(3), True, True)) == spec.params == count(ref)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_flops_of_real_modules_equal_the_cost_model(arch: str) -> None:
    spec = ModelSpec(arch, CONFIGS[arch], 16)
    layer = build_stage(spec, [0], False, False, attention="eager")  # plain matmuls FlopCounter sees
    head = build_stage(spec, [], False, True)
    for module, want in (
        (layer, cost.layer_flops(spec, 2, "none")),
        (head, cost.head_flops(spec, 2, "none")),
    ):
        x = torch.randn(2, 16, spec.hidden, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            module(x).sum().backward()
        assert fc.get_total_flops() == want


def test_model_sources_resolve_or_fail_clearly(tmp_path: Path) -> None:
    assert resolve_model("llama-tiny", 32).source == {"kind": "preset", "name": "llama-tiny"}
    with pytest.raises(ConfigError, match=r"not a preset .* a model folder with config\.json, or a \.gguf"):
        resolve_model(str(tmp_path / "nowhere"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    only_config = resolve_model(str(tmp_path / "cfg"))
    assert "weights" not in only_config.source  # seeded initialisation
    (tmp_path / "cfg" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="a pickle"):
        resolve_model(str(tmp_path / "cfg"))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="allowed: llama, mistral, qwen2, qwen3"):
        resolve_model(str(tmp_path / "gpt2"))
    with pytest.raises(ConfigError, match="--vocab applies to presets only"):
        resolve_model(str(tmp_path / "cfg"), vocab=100)


def test_learning_rate_warms_up_then_follows_a_cosine() -> None:
    o = OptimSpec(lr=1.0, min_lr=0.1, warmup_steps=2)
    lrs = [o.lr_at(k, 12) for k in range(12)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0
    assert lrs[7] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.9)))
    assert o.lr_at(50, 12) == pytest.approx(0.1)  # past the horizon: min_lr
    with pytest.raises(ConfigError, match=r"--min-lr 2\.0 is above --lr"):
        OptimSpec(lr=1.0, min_lr=2.0)
    with pytest.raises(ConfigError, match="--beta2 must be in"):
        OptimSpec(beta2=1.0)
