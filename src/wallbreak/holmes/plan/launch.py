"""`wallbreak plan --emit-launch DIR`: the plan file the runtime reads, one torchrun script per node,
and the matching Megatron-LM arguments.

NCCL variables go where NCCL reads them (rules and sources in ARCHITECTURE.md):
- per group, only `NCCL_NET` (IB for InfiniBand and RoCE groups, Socket for TCP groups): NCCL reads
  it for each communicator, so the runtime sets it while creating that group;
- per node, once, in the node script, before any communicator: `NCCL_IB_HCA` (the host's `hca`),
  `NCCL_IB_GID_INDEX=3` on RoCE nodes, `NCCL_IB_DISABLE=1` on nodes without an RDMA NIC, and
  `NCCL_SOCKET_IFNAME`: NCCL reads these once per process, and every rank of a node shares them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from wallbreak.common.atomic import atomic_open
from wallbreak.holmes.plan.plan_file import PLAN_NAME, model_json, training_json, write_plan
from wallbreak.holmes.plan.planner import Plan
from wallbreak.holmes.plan.report import PlanReport
from wallbreak.holmes.plan.spec import MASTER_PORT
from wallbreak.holmes.plan.topology import Cluster, Host, Topology

NCCL_NET = {"infiniband": "IB", "roce": "IB", "tcp": "Socket"}  # per communicator, by group transport
ROCE_GID_INDEX = "3"  # RoCE v2 over IPv4 on the usual Mellanox/NVIDIA setup
# Stock Megatron-LM's one transport for a job that spans clusters or NIC kinds.
MEGATRON_TCP_JOB = {"NCCL_NET": "Socket", "NCCL_IB_DISABLE": "1"}
PER_GROUP = ("NCCL_NET",)  # the only NCCL variable a communicator reads for itself (config.net_name)

TRAIN_MODULE = "wallbreak.holmes.runtime.train"  # what torchrun runs on every node (`-m`)


def nodes_in_rank_order(plan: Plan, topo: Topology) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    first = 0
    for node in sorted({s.node for s in plan.slots}):
        gpus = [i for i, s in enumerate(plan.slots) if s.node == node]
        cluster = topo.cluster(plan.slots[gpus[0]].cluster)
        j = seen.get(cluster.name, 0)
        seen[cluster.name] = j + 1
        host = cluster.hosts[j] if cluster.hosts else None
        out.append(
            {
                "node_rank": len(out),
                "cluster": cluster.name,
                "host": host.name if host else f"{cluster.name}-{j}",
                "address": host.address if host else None,
                "ifname": host.ifname if host else None,
                "tcp_ifname": (host.tcp_ifname or host.ifname) if host else None,
                "nproc": len(gpus),
                "first_rank": first,
                "env": node_env(cluster, host),
            }
        )
        first += len(gpus)
    return out


def node_env(cluster: Cluster, host: Host | None) -> dict[str, str]:
    """What NCCL reads once per process, so the same for every rank of the node: the union of what
    its groups need (sockets for TCP groups, the HCAs and GID index for IB or RoCE groups)."""
    env: dict[str, str] = {}
    tcp = host and (host.tcp_ifname or host.ifname)
    if tcp:
        env["NCCL_SOCKET_IFNAME"] = tcp
    if not cluster.nic.rdma:
        env["NCCL_IB_DISABLE"] = "1"  # no RDMA NIC: no group of this node can use IB
        return env
    if host and host.hca:
        env["NCCL_IB_HCA"] = host.hca
    if cluster.nic.kind == "roce":
        env["NCCL_IB_GID_INDEX"] = ROCE_GID_INDEX
    return env


def _group_nic(kind: str, ranks: list[int], nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The environment and interface a group's communicator is built with."""
    node_of = {}
    for n in nodes:
        for r in range(n["first_rank"], n["first_rank"] + n["nproc"]):
            node_of[r] = n
    env = {"NCCL_NET": NCCL_NET[kind]} if kind in NCCL_NET else {}
    key = "tcp_ifname" if kind == "tcp" else "ifname"
    ifnames = sorted({str(node_of[r][key]) for r in ranks if node_of[r][key]})
    return {"env": env, "ifname": ifnames[0] if len(ifnames) == 1 else None, "ifnames": ifnames}


def job_env(p: Plan) -> dict[str, str]:
    """Stock Megatron's one transport for the whole job: sockets everywhere if any group needs them."""
    if p.placement == "megatron" and any("tcp" in (s.dp_transport, s.p2p_transport) for s in p.stages):
        return dict(MEGATRON_TCP_JOB)
    return {}


def plan_body(report: PlanReport) -> dict[str, Any]:
    p, topo = report.plan, report.topology
    nodes = nodes_in_rank_order(p, topo)
    groups = p.groups()
    for gs in groups.values():
        for g in gs:
            g.update(_group_nic(g["transport"], g["ranks"], nodes))
    job = job_env(p)
    if job:  # one transport for the job, whatever the group
        # NCCL reads NCCL_IB_DISABLE once per process (possibly for the default group, before any of
        # ours): it belongs to every node's environment. Only NCCL_NET is a per-communicator value.
        for gs in groups.values():
            for g in gs:
                g["env"] = {k: v for k, v in job.items() if k in PER_GROUP}
        for n in nodes:
            n["env"] = n["env"] | job
    return {
        "placement": p.placement,
        **p.layout.to_json(),
        "world_size": p.world_size,
        "microbatches": p.microbatches,
        "model": model_json(p.model),
        "training": training_json(p.training) | {"schedule": p.predicted.schedule},
        "stages": [s.to_json() for s in p.stages],
        "groups": groups,
        "nodes": nodes,
        "predicted": p.predicted.to_json(),
        "topology": topo.name,
    }


def megatron_args(p: Plan) -> str:
    m, t = p.model, p.training
    args = [
        f"--tensor-model-parallel-size {p.tp}",
        f"--pipeline-model-parallel-size {p.pp}",
        f"--num-layers {m.layers}",
        f"--hidden-size {m.hidden}",
        f"--num-attention-heads {m.heads}",
        f"--seq-length {m.seq_len}",
        f"--max-position-embeddings {m.seq_len}",
        f"--micro-batch-size {t.micro_batch}",
        f"--global-batch-size {t.global_batch}",
        f"--{t.dtype}" if t.dtype != "fp32" else "",
        "--recompute-granularity full --recompute-method uniform" if t.recompute == "full" else "",
        "--use-distributed-optimizer --overlap-grad-reduce" if t.distributed_optimizer else "",
    ]
    layers = [s.layers for s in p.stages]
    note = ""
    if len(set(layers)) > 1:
        mid = layers[1:-1]
        if (p.pp > 2 and len(set(mid)) == 1) or p.pp == 2:
            args.append(f"--decoder-first-pipeline-num-layers {layers[0]}")
            args.append(f"--decoder-last-pipeline-num-layers {layers[-1]}")
        else:
            note = (
                f"# stock Megatron-LM cannot express this split ({', '.join(map(str, layers))}): "
                "it only varies the first and last stage; use the wallbreak runtime or a fork that "
                "takes per-stage layer counts\n"
            )
    return note + " \\\n  ".join(a for a in args if a) + "\n"


def comment(text: str) -> str:
    """A shell comment line: whatever `text` holds, it stays one line."""
    return "# " + " ".join(text.splitlines())


def emit_launch(report: PlanReport, out: Path, master_port: int = MASTER_PORT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pf = plan_body(report)
    write_plan(out / PLAN_NAME, pf)
    written = [out / PLAN_NAME]
    nodes = pf["nodes"]
    master = nodes[0]["address"] or nodes[0]["host"]
    for n in nodes:
        env = dict(n["env"])  # the node's variables, stock Megatron's job-wide transport included
        if n["tcp_ifname"]:
            env["GLOO_SOCKET_IFNAME"] = n["tcp_ifname"]
        q = shlex.quote
        lines = [
            "#!/bin/sh",
            comment(
                f"node {n['node_rank']} of {len(nodes)}: {q(str(n['host']))} "
                f"in cluster {q(str(n['cluster']))}, "
                f"ranks {n['first_rank']}-{n['first_rank'] + n['nproc'] - 1}"
            ),
            "# NCCL reads these once per process; per group, the runtime sets only NCCL_NET (plan.json).",
            "set -e",
            'HERE=$(cd "$(dirname "$0")" && pwd)',
        ]
        lines += [f"export {k}={q(str(v))}" for k, v in sorted(env.items())]
        lines.append(
            f"exec torchrun --nnodes {q(str(len(nodes)))} --nproc-per-node {q(str(n['nproc']))} "
            f"--node-rank {q(str(n['node_rank']))} --master-addr {q(str(master))} "
            f"--master-port {q(str(master_port))} "
            f'-m {TRAIN_MODULE} --plan "$HERE/{PLAN_NAME}" "$@"'
        )
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(n["host"]))
        path = out / f"node-{n['node_rank']:03d}-{safe}.sh"
        with atomic_open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        path.chmod(0o755)
        written.append(path)
    with atomic_open(out / "megatron-args.txt", "w") as f:
        f.write(megatron_args(report.plan))
    written.append(out / "megatron-args.txt")
    return written
