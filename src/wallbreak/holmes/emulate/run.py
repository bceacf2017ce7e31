"""`wallbreak emulate run`: the real trainer on the emulated cluster, one placement at a time.

The cluster file's hosts are replaced by the emulated nodes (address on `eth0`, the RDMA-or-cluster
NIC `fab0`, the TCP NIC `eth0`), the planner places the job, `--emit-launch`'s node scripts are
written, and each runs inside its node's namespace. Groups bind to the interface their transport
names, as on real hardware. The iteration time is the median of rank 0's step times after warm-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wallbreak.common.jsonfile import read_json
from wallbreak.errors import WallbreakError
from wallbreak.holmes.emulate import netns as emulate
from wallbreak.holmes.emulate.netns import Emulation
from wallbreak.holmes.plan import planner
from wallbreak.holmes.plan.calibrate import Calibration, job_record
from wallbreak.holmes.plan.launch import emit_launch
from wallbreak.holmes.plan.plan_file import PLAN_NAME
from wallbreak.holmes.plan.rates import REFERENCES, emulated_rates, reference_topology
from wallbreak.holmes.plan.report import make_report
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import Host, Topology

PLACEMENTS = (*planner.PLACEMENTS, *REFERENCES)  # what `emulate run --placement` takes


@dataclass(frozen=True)
class EmuJob:
    """One training job on the emulated cluster: what to train, where, and how predictions are made."""

    cluster: Path
    topo: Topology
    model: ModelSpec
    training: TrainingSpec
    steps: int
    degrees: tuple[int | None, int | None, int | None] = (None, None, None)
    scale: float = emulate.DEFAULT_SCALE
    prefix: str = emulate.DEFAULT_PREFIX
    calibration: Calibration | None = None
    warmup: int = 2
    timeout_s: float = 900


def run_on_emulation(job: EmuJob, placement: str) -> dict[str, Any]:
    """Bring up the emulation this placement needs (the references reshape every link), then run."""
    if placement not in PLACEMENTS:
        raise WallbreakError(f"--placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    reference = None if placement in ("holmes", "megatron") else placement
    net = reference_topology(job.topo, reference) if reference else job.topo
    emu = emulate.plan_emulation(net, job.scale, job.prefix)
    current = emulate.load_state(job.prefix) if emulate.state_path(job.prefix).exists() else None
    if current != emu:
        emulate.up(emu, force=True)
    return run_placement(emu, net, job, "megatron" if placement == "megatron" else "holmes", reference) | {
        "placement": placement
    }


def bench_holmes(job: EmuJob) -> dict[str, Any]:
    """All four placements in one run, with holmes' degrees for every one of them."""
    out: dict[str, Any] = {"placements": {}}
    for placement in PLACEMENTS:
        print(f"bench holmes: {placement} ...", file=sys.stderr, flush=True)
        r = run_on_emulation(job, placement)
        job = dataclasses.replace(job, degrees=(r["tp"], r["pp"], r["dp"]))
        out["placements"][placement] = r
    m = {k: v["measured"]["iteration_s"] for k, v in out["placements"].items()}
    out["speedup_holmes_vs_megatron"] = m["megatron"] / m["holmes"]
    out["holmes_vs_all_rdma"] = m["all-rdma"] / m["holmes"]
    out["calibrated"] = job.calibration is not None
    return out


def host_cores() -> int:
    """The cores every emulated GPU's process shares (one thread each)."""
    return len(os.sched_getaffinity(0))


def with_emulated_hosts(topo: Topology, emu: Emulation) -> Topology:
    clusters = []
    for c in topo.clusters:
        nodes = [n for n in emu.nodes if n.cluster == c.name]
        hosts = tuple(Host(n.host, n.eth_addr, emu.fabric_if, emu.eth_if) for n in nodes)
        clusters.append(dataclasses.replace(c, hosts=hosts))
    return dataclasses.replace(topo, clusters=tuple(clusters))


def run_placement(
    emu: Emulation, net: Topology, job: EmuJob, placement: str, reference: str | None = None
) -> dict[str, Any]:
    """Plan on the emulated rates (calibrated if asked), launch every node, time the steps."""

    if job.steps <= job.warmup:
        raise WallbreakError(f"--steps {job.steps}: need more than the {job.warmup} warm-up steps")
    cores = host_cores()
    shaped = emulated_rates(net, emu.scale, cores)
    topo = job.calibration.apply(shaped) if job.calibration else shaped
    tp, pp, dp = job.degrees
    report = make_report(
        with_emulated_hosts(topo, emu), job.model, job.training, placement=placement, tp=tp, pp=pp, dp=dp
    )
    with tempfile.TemporaryDirectory(prefix=f"wallbreak-emu-{placement}-") as tmp:
        rows = _launch(emu, emit_launch(report, Path(tmp)), Path(tmp), job)  # port: inside node 0's netns
    step_s = [float(r["step_s"]) for r in rows][job.warmup :]
    if not step_s:
        raise WallbreakError(f"placement {placement}: the run logged no step after warm-up")
    measured = statistics.median(step_s)
    tokens = job.training.global_batch * job.model.seq_len
    predicted = report.plan.predicted.iteration_s
    return {
        "placement": placement,
        **report.plan.layout.to_json(),
        "measured": {
            "iteration_s": measured,
            "tokens_per_s": tokens / measured,
            "steps": len(step_s),
            "losses": [float(r["loss"]) for r in rows],
        },
        "predicted": {"iteration_s": predicted, "calibrated": job.calibration is not None},
        "error_pct": 100 * (predicted - measured) / measured,
        "job": job_record(report.plan, job.cluster, reference, emu.scale, cores),
    }


def namespaces_in_rank_order(emu: Emulation, plan_nodes: list[dict[str, Any]]) -> list[str]:
    """The namespace each node script runs in, by node rank: the one of the host it names."""
    netns_of = {n.host: n.netns for n in emu.nodes}
    return [netns_of[str(n["host"])] for n in plan_nodes]


def _launch(emu: Emulation, written: list[Path], out: Path, job: EmuJob) -> list[dict[str, Any]]:
    """Each node script inside its own host's namespace; rank 0's log, one record per step.

    Node ranks follow the plan's cluster order, not the file's, so scripts are matched to namespaces
    by host name (the plan file lists its nodes in node-rank order, as the scripts are numbered)."""
    scripts = sorted(p for p in written if p.name.startswith("node-"))
    netns = namespaces_in_rank_order(emu, read_json(out / PLAN_NAME, "plan")["nodes"])
    log = out / "rank0.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    procs = []
    for i, script in enumerate(scripts):
        args = ["--steps", str(job.steps)] + (["--log-file", str(log)] if i == 0 else [])
        with open(out / f"node-{i}.err", "w") as err:  # a file, not a pipe: a full pipe stalls a node
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", netns[i], "sh", str(script), *args],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,  # its own process group, so it can be ended whole
                )
            )
    _wait_all(procs, [out / f"node-{i}.err" for i in range(len(procs))], job.timeout_s)
    rows = [line for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    return [json.loads(r) for r in rows]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun starts its workers in sessions of their own, so its
    process group alone does not hold them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def end_tree(p: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """End a node script's whole process group and every process below it: SIGTERM (torchrun
    ends its workers), then SIGKILL for whatever is left after `grace_s`."""
    pids = [p.pid, *descendants(p.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM and not any(Path(f"/proc/{pid}").exists() for pid in pids[1:]):
            return
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=30)


def _wait_all(procs: list[subprocess.Popen[bytes]], errs: list[Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    failed = None
    while any(p.poll() is None for p in procs):
        bad = [p for p in procs if p.poll() not in (None, 0)]
        if bad or time.monotonic() > deadline:
            failed = bad[0] if bad else None
            break
        time.sleep(0.2)
    else:
        failed = next((p for p in procs if p.returncode != 0), None)
        if failed is None:
            return
    for p in procs:
        end_tree(p)
    why = errs[procs.index(failed)].read_text().strip().splitlines()[-5:] if failed else []
    raise WallbreakError(
        "the emulated training run failed" + (": " + " | ".join(why) if why else " (timed out)")
    )
