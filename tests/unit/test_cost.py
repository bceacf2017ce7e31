"""Cost formulas against arithmetic done by hand (the numbers in the comments)."""

from __future__ import annotations

import pytest

from wallbreak.errors import ConfigError
from wallbreak.holmes.plan import cost
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec

GPT75 = ModelSpec.preset("gpt-7.5b")


def test_flops_match_the_megatron_formula_where_the_shapes_agree() -> None:
    # A SwiGLU MLP of 8h/3 (h = 768: 2048) has a GPT layer's 12 h^2 weights, so Megatron's formula holds.
    b, s, n, h, v = 512, 2048, 36, 768, 51200
    m = ModelSpec.llama("g", n, h, 12, s, v, intermediate=2048)
    assert m.matmul_params == 12 * h * h
    paper = 72 * b * s * n * h * h * (1 + s / (6 * h) + v / (12 * n * h))
    assert cost.iteration_flops(m, b, "none") == pytest.approx(paper, rel=1e-12)
    assert cost.iteration_flops(m, b, "full") == pytest.approx(paper * 96 / 72, rel=1e-12)
    # GQA shrinks k and v: 8 heads of 64 with 2 key/value heads: q, o 512^2 each, k, v 512 x 128 each
    g = ModelSpec.llama("q", 2, 512, 8, 64, 1000, kv_heads=2, intermediate=1024)
    assert g.matmul_params == 2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 1024


def test_compute_time_splits_over_tensor_parallel_ranks() -> None:
    # 312 TFLOPS at 50%: 156e12 FLOP/s; 312e12 FLOPs over 2 GPUs -> 1 s
    assert cost.compute_seconds(312e12, 312, 0.5, tp=2) == pytest.approx(1.0)


def test_ring_all_reduce_and_p2p() -> None:
    # 1 GB over 4 ranks at 100 Gbit/s (12.5 GB/s): 2 * 3/4 * 1e9 / 12.5e9 = 0.12 s, plus 6 steps x 10 us
    assert cost.ring_allreduce_seconds(1e9, 4, 100, 0) == pytest.approx(0.12)
    assert cost.ring_allreduce_seconds(1e9, 4, 100, 10) == pytest.approx(0.12 + 6e-5)
    assert cost.ring_allreduce_seconds(1e9, 1, 100, 10) == 0.0
    # 1 MB at 8 Gbit/s (1 GB/s) = 1 ms, plus 5 us
    assert cost.p2p_seconds(1e6, 8, 5) == pytest.approx(1e-3 + 5e-6)


def test_tensor_parallel_traffic_per_layer() -> None:
    m = ModelSpec.llama("t", 2, 64, 4, seq_len=16, vocab=100)
    t = TrainingSpec(global_batch=4, micro_batch=2)
    act = 2 * 16 * 64 * 2  # micro-batch x seq x hidden x 2 bytes = 4096
    one = cost.ring_allreduce_seconds(act, 4, 800, 1)
    assert cost.tp_seconds_per_layer(m, t, 4, 800, 1) == pytest.approx(4 * one)
    t_rc = TrainingSpec(global_batch=4, micro_batch=2, recompute="full")
    assert cost.tp_seconds_per_layer(m, t_rc, 4, 800, 1) == pytest.approx(6 * one)
    assert cost.tp_seconds_per_layer(m, t, 1, 800, 1) == 0.0


def test_one_f_one_b_bubble() -> None:
    assert cost.pipeline_seconds([1.0, 1.0, 1.0, 1.0], 8) == pytest.approx(11.0)  # (m + p - 1) t
    assert cost.pipeline_seconds([1.0, 2.0, 1.0], 4) == pytest.approx(4 * 2 + 1 + 1)
    assert cost.pipeline_seconds([3.0], 5) == pytest.approx(15.0)
    # Interleaved, two chunks per stage: fill and drain in half-stage steps, (p - 1) t / 2
    assert cost.pipeline_seconds([1.0, 1.0, 1.0, 1.0], 8, 2) == pytest.approx(8 + 1.5)


def test_exposed_gradient_sync() -> None:
    assert cost.exposed_sync_seconds(1.0, 0.7, 0.1) == pytest.approx(0.3)
    assert cost.exposed_sync_seconds(1.0, 2.0, 0.1) == pytest.approx(0.1)  # the last bucket still shows
    assert cost.exposed_sync_seconds(0.05, 2.0, 0.1) == pytest.approx(0.05)


def test_memory_by_hand() -> None:
    m = ModelSpec.llama("t", 2, 64, 4, seq_len=16, vocab=100, kv_heads=2, intermediate=128)
    t = TrainingSpec(global_batch=4, micro_batch=1, reserve_gib=0)
    # q, o: 64 x 64; k, v: 64 x 32; gate, up, down: 64 x 128 -> 36864, plus two norms (128) = 36992
    # per layer; embedding 100 x 64 = 6400; final norm 64 + output layer 6400
    assert m.layer_params == 36992
    assert cost.stage_params(m, 2, first=True, last=True) == 2 * 36992 + 6400 + 6464 == 86848
    mem = cost.memory_bytes(m, t, 2, tp=1, dp=2, inflight=1, first=True, last=True)
    assert mem["weights"] == (4 + 2) * 86848  # fp32 weights and the bf16 copies autocast makes
    assert mem["grads"] == 4 * 86848
    assert mem["optimizer"] == 8 * 86848 / 2  # Adam's moments, sharded over dp=2
    # per layer, 2 bytes each: norm in/out 2*16*64, q,k,v (in and out) 16*(2*64 + 2*32), softmax and
    # its output 2*4*16*16 -> 2 * (2048 + 3072 + 2048); MLP: 2*16*64 + 4*16*128 -> 2 * (2048 + 8192);
    # fp32 logits 4 * 16 * 100
    per_layer = 4096 + 6144 + 4096 + 4096 + 16384
    assert mem["activations"] == pytest.approx(2 * per_layer + 6400)
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
    rc = cost.memory_bytes(
        m, TrainingSpec(4, 1, "full", reserve_gib=0), 2, tp=1, dp=2, inflight=3, first=False, last=False
    )
    # full recompute keeps each layer's input (2 * 16 * 64 bytes) per in-flight micro-batch,
    # plus one working layer
    assert rc["activations"] == pytest.approx(2 * 16 * 64 * 2 * 3 + per_layer)


def test_tied_embeddings_are_one_matrix_in_one_stage_and_two_copies_across_stages() -> None:
    m = ModelSpec.llama("t", 2, 64, 4, seq_len=16, vocab=100, intermediate=128, tied=True)
    assert m.params == 2 * m.layer_params + 6400 + 64
    assert cost.stage_params(m, 2, first=True, last=True) == m.params
    assert cost.stage_params(m, 1, first=False, last=True) == m.layer_params + 64 + 6400


def test_model_and_training_specs_refuse_bad_values() -> None:
    assert ModelSpec.preset("gpt-76.1b").layers == 60
    assert 7.0e9 < GPT75.params < 8.0e9
    with pytest.raises(ConfigError, match="presets"):
        ModelSpec.preset("gpt-5")
    with pytest.raises(ConfigError, match="divisible by --heads"):
        ModelSpec.llama("x", 2, 100, 3)
    with pytest.raises(ConfigError, match="multiple of kv heads"):
        ModelSpec.llama("x", 2, 96, 6, kv_heads=4)
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not one the runtime builds"):
        ModelSpec("x", {"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="multiple of --micro-batch"):
        TrainingSpec(global_batch=10, micro_batch=3)
    with pytest.raises(ConfigError, match="--recompute"):
        TrainingSpec(global_batch=8, recompute="some")
    with pytest.raises(ConfigError, match="--dtype"):
        TrainingSpec(global_batch=8, dtype="int8")
