"""What one pipeline stage costs, given where its GPUs sit, and how stages add up to an iteration.

A stage's geometry (its clusters, the links its data-parallel group and its pipeline neighbours
use) is fixed once the ranks are laid out; only its layer count varies while partitioning, so
`StageModel.costs(layers)` is cheap and pure.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from wallbreak.holmes.plan import cost
from wallbreak.holmes.plan.layout import ParallelLayout
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import Cluster, Link, Topology

BUCKET_BYTES = 40 * 2**20  # Megatron's default gradient bucket


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
class Prediction:
    iteration_s: float
    tflops_per_gpu: float
    samples_per_s: float
    breakdown: dict[str, float]
    fits: bool = True
    reason: str = ""
    stage_end_s: list[float] = field(default_factory=list)  # when each stage's last backward ends
    schedule: str = "1f1b"  # the pipeline schedule this prediction is for

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "iteration_s": self.iteration_s,
            "tflops_per_gpu": self.tflops_per_gpu,
            "samples_per_s": self.samples_per_s,
            "breakdown": self.breakdown,
            "schedule": self.schedule,
        }
        if not self.fits:
            out.update(fits=False, reason=self.reason)
        return out


TRANSPORT_ORDER = ("tcp", "roce", "infiniband", "intra-node", "local", "none")


def slowest(kinds: Sequence[str]) -> str:
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


class StageModel:
    """Everything about one stage that does not depend on its layer count, and f(layers)."""

    def __init__(
        self,
        idx: int,
        slots: list[Slot],
        lay: ParallelLayout,
        micro: int,
        m: ModelSpec,
        t: TrainingSpec,
        topo: Topology,
        net: Network,
        overlap: bool = True,
    ) -> None:
        self._memo: dict[int, StageCost] = {}
        self.overlap = (
            overlap  # gradient sync bucketed and overlapped with backward (Holmes); stock: after it
        )
        tp, dp, pp = lay.tp, lay.dp, lay.pp
        self.size, self.shared = lay.stage_size, topo.shared_compute
        mine = [slots[r] for r in lay.stage_ranks(idx)]
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
        members = [slots[r] for r in lay.group("dp", lay.rank(idx, 0, 0))]
        self.dp_transport, self.dp_gbps, self.dp_lat = self._group_link(members, clusters, intra, topo, net)
        # Point-to-point with the neighbours: every GPU of the stage sends its 1/tp share at once.
        act = cost.activation_bytes(m, t) / tp
        self.p2p_mb = 0.0
        self.wrap_mb = 0.0  # interleaved only: the last stage's chunks feed the first stage's next ones
        self.tied_sync = 0.0  # first and last stage of a pipeline whose model ties its embeddings
        self.p2p_transport = "none"
        wrap = {0: pp - 1, pp - 1: 0}.get(idx) if pp > 1 else None
        for other, towards in ((idx + 1, "next"), (idx - 1, "prev"), (wrap, "wrap")):
            if other is None or not 0 <= other < pp:
                continue
            a, b = slots[lay.rank(idx, 0, 0)], slots[lay.rank(other, 0, 0)]
            if a.node == b.node:
                kind, gbps, lat = "intra-node", intra.gbps, intra.latency_us
            else:
                kind, ln = net.link(a.cluster, b.cluster)
                share = min(topo.cluster(a.cluster).gpus_per_node, lay.stage_size)
                gbps, lat = ln.total_gbps / share, ln.latency_us
            if towards == "wrap":
                self.wrap_mb = cost.p2p_seconds(act, gbps, lat)
                # Tied embeddings: the first and last stage sum their copies' gradients over this
                # link after the last backward (each of the stage's GPUs syncs its own replica).
                if m.tied:
                    self.tied_sync = cost.ring_allreduce_seconds(m.vocab * m.hidden * 4, 2, gbps, lat)
                continue
            self.p2p_mb += cost.p2p_seconds(act, gbps, lat)
            if towards == "next":
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
        """Memoised: partitioning asks for the same layer counts over and over."""
        got = self._memo.get(layers)
        if got is None:
            got = self._memo[layers] = self._costs(layers)
        return got

    def _costs(self, layers: int) -> StageCost:
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
            cost.memory_bytes(
                self.m,
                self.t,
                layers,
                tp=self.tp,
                dp=self.dp,
                inflight=self.inflight,
                first=self.first,
                last=self.last,
            )["total"]
            / cost.GIB
        )
        return StageCost(comp, tp_mb, self.p2p_mb, sync, exposed, mem, mem <= self.mem_gib)

    def busy(self, layers: int) -> float:
        """What the partition balances: all micro-batches through this stage plus its exposed sync."""
        c = self.costs(layers)
        return self.micro * (c.compute_mb + c.tp_mb + c.p2p_mb) + c.dp_exposed


def schedules(stages: list[StageModel], layers: Sequence[int], t: TrainingSpec) -> list[str]:
    """The schedules a prediction considers: the one asked for, or (auto) 1F1B and, where every
    stage can hold `virtual_stages` chunks and the micro-batches divide into rounds, interleaved."""
    if t.schedule != "auto":
        return [t.schedule]
    pp, micro, v = len(stages), stages[0].micro, t.virtual_stages
    fits = pp > 1 and min(layers) >= v and micro % max(1, micro // pp) == 0
    return ["1f1b", "interleaved"] if fits else ["1f1b"]


def predict(
    stages: list[StageModel], layers: Sequence[int], m: ModelSpec, t: TrainingSpec, n_gpus: int
) -> tuple[Prediction, list[StageCost]]:
    """The prediction of the fastest schedule `schedules` allows."""
    preds = [_predict(stages, layers, m, t, n_gpus, s) for s in schedules(stages, layers, t)]
    return min(preds, key=lambda pc: pc[0].iteration_s)


def _predict(
    stages: list[StageModel], layers: Sequence[int], m: ModelSpec, t: TrainingSpec, n_gpus: int, schedule: str
) -> tuple[Prediction, list[StageCost]]:
    costs = [s.costs(n) for s, n in zip(stages, layers, strict=True)]
    micro = stages[0].micro
    v = t.virtual_stages if schedule == "interleaved" else 1
    # Interleaved: every chunk boundary is a message, and the last stage feeds the first v - 1 times.
    per_mb = [c.compute_mb + c.tp_mb + v * c.p2p_mb + (v - 1) * s.wrap_mb
              for s, c in zip(stages, costs, strict=True)]  # fmt: skip
    pipe = cost.pipeline_seconds(per_mb, micro, v)
    # Stage 0 finishes its last backward at `pipe`; stage i finished earlier by the backward passes
    # still to run on stages before it. Its gradient sync can run in that slack.
    ends, lead = [], 0.0
    for s, c in zip(stages, costs, strict=True):
        ends.append(pipe - lead)
        lead += (c.compute_mb + c.tp_mb) * s.bwd_share + c.p2p_mb / 2
    iteration = max(e + c.dp_exposed for e, c in zip(ends, costs, strict=True))
    embedding = max(s.tied_sync for s in stages)  # not overlapped: it follows the last backward
    iteration += embedding
    shared = stages[0].shared
    wait = 0.0
    if shared and shared < n_gpus:
        # GPUs on shared compute units cannot all compute at once: the iteration lasts at least
        # all their compute (GPU-seconds) spread over the units.
        work = sum(s.size * micro * c.compute_mb for s, c in zip(stages, costs, strict=True))
        wait = max(0.0, work / shared - iteration)
        iteration += wait
    k = max(range(len(per_mb)), key=per_mb.__getitem__)
    breakdown = {
        "compute_s": micro * costs[k].compute_mb,
        "tp_comm_s": micro * costs[k].tp_mb,
        "pp_p2p_s": micro * (per_mb[k] - costs[k].compute_mb - costs[k].tp_mb),
        "bubble_s": pipe - micro * per_mb[k],
        "dp_sync_s": iteration - wait - pipe - embedding,
    }
    if embedding:
        breakdown["embedding_sync_s"] = embedding
    if wait:
        breakdown["shared_compute_s"] = wait
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
        stage_end_s=ends,
        schedule=schedule,
    )
    return pred, costs
