"""The cost model: pure functions of shapes, rates and links, each checked against hand arithmetic.

Units: seconds, bytes, FLOPs; links in Gbit/s and microseconds as the cluster file gives them.
Sources for the formulas: Narayanan et al. (Megatron-LM, SC'21) for FLOPs per iteration
(72 B s l h^2 (1 + s/6h + V/12lh), 96 with full recompute) and the 1F1B schedule; Korthikanti et al.
(2022) for activation memory; the ring all-reduce's 2(n-1)/n volume per rank.
"""

from __future__ import annotations

from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec

GIB = 1024**3


def bytes_per_s(gbps: float) -> float:
    return gbps * 1e9 / 8


def _flop_factor(recompute: str) -> int:
    # Forward = 1 unit, backward = 2 units; full recompute runs the forward again: 4 units, not 3.
    return 96 if recompute == "full" else 72


def layer_flops(m: ModelSpec, micro_batch: int, recompute: str) -> float:
    """Forward + backward FLOPs of one transformer layer for one micro-batch."""
    s, h = m.seq_len, m.hidden
    return _flop_factor(recompute) * micro_batch * s * h * h * (1 + s / (6 * h))


def head_flops(m: ModelSpec, micro_batch: int, recompute: str) -> float:
    """Forward + backward FLOPs of the logits layer (h x V) for one micro-batch, on the last stage."""
    return _flop_factor(recompute) * micro_batch * m.seq_len * m.hidden * m.vocab / 12


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
    """Parameters a stage holds: its layers, word+position embeddings on the first stage, and the
    output layer's copy of the word embeddings on the last (Megatron keeps both, tied by an all-reduce)."""
    p = layers * m.layer_params
    if first:
        p += m.embedding_params
    if last and not first:
        p += m.vocab * m.hidden
    return p


def memory_bytes(
    m: ModelSpec, t: TrainingSpec, layers: int, *, tp: int, dp: int, inflight: int, first: bool, last: bool
) -> dict[str, float]:
    """Per-GPU memory of a stage: weights, gradients, optimizer state, activations, reserve."""
    p = stage_params(m, layers, first, last) / tp
    mixed = t.dtype != "fp32"
    weights = p * t.act_bytes
    grads = p * 4  # fp32 main gradients (accumulated across micro-batches)
    opt = p * (12 if mixed else 8)  # fp32 master copy (mixed precision) + Adam's two moments
    if t.distributed_optimizer:
        opt /= dp
    s, b, h, a = m.seq_len, t.micro_batch, m.hidden, m.heads
    per_layer: float
    if t.recompute == "full":
        # Only each layer's input is kept; one layer's full activations live during its recompute.
        per_layer = 2 * s * b * h
        working = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
    else:
        per_layer = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
        working = 0.0
    acts = per_layer * layers * inflight + working
    if last:
        acts += 4 * b * s * m.vocab / tp  # fp32 logits for the loss
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


def pipeline_seconds(per_microbatch: list[float], microbatches: int) -> float:
    """1F1B over stages with per-micro-batch times t_i: the slowest stage runs all m micro-batches,
    and the others add one pass each while the pipeline fills and drains.
    With equal stages this is (m + p - 1) t, the textbook bubble of (p - 1) t."""
    slowest = max(per_microbatch)
    return microbatches * slowest + sum(per_microbatch) - slowest


def backward_share(recompute: str) -> float:
    """Share of a micro-batch's compute spent in backward (2 of 3 units; 3 of 4 with recompute)."""
    return 0.75 if recompute == "full" else 2 / 3
