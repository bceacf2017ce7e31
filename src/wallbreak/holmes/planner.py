"""(topology, model, training) -> Plan: placement, layer partition and a predicted iteration time.

Ranks follow Megatron's order inside the GPU sequence the placement picks: tensor-parallel fastest,
then data-parallel, then pipeline stages outermost (rank = stage * dp * tp + d * tp + k). A stage is
then dp * tp consecutive GPUs.

- `holmes`: clusters are ordered (every order is tried for up to 5 clusters) so stages sit inside
  one cluster; every group then uses its members' NIC, and only pipeline traffic crosses clusters,
  over TCP. Layers are split so the slowest stage (compute plus exposed gradient sync) is as fast
  as memory allows, which gives slower-NIC stages fewer layers.
- `megatron`: stock Megatron-LM: GPUs in file order, an even split, and one NCCL transport for the
  whole job, set by process-wide environment. A job that spans clusters (no RDMA between them) or
  mixes NIC kinds must set NCCL_IB_DISABLE=1, because IB-to-RoCE and cross-cluster RDMA connections
  fail or hang; then every inter-node byte, inside clusters too, goes over TCP at the Ethernet rate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from wallbreak.errors import ConfigError
from wallbreak.holmes import cost
from wallbreak.holmes.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.topology import Cluster, Link, Topology

PLACEMENTS = ("holmes", "megatron")
BUCKET_BYTES = 40 * 2**20  # Megatron's default gradient bucket
MAX_ORDER_PERMUTATIONS = 5  # clusters; beyond this a few orders by NIC speed are tried


@dataclass(frozen=True)
class Slot:
    """One GPU in rank order."""

    cluster: str
    node: int  # global node index in rank order
    local: int


@dataclass
class StageCost:
    compute_mb: float  # forward + backward compute of one micro-batch
    tp_mb: float
    p2p_mb: float
    dp_sync: float  # full gradient all-reduce of the stage
    dp_exposed: float  # what is left after overlapping with the last backward
    memory_gib: float
    fits: bool


@dataclass
class Stage:
    index: int
    cluster: str
    layers: int
    ranks: list[int]
    dp_transport: str = ""
    p2p_transport: str = ""  # towards the next stage
    cost: StageCost | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "cluster": self.cluster, "layers": self.layers, "ranks": self.ranks}


@dataclass
class Prediction:
    iteration_s: float
    tflops_per_gpu: float
    samples_per_s: float
    breakdown: dict[str, float]
    fits: bool = True
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "iteration_s": self.iteration_s,
            "tflops_per_gpu": self.tflops_per_gpu,
            "samples_per_s": self.samples_per_s,
            "breakdown": self.breakdown,
        }
        if not self.fits:
            out.update(fits=False, reason=self.reason)
        return out


@dataclass
class Plan:
    placement: str
    network: str  # holmes | megatron | all_rdma | all_ethernet: how transports were chosen
    tp: int
    pp: int
    dp: int
    microbatches: int
    stages: list[Stage]
    slots: list[Slot]
    predicted: Prediction
    cluster_order: list[str]
    model: ModelSpec
    training: TrainingSpec
    transports: dict[str, list[str]] = field(default_factory=dict)  # group kind -> transport per group

    @property
    def world_size(self) -> int:
        return len(self.slots)

    def groups(self) -> dict[str, list[dict[str, Any]]]:
        s_size = self.tp * self.dp
        out: dict[str, list[dict[str, Any]]] = {"dp": [], "tp": [], "pp": []}
        for st in self.stages:
            base = st.index * s_size
            for k in range(self.tp):
                out["dp"].append(
                    {"ranks": [base + d * self.tp + k for d in range(self.dp)], "transport": st.dp_transport}
                )
            for d in range(self.dp):
                out["tp"].append(
                    {"ranks": [base + d * self.tp + k for k in range(self.tp)], "transport": self._intra(st)}
                )
        pp_transport = _slowest([st.p2p_transport for st in self.stages[:-1]]) if self.pp > 1 else "none"
        for d in range(self.dp):
            for k in range(self.tp):
                ranks = [s * s_size + d * self.tp + k for s in range(self.pp)]
                out["pp"].append({"ranks": ranks, "transport": pp_transport})
        return out

    def _intra(self, st: Stage) -> str:
        return "local" if self.tp == 1 else "intra-node"

    def to_json(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "tp": self.tp,
            "pp": self.pp,
            "dp": self.dp,
            "microbatches": self.microbatches,
            "stages": [s.to_json() for s in self.stages],
            "groups": self.groups(),
            "predicted": self.predicted.to_json(),
        }


TRANSPORT_ORDER = ("tcp", "roce", "infiniband", "intra-node", "local", "none")


def _slowest(kinds: Sequence[str]) -> str:
    return min(kinds, key=TRANSPORT_ORDER.index) if kinds else "none"


class Network:
    """Which link two clusters' nodes use under a given way of choosing transports."""

    def __init__(self, topo: Topology, mode: str) -> None:
        self.topo = topo
        self.mode = mode
        self.rdma_job = len(topo.clusters) == 1 and topo.clusters[0].nic.rdma
        nics = [c.nic for c in topo.clusters]
        rdma = [n for n in nics if n.rdma] or nics
        best = max(rdma, key=lambda n: n.total_gbps)
        self.best = Link("infiniband", best.gbps, min(n.latency_us for n in rdma), best.count)
        self._cache: dict[tuple[str, str], tuple[str, Link]] = {}

    def link(self, a: str, b: str) -> tuple[str, Link]:
        key = (a, b) if a <= b else (b, a)
        if key not in self._cache:
            self._cache[key] = self._link(a, b)
        return self._cache[key]

    def _link(self, a: str, b: str) -> tuple[str, Link]:
        if self.mode == "all_rdma":
            return "infiniband", self.best
        rdma = {"holmes": True, "megatron": self.rdma_job, "all_ethernet": False}[self.mode]
        ln = self.topo.between(a, b, rdma=rdma)
        if self.mode == "holmes" and ln.rdma:
            # Per-group choice: should a cluster's Ethernet outrun its RDMA NIC, use sockets there.
            tcp = self.topo.between(a, b, rdma=False)
            ln = tcp if tcp.total_gbps > ln.total_gbps else ln
        return (ln.kind if ln.rdma else "tcp"), ln


def layout(topo: Topology, order: Sequence[str]) -> list[Slot]:
    slots: list[Slot] = []
    node = 0
    for name in order:
        c = topo.cluster(name)
        for _ in range(c.nodes):
            slots.extend(Slot(name, node, k) for k in range(c.gpus_per_node))
            node += 1
    return slots


class _StageModel:
    """Everything about one stage that does not depend on its layer count, and f(layers)."""

    def __init__(
        self,
        idx: int,
        slots: list[Slot],
        tp: int,
        dp: int,
        pp: int,
        micro: int,
        m: ModelSpec,
        t: TrainingSpec,
        topo: Topology,
        net: Network,
        overlap: bool = True,
    ) -> None:
        self.overlap = (
            overlap  # gradient sync bucketed and overlapped with backward (Holmes); stock: after it
        )
        s_size = tp * dp
        base = idx * s_size
        mine = slots[base : base + s_size]
        self.idx, self.first, self.last = idx, idx == 0, idx == pp - 1
        self.m, self.t, self.tp, self.dp, self.micro = m, t, tp, dp, micro
        self.inflight = min(pp - idx, micro)
        names = list(dict.fromkeys(s.cluster for s in mine))
        self.cluster = "+".join(names)
        clusters = [topo.cluster(n) for n in names]
        self.rate = min(c.gpu.peak_tflops * (c.gpu.efficiency or t.efficiency) for c in clusters)
        self.mem_gib = min(c.gpu.memory_gib for c in clusters)
        intra = min((c.intra_node for c in clusters), key=lambda ln: ln.gbps)
        self.tp_layer = cost.tp_seconds_per_layer(m, t, tp, intra.gbps, intra.latency_us) if tp > 1 else 0.0
        # Data-parallel group of tensor rank 0; the others are the same shape on the same nodes.
        members = [mine[d * tp] for d in range(dp)]
        self.dp_transport, self.dp_gbps, self.dp_lat = self._group_link(members, clusters, intra, topo, net)
        # Point-to-point with the neighbours: every GPU of the stage sends its 1/tp share at once.
        act = cost.activation_bytes(m, t) / tp
        self.p2p_mb = 0.0
        self.p2p_transport = "none"
        for other, towards_next in ((base + s_size, True), (base - s_size, False)):
            if not 0 <= other < len(slots):
                continue
            a, b = slots[base], slots[other]
            if a.node == b.node:
                kind, gbps, lat = "intra-node", intra.gbps, intra.latency_us
            else:
                kind, ln = net.link(a.cluster, b.cluster)
                share = min(topo.cluster(a.cluster).gpus_per_node, s_size)
                gbps, lat = ln.total_gbps / share, ln.latency_us
            self.p2p_mb += cost.p2p_seconds(act, gbps, lat)
            if towards_next:
                self.p2p_transport = kind
        self.layer_flops = cost.layer_flops(m, t.micro_batch, t.recompute)
        self.head_flops = cost.head_flops(m, t.micro_batch, t.recompute) if self.last else 0.0
        self.bwd_share = cost.backward_share(t.recompute)

    @staticmethod
    def _group_link(
        members: list[Slot], clusters: list[Cluster], intra: Link, topo: Topology, net: Network
    ) -> tuple[str, float, float]:
        if len(members) <= 1:
            return "local", intra.gbps, 0.0
        nodes: dict[int, int] = {}
        for s in members:
            nodes[s.node] = nodes.get(s.node, 0) + 1
        if len(nodes) == 1:
            return "intra-node", intra.gbps, intra.latency_us
        names = sorted({s.cluster for s in members})
        pairs = [net.link(a, b) for a, b in itertools.combinations_with_replacement(names, 2)]
        kind, ln = min(pairs, key=lambda kl: kl[1].total_gbps)
        if len(names) > 1:
            kind = "tcp"
        # A ring crosses each node's NIC once in and once out per group; the node's GPUs split the NIC
        # between the groups that cross it, so a group gets total x (members on the node / GPUs on it).
        gpn = min(c.gpus_per_node for c in clusters)
        per_node = min(nodes.values())
        return kind, min(intra.gbps, ln.total_gbps * per_node / gpn), ln.latency_us

    def compute(self, layers: int) -> float:
        return cost.compute_seconds(layers * self.layer_flops + self.head_flops, self.rate, 1.0, self.tp)

    def costs(self, layers: int) -> StageCost:
        comp = self.compute(layers)
        tp_mb = layers * self.tp_layer
        grad_bytes = cost.stage_params(self.m, layers, self.first, self.last) / self.tp * self.t.act_bytes
        sync = cost.ring_allreduce_seconds(grad_bytes, self.dp, self.dp_gbps, self.dp_lat)
        bucket = cost.ring_allreduce_seconds(
            min(grad_bytes, BUCKET_BYTES), self.dp, self.dp_gbps, self.dp_lat
        )
        window = (comp + tp_mb) * self.bwd_share
        exposed = cost.exposed_sync_seconds(sync, window, bucket) if self.overlap else sync
        mem = (
            cost.memory_bytes(self.m, self.t, layers, self.tp, self.dp, self.inflight, self.first, self.last)[
                "total"
            ]
            / cost.GIB
        )
        return StageCost(comp, tp_mb, self.p2p_mb, sync, exposed, mem, mem <= self.mem_gib)

    def busy(self, layers: int) -> float:
        """What the partition balances: all micro-batches through this stage plus its exposed sync."""
        c = self.costs(layers)
        return self.micro * (c.compute_mb + c.tp_mb + c.p2p_mb) + c.dp_exposed


def predict(
    stages: list[_StageModel], layers: Sequence[int], m: ModelSpec, t: TrainingSpec, n_gpus: int
) -> tuple[Prediction, list[StageCost]]:
    costs = [s.costs(n) for s, n in zip(stages, layers, strict=True)]
    micro = stages[0].micro
    per_mb = [c.compute_mb + c.tp_mb + c.p2p_mb for c in costs]
    pipe = cost.pipeline_seconds(per_mb, micro)
    # Stage 0 finishes its last backward at `pipe`; stage i finished earlier by the backward passes
    # still to run on stages before it. Its gradient sync can run in that slack.
    ends, lead = [], 0.0
    for s, c in zip(stages, costs, strict=True):
        ends.append(pipe - lead)
        lead += (c.compute_mb + c.tp_mb) * s.bwd_share + c.p2p_mb / 2
    iteration = max(e + c.dp_exposed for e, c in zip(ends, costs, strict=True))
    k = max(range(len(per_mb)), key=per_mb.__getitem__)
    breakdown = {
        "compute_s": micro * costs[k].compute_mb,
        "tp_comm_s": micro * costs[k].tp_mb,
        "pp_p2p_s": micro * costs[k].p2p_mb,
        "bubble_s": pipe - micro * per_mb[k],
        "dp_sync_s": iteration - pipe,
    }
    flops = cost.iteration_flops(m, t.global_batch, t.recompute)
    bad = [i for i, c in enumerate(costs) if not c.fits]
    reason = ""
    if bad:
        i = bad[0]
        reason = (
            f"stage {i} ({layers[i]} layers) needs {costs[i].memory_gib:.1f} GiB per GPU, "
            f"more than the {stages[i].mem_gib:g} GiB it has"
        )
    pred = Prediction(
        iteration_s=iteration,
        tflops_per_gpu=flops / (iteration * n_gpus * 1e12),
        samples_per_s=t.global_batch / iteration,
        breakdown=breakdown,
        fits=not bad,
        reason=reason,
    )
    return pred, costs


def even_split(layers: int, pp: int) -> list[int]:
    return [layers // pp + (1 if i < layers % pp else 0) for i in range(pp)]


def balanced_split(stages: list[_StageModel], total: int) -> list[int] | None:
    """Minimise the largest busy(stage) under memory: binary search on that time, each stage taking
    the most layers that stay under it; then trim the surplus from the busiest stages."""
    p = len(stages)

    @cache
    def busy(i: int, n: int) -> float:
        return stages[i].busy(n)

    @cache
    def fits(i: int, n: int) -> bool:
        return stages[i].costs(n).fits

    cap = []
    for i in range(p):
        lo, hi = 0, total - (p - 1)
        while lo < hi:  # most layers that fit in memory (memory grows with layers)
            mid = (lo + hi + 1) // 2
            if fits(i, mid):
                lo = mid
            else:
                hi = mid - 1
        if lo < 1:
            return None
        cap.append(lo)
    if sum(cap) < total:
        return None

    def take(limit: float) -> list[int]:
        out = []
        for i in range(p):
            lo, hi = 1, cap[i]
            if busy(i, 1) > limit:
                out.append(0)
                continue
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if busy(i, mid) <= limit:
                    lo = mid
                else:
                    hi = mid - 1
            out.append(lo)
        return out

    lo_t = max(busy(i, 1) for i in range(p))
    hi_t = max(busy(i, cap[i]) for i in range(p))
    if sum(take(lo_t)) >= total and all(take(lo_t)):
        hi_t = lo_t
    for _ in range(60):
        if hi_t - lo_t <= 1e-9 * hi_t:
            break
        mid_t = (lo_t + hi_t) / 2
        got = take(mid_t)
        if all(got) and sum(got) >= total:
            hi_t = mid_t
        else:
            lo_t = mid_t
    split = take(hi_t)
    while sum(split) > total:
        i = max((j for j in range(p) if split[j] > 1), key=lambda j: busy(j, split[j]))
        split[i] -= 1
    return split


def refine(
    stages: list[_StageModel], split: list[int], m: ModelSpec, t: TrainingSpec, n_gpus: int, rounds: int = 64
) -> list[int]:
    """Move single layers off the stage on the critical path while the full prediction improves."""
    best, _ = predict(stages, split, m, t, n_gpus)
    for _ in range(rounds):
        costs = [s.costs(n) for s, n in zip(stages, split, strict=True)]
        per = [
            stages[i].micro * (c.compute_mb + c.tp_mb + c.p2p_mb) + c.dp_exposed for i, c in enumerate(costs)
        ]
        src = max(range(len(split)), key=per.__getitem__)
        if split[src] <= 1:
            break
        improved = None
        for dst in range(len(split)):
            if dst == src:
                continue
            trial = list(split)
            trial[src] -= 1
            trial[dst] += 1
            pred, _ = predict(stages, trial, m, t, n_gpus)
            if pred.fits and pred.iteration_s < best.iteration_s * (1 - 1e-9):
                best, improved = pred, trial
        if improved is None:
            break
        split = improved
    return split


def feasible_degrees(
    topo: Topology, m: ModelSpec, t: TrainingSpec, placement: str, force: dict[str, int | None]
) -> tuple[list[tuple[int, int, int]], list[str]]:
    """Every (tp, pp, dp) that satisfies the placement's constraints, and why others fail."""
    n = topo.gpus
    gpns = [c.gpus_per_node for c in topo.clusters]
    why: list[str] = []
    out = []
    for tp in range(1, math.gcd(*gpns) + 1):
        if math.gcd(*gpns) % tp or m.heads % tp:
            if force.get("tp") == tp:
                why.append(
                    f"tp={tp} must divide the heads ({m.heads}) "
                    f"and every cluster's gpus_per_node ({sorted(set(gpns))})"
                )
            continue
        for dp in range(1, n // tp + 1):
            s = tp * dp
            if n % s:
                continue
            pp = n // s
            combo = f"tp={tp} pp={pp} dp={dp}"
            if any(force.get(k) not in (None, v) for k, v in (("tp", tp), ("pp", pp), ("dp", dp))):
                continue
            if pp > m.layers:
                why.append(f"{combo}: more stages than layers ({m.layers})")
                continue
            if t.global_batch % (t.micro_batch * dp):
                why.append(f"{combo}: global batch {t.global_batch} is not a multiple of micro-batch x dp")
                continue
            if placement == "holmes":
                bad = [
                    c.name
                    for c in topo.clusters
                    if c.gpus % s or (s % c.gpus_per_node and c.gpus_per_node % s)
                ]
                if bad:
                    why.append(f"{combo}: a stage of {s} GPUs cannot sit inside cluster(s) {', '.join(bad)}")
                    continue
            out.append((tp, pp, dp))
    for k in ("tp", "pp", "dp"):
        v = force.get(k)
        if v is not None and v < 1:
            raise ConfigError(f"--{k} must be >= 1, got {v}")
    return out, why


def cluster_orders(topo: Topology) -> list[list[str]]:
    names = [c.name for c in topo.clusters]
    if len(names) <= MAX_ORDER_PERMUTATIONS:
        return [list(p) for p in itertools.permutations(names)]
    by_speed = sorted(topo.clusters, key=lambda c: -c.nic.total_gbps * (2 if c.nic.rdma else 1))
    fast_first = [c.name for c in by_speed]
    return [fast_first, fast_first[::-1], names]


def build(
    topo: Topology,
    m: ModelSpec,
    t: TrainingSpec,
    placement: str,
    tp: int,
    pp: int,
    dp: int,
    order: list[str],
    network: str,
    split: list[int] | None = None,
) -> Plan | None:
    slots = layout(topo, order)
    micro = t.global_batch // (t.micro_batch * dp)
    net = Network(topo, network)
    overlap = placement == "holmes"
    models = [_StageModel(i, slots, tp, dp, pp, micro, m, t, topo, net, overlap) for i in range(pp)]
    if split is None:
        if placement == "megatron":
            split = even_split(m.layers, pp)
        else:
            tried = [even_split(m.layers, pp)]
            balanced = balanced_split(models, m.layers)
            if balanced is not None:
                tried.append(refine(models, balanced, m, t, len(slots)))
            preds = [predict(models, sp, m, t, len(slots))[0] for sp in tried]
            ok = [(p.iteration_s, i) for i, p in enumerate(preds) if p.fits]
            if not ok:
                return None
            split = tried[min(ok)[1]]
    pred, costs = predict(models, split, m, t, len(slots))
    s_size = tp * dp
    stages = [
        Stage(
            i,
            models[i].cluster,
            split[i],
            list(range(i * s_size, (i + 1) * s_size)),
            models[i].dp_transport,
            models[i].p2p_transport,
            costs[i],
        )
        for i in range(pp)
    ]
    return Plan(placement, network, tp, pp, dp, micro, stages, slots, pred, order, m, t)


def plan(
    topo: Topology,
    model: ModelSpec,
    training: TrainingSpec,
    placement: str = "holmes",
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    network: str | None = None,
) -> Plan:
    """The best plan under `placement`; megatron keeps degrees that are given or found by holmes."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}; allowed: {', '.join(PLACEMENTS)}")
    force = {"tp": tp, "pp": pp, "dp": dp}
    if placement == "megatron":
        if None in force.values():
            ref = plan(topo, model, training, "holmes", tp, pp, dp)
            tp, pp, dp = ref.tp, ref.pp, ref.dp
        degrees, why = feasible_degrees(topo, model, training, "megatron", {"tp": tp, "pp": pp, "dp": dp})
        if not degrees:
            raise ConfigError("cannot place the job: " + "; ".join(why[:6]))
        tp, pp, dp = degrees[0]
        built = build(
            topo,
            model,
            training,
            "megatron",
            tp,
            pp,
            dp,
            [c.name for c in topo.clusters],
            network or "megatron",
        )
        assert built is not None  # an even split is always built; memory is reported in the prediction
        return built
    degrees, why = feasible_degrees(topo, model, training, "holmes", force)
    best: Plan | None = None
    memory_fail: list[str] = []
    for tp_, pp_, dp_ in degrees:
        for order in cluster_orders(topo):
            cand = build(topo, model, training, "holmes", tp_, pp_, dp_, order, network or "holmes")
            if cand is None or not cand.predicted.fits:
                memory_fail.append(f"tp={tp_} pp={pp_} dp={dp_}: no layer split fits in GPU memory")
                continue
            if best is None or cand.predicted.iteration_s < best.predicted.iteration_s:
                best = cand
    if best is None:
        reasons = why + sorted(set(memory_fail))
        raise ConfigError(
            f"no placement of {model.name} fits on {topo.gpus} GPUs: "
            + ("; ".join(reasons[:6]) if reasons else "no (tp, pp, dp) divides the GPUs")
            + ("; ..." if len(reasons) > 6 else "")
        )
    return best


def references(topo: Topology, model: ModelSpec, training: TrainingSpec, p: Plan) -> dict[str, Prediction]:
    """The same GPUs with every link as fast as the best RDMA NIC, and with Ethernet only."""
    out = {}
    for name in ("all_rdma", "all_ethernet"):
        try:
            out[name] = plan(topo, model, training, "holmes", p.tp, p.pp, p.dp, network=name).predicted
        except ConfigError:
            built = build(
                topo,
                model,
                training,
                "holmes",
                p.tp,
                p.pp,
                p.dp,
                p.cluster_order,
                name,
                [s.layers for s in p.stages],
            )
            assert built is not None
            out[name] = built.predicted
    return out
