"""(topology, model, training) -> Plan: placement, layer partition and a predicted iteration time.

Ranks follow Megatron's order (owned by `layout.ParallelLayout`) inside the GPU sequence the
placement picks, so a stage is dp * tp consecutive GPUs.

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
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.layout import ParallelLayout
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.stages import (
    Network,
    Prediction,
    Slot,
    StageCost,
    StageModel,
    layout,
    predict,
    slowest,
)
from wallbreak.holmes.plan.topology import Topology

PLACEMENTS = ("holmes", "megatron")
MAX_ORDER_PERMUTATIONS = 5  # clusters; beyond this a few orders by NIC speed are tried


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

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(self.tp, self.dp, self.pp)

    def groups(self) -> dict[str, list[dict[str, Any]]]:
        lay = self.layout
        out: dict[str, list[dict[str, Any]]] = {"dp": [], "tp": [], "pp": []}
        for ranks in lay.groups("dp"):
            out["dp"].append({"ranks": ranks, "transport": self.stages[lay.stage_of(ranks[0])].dp_transport})
        for ranks in lay.groups("tp"):
            out["tp"].append({"ranks": ranks, "transport": self._intra(self.stages[lay.stage_of(ranks[0])])})
        pp_transport = slowest([st.p2p_transport for st in self.stages[:-1]]) if self.pp > 1 else "none"
        out["pp"] = [{"ranks": ranks, "transport": pp_transport} for ranks in lay.groups("pp")]
        return out

    def _intra(self, st: Stage) -> str:
        return "local" if self.tp == 1 else "intra-node"

    def to_json(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            **self.layout.to_json(),
            "microbatches": self.microbatches,
            "stages": [s.to_json() for s in self.stages],
            "groups": self.groups(),
            "predicted": self.predicted.to_json(),
        }


def even_split(layers: int, pp: int) -> list[int]:
    return [layers // pp + (1 if i < layers % pp else 0) for i in range(pp)]


def balanced_split(stages: list[StageModel], total: int) -> list[int] | None:
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
    stages: list[StageModel], split: list[int], m: ModelSpec, t: TrainingSpec, n_gpus: int, rounds: int = 64
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
    for k in ("tp", "pp", "dp"):
        v = force.get(k)
        if v is not None and v < 1:
            raise ConfigError(f"--{k} must be >= 1, got {v}")
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
    *,
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
    lay = ParallelLayout(tp, dp, pp)
    models = [StageModel(i, slots, lay, micro, m, t, topo, net, overlap) for i in range(pp)]
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
    stages = [
        Stage(
            i,
            models[i].cluster,
            split[i],
            lay.stage_ranks(i),
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
    *,
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
            ref = plan(topo, model, training, tp=tp, pp=pp, dp=dp)
            tp, pp, dp = ref.tp, ref.pp, ref.dp
        degrees, why = feasible_degrees(topo, model, training, "megatron", {"tp": tp, "pp": pp, "dp": dp})
        if not degrees:
            raise ConfigError("cannot place the job: " + "; ".join(why[:6]))
        tp, pp, dp = degrees[0]
        order = [c.name for c in topo.clusters]
        built = build(
            topo, model, training, placement="megatron", tp=tp, pp=pp, dp=dp, order=order,
            network=network or "megatron",
        )  # fmt: skip
        assert built is not None  # an even split is always built; memory is reported in the prediction
        return built
    degrees, why = feasible_degrees(topo, model, training, "holmes", force)
    best: Plan | None = None
    memory_fail: list[str] = []
    for tp_, pp_, dp_ in degrees:
        for order in cluster_orders(topo):
            cand = build(topo, model, training, placement="holmes", tp=tp_, pp=pp_, dp=dp_, order=order,
                         network=network or "holmes")  # fmt: skip
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
            out[name] = plan(topo, model, training, tp=p.tp, pp=p.pp, dp=p.dp, network=name).predicted
        except ConfigError:
            built = build(
                topo, model, training, placement="holmes", tp=p.tp, pp=p.pp, dp=p.dp, order=p.cluster_order,
                network=name, split=[s.layers for s in p.stages],
            )  # fmt: skip
            assert built is not None
            out[name] = built.predicted
    return out
