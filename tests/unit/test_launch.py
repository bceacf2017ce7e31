"""NCCL variables where NCCL reads them: NCCL_NET per group, the process-wide ones once per node."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from wallbreak.holmes.plan.launch import emit_launch
from wallbreak.holmes.plan.report import make_report
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import parse_topology

# IB + RoCE + Ethernet-only clusters, one GPU per node, with hosts and their RDMA devices.
MIXED = """
name: mixed
gpu: {name: A100-80GB, peak_tflops: 312, memory_gib: 80}
clusters:
  - name: ib
    nodes: 2
    gpus_per_node: 1
    nic: {kind: infiniband, gbps: 200}
    hosts: [{name: i0, address: 10.0.0.1, ifname: ib0, tcp_ifname: eth0, hca: "mlx5_0,mlx5_1"},
            {name: i1, address: 10.0.0.2, ifname: ib0, tcp_ifname: eth0, hca: "mlx5_0,mlx5_1"}]
  - name: roce
    nodes: 2
    gpus_per_node: 1
    nic: {kind: roce, gbps: 100}
    hosts: [{name: r0, address: 10.0.1.1, ifname: ens1, tcp_ifname: eth0, hca: mlx5_2},
            {name: r1, address: 10.0.1.2, ifname: ens1, tcp_ifname: eth0, hca: mlx5_2}]
  - name: eth
    nodes: 2
    gpus_per_node: 1
    nic: {kind: ethernet, gbps: 25}
    hosts: [{name: e0, address: 10.0.2.1, ifname: eth0}, {name: e1, address: 10.0.2.2, ifname: eth0}]
inter_cluster: {kind: ethernet, gbps: 25}
"""
EXAMPLES = Path(__file__).parents[2] / "examples"
PER_PROCESS = re.compile(r"NCCL_IB_|NCCL_SOCKET_IFNAME")


def _emit(tmp: Path, placement: str) -> tuple[dict, dict[str, str]]:
    report = make_report(parse_topology(MIXED, "mixed.yaml"), ModelSpec.llama("m", 6, 1024, 16, 512, 51200),
                         TrainingSpec(16, 1), placement=placement, tp=1, pp=3, dp=2)  # fmt: skip
    emit_launch(report, tmp)
    scripts = {p.name.split("-", 2)[2].removesuffix(".sh"): p.read_text() for p in tmp.glob("node-*.sh")}
    return json.loads((tmp / "plan.json").read_text()), scripts


def test_holmes_sets_nccl_net_per_group_and_the_rest_once_per_node(tmp_path: Path) -> None:
    pf, scripts = _emit(tmp_path, "holmes")
    nets = {g["transport"]: g["env"] for gs in pf["groups"].values() for g in gs}
    assert nets["infiniband"] == {"NCCL_NET": "IB"} and nets["roce"] == {"NCCL_NET": "IB"}
    assert nets["tcp"] == {"NCCL_NET": "Socket"}
    for gs in pf["groups"].values():  # no group toggles a variable NCCL reads once per process
        for g in gs:
            assert not [k for k in g["env"] if PER_PROCESS.match(k)], g
    env = {n["host"]: n["env"] for n in pf["nodes"]}
    assert env["i0"] == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5_0,mlx5_1"}
    assert env["r1"] == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5_2", "NCCL_IB_GID_INDEX": "3"}
    assert env["e0"] == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "1"}
    # The scripts export exactly the node's variables (plus gloo's interface), before torchrun.
    for host, text in scripts.items():
        exported = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.M))
        assert exported == env[host] | {"GLOO_SOCKET_IFNAME": "eth0"}, host


def test_megatron_forces_one_tcp_transport_for_the_job(tmp_path: Path) -> None:
    pf, scripts = _emit(tmp_path, "megatron")
    # NCCL_IB_DISABLE is read once per process: every node's env has it, no group's; only the
    # per-communicator NCCL_NET stays in the groups.
    assert {json.dumps(g["env"]) for gs in pf["groups"].values() for g in gs} == {
        json.dumps({"NCCL_NET": "Socket"})
    }
    for n in pf["nodes"]:
        assert n["env"]["NCCL_IB_DISABLE"] == "1" and n["env"]["NCCL_NET"] == "Socket", n
    assert all("export NCCL_IB_DISABLE=1" in t and "export NCCL_NET=Socket" in t for t in scripts.values())


@pytest.mark.parametrize(
    ("cluster", "model"),
    [("two-clusters.yaml", "gpt-7.5b"), ("clusters/three-clusters.yaml", "gpt-7.5b"),
     ("clusters/three-clusters.yaml", "gpt-1.7b")],
)  # fmt: skip
def test_example_clusters_emit_nccl_net_per_group_and_hcas_per_node(
    tmp_path: Path, cluster: str, model: str
) -> None:
    from wallbreak.holmes.plan.topology import load_topology

    topo = load_topology(EXAMPLES / cluster)
    report = make_report(topo, ModelSpec.preset(model), TrainingSpec(512, 2))
    emit_launch(report, tmp_path)
    pf = json.loads((tmp_path / "plan.json").read_text())
    for gs in pf["groups"].values():
        for g in gs:
            assert set(g["env"]) <= {"NCCL_NET"}, g  # never a per-group NCCL_IB_* toggle
            if g["transport"] in ("infiniband", "roce", "tcp"):
                assert g["env"]["NCCL_NET"] == ("Socket" if g["transport"] == "tcp" else "IB")
    for n in pf["nodes"]:
        rdma = topo.cluster(n["cluster"]).nic.rdma
        assert ("NCCL_IB_HCA" in n["env"]) == rdma and ("NCCL_IB_DISABLE" in n["env"]) == (not rdma)


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("name: i0,", 'name: "h1\\ntouch /tmp/PWNED #",', "clusters[0].hosts[0].name"),
        ("name: roce", "name: 'roce; reboot'", "clusters[1].name"),
        ("ifname: ens1,", "ifname: 'ens1$(id)',", "clusters[1].hosts[0].ifname"),
        ("hca: mlx5_2}", "hca: 'mlx5_2`id`'}", "clusters[1].hosts[0].hca"),
    ],
)
def test_names_that_could_become_shell_are_refused_before_anything_is_written(
    tmp_path: Path, old: str, new: str, key: str
) -> None:
    from wallbreak.errors import ConfigError

    assert old in MIXED
    with pytest.raises(ConfigError) as e:
        parse_topology(MIXED.replace(old, new, 1), "mixed.yaml")
    line = next(i for i, text in enumerate(MIXED.splitlines(), 1) if old in text)
    assert f"mixed.yaml:{line}" in str(e.value) and key in str(e.value) and "not allowed" in str(e.value)
    # Through the CLI: one line, exit 2, and no plan or node script written.
    import subprocess
    import sys

    bad = tmp_path / "mixed.yaml"
    bad.write_text(MIXED.replace(old, new, 1))
    out = tmp_path / "launch"
    cmd = [sys.executable, "-m", "wallbreak.cli", "plan", str(bad), "--model", "gpt-1.7b"]
    proc = subprocess.run(
        [*cmd, "--global-batch", "64", "--emit-launch", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and key in proc.stderr
    assert not out.exists()


def test_every_value_in_a_node_script_is_quoted_comments_included(tmp_path: Path) -> None:
    """Even a plan built past the parser (a name it would refuse) cannot put a command on a line."""
    from dataclasses import replace

    from wallbreak.holmes.plan.launch import comment

    assert comment("a\ntouch /tmp/PWNED #") == "# a touch /tmp/PWNED #"
    topo = parse_topology(MIXED, "mixed.yaml")
    bad = replace(
        topo.clusters[2],
        hosts=(replace(topo.clusters[2].hosts[0], name="e0\ntouch x #"), topo.clusters[2].hosts[1]),
    )
    topo = replace(topo, clusters=(*topo.clusters[:2], bad))
    written = emit_launch(make_report(topo, ModelSpec.preset("gpt-1.7b"), TrainingSpec(64, 1)), tmp_path)
    for p in written:
        if p.name.startswith("node-"):
            assert not any(line.startswith("touch") for line in p.read_text().splitlines())
