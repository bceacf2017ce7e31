"""The cost model: pure functions of shapes, rates and links, each checked against hand arithmetic.

Units: seconds, bytes, FLOPs; links in Gbit/s and microseconds as the cluster file gives them.
Sources for the formulas: Narayanan et al. (Megatron-LM, SC'21) for FLOPs per iteration (two per
weight per token and pass, three passes, four with full recompute) and the 1F1B schedule;
Korthikanti et al. (2022) for activation memory; the ring all-reduce's 2(n-1)/n volume per rank.
The shapes come from the model's Hugging Face config (`ModelSpec`), and a test counts the same
FLOPs and parameters on transformers' own modules.
"""

from __future__ import annotations

from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec

GIB = 1024**3


def bytes_per_s(gbps: float) -> float:
    return gbps * 1e9 / 8


def _passes(recompute: str) -> int:
    # Forward = 1 unit, backward = 2 units; full recompute runs the forward again: 4 units, not 3.
    return 4 if recompute == "full" else 3


def layer_flops(m: ModelSpec, micro_batch: int, recompute: str) -> float:
    """Forward + backward FLOPs of one decoder layer for one micro-batch: two per weight of its
    matrix multiplies per token, and 4 s (heads x head_dim) per token for the attention scores and
    their weighted sum. For a GPT layer (12h^2 weights) this is Megatron's 72 B s h^2 (1 + s/6h)."""
    s = m.seq_len
    return _passes(recompute) * micro_batch * s * (2 * m.matmul_params + 4 * s * m.q_dim)


def head_flops(m: ModelSpec, micro_batch: int, recompute: str) -> float:
    """Forward + backward FLOPs of the logits layer (h x V) for one micro-batch, on the last stage."""
    return _passes(recompute) * micro_batch * m.seq_len * 2 * m.hidden * m.vocab


def iteration_flops(m: ModelSpec, global_batch: int, recompute: str) -> float:
    """Model FLOPs of one iteration: the figure behind 'TFLOPS per GPU' in Megatron and Holmes."""
    return m.layers * layer_flops(m, global_batch, recompute) + head_flops(m, global_batch, recompute)


def compute_seconds(flops: float, peak_tflops: float, efficiency: float, tp: int = 1) -> float:
    """FLOPs split evenly over `tp` GPUs, each at peak x efficiency."""
    return flops / (tp * peak_tflops * 1e12 * efficiency)


def ring_allreduce_seconds(nbytes: float, n: int, gbps: float, latency_us: float) -> float:
    """Ring all-reduce: each rank sends and receives 2(n-1)/n of the buffer, in 2(n-1) steps."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bytes_per_s(gbps) + 2 * (n - 1) * latency_us * 1e-6


def p2p_seconds(nbytes: float, gbps: float, latency_us: float) -> float:
    return latency_us * 1e-6 + nbytes / bytes_per_s(gbps)


def activation_bytes(m: ModelSpec, t: TrainingSpec) -> float:
    """One micro-batch's activation tensor at a layer boundary (what pipeline stages exchange)."""
    return t.micro_batch * m.seq_len * m.hidden * t.act_bytes


def tp_seconds_per_layer(m: ModelSpec, t: TrainingSpec, tp: int, gbps: float, latency_us: float) -> float:
    """Megatron tensor parallelism: two all-reduces of the activations forward, two backward
    (two more when the forward is recomputed), none overlapped with compute."""
    n = 6 if t.recompute == "full" else 4
    return n * ring_allreduce_seconds(activation_bytes(m, t), tp, gbps, latency_us)


def stage_params(m: ModelSpec, layers: int, first: bool, last: bool) -> int:
    """Parameters a stage holds: its layers, the embedding on the first stage, the final norm and
    output layer on the last. With tied embeddings the last stage of a pipeline holds its own copy of
    the embedding as its output layer (Megatron's embedding group keeps the two equal)."""
    p = layers * m.layer_params
    if first:
        p += m.embedding_params
    if last:
        p += m.head_params
        if m.tied and not first:
            p += m.vocab * m.hidden
    return p


def layer_activation_bytes(m: ModelSpec, t: TrainingSpec, tp: int) -> float:
    """What one layer keeps for backward per micro-batch (Korthikanti et al.'s count, for a SwiGLU
    MLP and grouped-query attention): the two norm inputs and outputs, q/k/v, softmax and its
    output, the attention output, SwiGLU's gate, up, activation and product."""
    s, b, h, a, w = m.seq_len, t.micro_batch, m.hidden, m.heads, t.act_bytes
    attn = 2 * w * s * b * h + w * s * b * (2 * m.q_dim + 2 * m.kv_dim) / tp + 2 * w * a * s * s * b / tp
    mlp = 2 * w * s * b * h + 4 * w * s * b * m.intermediate / tp
    return attn + mlp


def memory_bytes(
    m: ModelSpec, t: TrainingSpec, layers: int, *, tp: int, dp: int, inflight: int, first: bool, last: bool
) -> dict[str, float]:
    """Per-GPU memory of a stage: weights, gradients, optimizer state, activations, reserve."""
    p = stage_params(m, layers, first, last) / tp
    mixed = t.dtype != "fp32"
    weights = p * 4  # fp32 weights (the master copy, under bf16 autocast)
    grads = p * 4  # fp32 main gradients (accumulated across micro-batches)
    opt = p * 8  # Adam's two moments in fp32
    if mixed:
        weights += p * t.act_bytes  # the low-precision copies autocast makes, at most one per weight
    if t.distributed_optimizer:
        opt /= dp
    per_layer = layer_activation_bytes(m, t, tp)
    if t.recompute == "full":
        # Only each layer's input is kept; one layer's full activations live during its recompute.
        acts = activation_bytes(m, t) * layers * inflight + per_layer
    else:
        acts = per_layer * layers * inflight
    if last:
        acts += 4 * t.micro_batch * m.seq_len * m.vocab  # fp32 logits for the loss
    out = {
        "weights": weights,
        "grads": grads,
        "optimizer": opt,
        "activations": acts,
        "reserve": t.reserve_gib * GIB,
    }
    out["total"] = sum(out.values())
    return out


def exposed_sync_seconds(sync_s: float, overlap_window_s: float, bucket_s: float) -> float:
    """Bucketed gradient sync overlapped with the last micro-batch's backward: what sticks out past
    it, and never less than the last bucket, which can only start when backward ends."""
    return max(sync_s - overlap_window_s, min(sync_s, bucket_s))


def pipeline_seconds(per_microbatch: list[float], microbatches: int, virtual: int = 1) -> float:
    """1F1B over stages with per-micro-batch times t_i: the slowest stage runs all m micro-batches,
    and the others add one pass each while the pipeline fills and drains.
    With equal stages this is (m + p - 1) t, the textbook bubble of (p - 1) t. Interleaved 1F1B
    with v model chunks per stage fills and drains in chunks of t_i / v: the bubble is (p - 1) t / v
    (Narayanan et al., SC'21)."""
    slowest = max(per_microbatch)
    return microbatches * slowest + (sum(per_microbatch) - slowest) / virtual


def backward_share(recompute: str) -> float:
    """Share of a micro-batch's compute spent in backward (2 of 3 units; 3 of 4 with recompute)."""
    return 0.75 if recompute == "full" else 2 / 3
