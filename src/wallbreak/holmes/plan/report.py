"""A plan beside its megatron baseline and the all-RDMA / all-Ethernet references: JSON, table, plot."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wallbreak.common.plots import save_figure
from wallbreak.holmes.plan.plan_file import model_json
from wallbreak.holmes.plan.planner import Plan, Prediction, plan, references
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import Topology


@dataclass
class PlanReport:
    topology: Topology
    plan: Plan
    baseline: Plan
    references: dict[str, Prediction]

    @property
    def speedup(self) -> float:
        return self.baseline.predicted.iteration_s / self.plan.predicted.iteration_s

    def to_json(self) -> dict[str, Any]:
        out = self.plan.to_json()
        out.update(
            {
                "baseline": {"placement": "megatron", "predicted": self.baseline.predicted.to_json()},
                "references": {k: v.to_json() for k, v in self.references.items()},
                "speedup_vs_baseline": self.speedup,
                "cluster_order": self.plan.cluster_order,
                "world_size": self.plan.world_size,
                "model": model_json(self.plan.model) | {"params": self.plan.model.params},
                "per_stage": [
                    {
                        "index": s.index,
                        "dp_transport": s.dp_transport,
                        "p2p_transport": s.p2p_transport,
                    }
                    | (asdict(s.cost) if s.cost else {})
                    for s in self.plan.stages
                ],
            }
        )
        return out


def make_report(
    topo: Topology,
    model: ModelSpec,
    training: TrainingSpec,
    *,
    placement: str = "holmes",
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
) -> PlanReport:
    main = plan(topo, model, training, placement=placement, tp=tp, pp=pp, dp=dp)
    base = (
        main
        if placement == "megatron"
        else plan(topo, model, training, placement="megatron", tp=main.tp, pp=main.pp, dp=main.dp)
    )
    return PlanReport(topo, main, base, references(topo, model, training, main))


def _ranks(r: list[int]) -> str:
    return f"{r[0]}-{r[-1]}" if len(r) > 1 and r[-1] - r[0] == len(r) - 1 else ",".join(map(str, r))


def _line(p: Prediction) -> str:
    b = p.breakdown
    return (
        f"{p.iteration_s:.3f} s/iteration = compute {b['compute_s']:.3f} + tp {b['tp_comm_s']:.3f} + "
        f"pp p2p {b['pp_p2p_s']:.3f} + bubble {b['bubble_s']:.3f} + exposed dp sync {b['dp_sync_s']:.3f}"
        + (f" + tied-embedding sync {b['embedding_sync_s']:.3f}" if "embedding_sync_s" in b else "")
        + (f" + shared-core wait {b['shared_compute_s']:.3f}" if "shared_compute_s" in b else "")
        + "; "
        f"{p.tflops_per_gpu:.3g} TFLOPS/GPU, {p.samples_per_s:.3g} samples/s"
        + ("" if p.fits else f"  [DOES NOT FIT: {p.reason}]")
    )


def format_report(r: PlanReport) -> str:
    p, m, t = r.plan, r.plan.model, r.plan.training
    rdma_job = len(r.topology.clusters) == 1 and r.topology.clusters[0].nic.rdma
    lines = [
        f"{r.topology.name}: {p.world_size} GPUs in {len(r.topology.clusters)} cluster(s); {m.name} "
        f"({m.params / 1e9:.1f}B params), global batch {t.global_batch}, micro-batch {t.micro_batch} "
        f"-> {p.microbatches} micro-batches per pipeline",
        f"placement {p.placement}: tp={p.tp} pp={p.pp} dp={p.dp}, "
        f"clusters in order {' -> '.join(p.cluster_order)}",
        "",
        f"{'stage':>5}  {'cluster':<12}{'layers':>6}  {'ranks':<12}{'DP group NIC':<14}{'to next':<12}"
        f"{'compute/mb':>11}{'DP sync':>9}{'exposed':>9}{'memory':>10}",
    ]
    for s in p.stages:
        c = s.cost
        assert c is not None
        lines.append(
            f"{s.index:>5}  {s.cluster:<12}{s.layers:>6}  {_ranks(s.ranks):<12}{s.dp_transport:<14}"
            f"{s.p2p_transport:<12}{c.compute_mb:>10.3f}s{c.dp_sync:>8.3f}s{c.dp_exposed:>8.3f}s"
            f"{c.memory_gib:>7.1f}GiB"
        )
    lines += [
        "",
        f"predicted ({p.placement}):  {_line(p.predicted)}",
        f"megatron baseline:   {_line(r.baseline.predicted)}",
        f"  (same degrees, GPUs in file order, even split, no overlap of the gradient sync, one NCCL "
        f"transport for the job: {'RDMA' if rdma_job else 'TCP between nodes'})",
        f"all-RDMA reference:  {_line(r.references['all_rdma'])}",
        f"all-Ethernet ref.:   {_line(r.references['all_ethernet'])}",
        f"speedup over megatron: {r.speedup:.2f}x",
    ]
    return "\n".join(lines)


def plot_report(r: PlanReport, out: Path) -> None:
    """One iteration per stage, for the plan and its baseline: compute, communication, bubble, sync."""
    import matplotlib  # deferred: loads matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: loads matplotlib

    plans = [r.plan] if r.plan is r.baseline else [r.plan, r.baseline]
    fig, axes = plt.subplots(
        len(plans), 1, figsize=(11, 1.2 + 0.45 * sum(p.pp for p in plans) + 0.8 * len(plans))
    )
    axes = [axes] if len(plans) == 1 else list(axes)
    colours = {
        "compute": "#4878d0",
        "tp comm": "#6acc64",
        "pp p2p": "#ee854a",
        "bubble": "#d5d5d5",
        "dp sync": "#d65f5f",
    }
    xmax = max(p.predicted.iteration_s for p in plans)
    for ax, p in zip(axes, plans, strict=True):
        for s in p.stages:
            c = s.cost
            assert c is not None
            y = p.pp - 1 - s.index
            x = 0.0
            for name, width in (
                ("compute", p.microbatches * c.compute_mb),
                ("tp comm", p.microbatches * c.tp_mb),
                ("pp p2p", p.microbatches * c.p2p_mb),
            ):
                ax.barh(y, width, left=x, color=colours[name], label=name if s.index == 0 else None)
                x += width
            end = p.predicted.stage_end_s[s.index]
            ax.barh(
                y, max(end - x, 0), left=x, color=colours["bubble"], label="bubble" if s.index == 0 else None
            )
            ax.barh(
                y, c.dp_exposed, left=end, color=colours["dp sync"], label="dp sync" if s.index == 0 else None
            )
        ax.set_yticks(range(p.pp), [f"{s.index}: {s.cluster} ({s.layers} L)" for s in reversed(p.stages)])
        ax.set_xlim(0, xmax * 1.02)
        ax.set_title(
            f"{p.placement}: tp={p.tp} pp={p.pp} dp={p.dp}, {p.predicted.iteration_s:.2f} s/iteration, "
            f"{p.predicted.tflops_per_gpu:.0f} TFLOPS/GPU"
        )
        ax.legend(loc="lower right", fontsize=7, ncol=5)
    axes[-1].set_xlabel("seconds into the iteration (blocks are totals over all micro-batches)")
    fig.tight_layout()
    save_figure(fig, out, "the plot")
