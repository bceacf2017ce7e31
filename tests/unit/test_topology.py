"""Cluster specs: the example parses, transports follow NCCL's rule, bad input names key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.topology import load_topology, parse_topology

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-clusters.yaml"


def test_example_parses_with_defaults() -> None:
    t = load_topology(EXAMPLE)
    assert [c.name for c in t.clusters] == ["ib", "roce"]
    assert t.gpus == 64
    ib, roce = t.clusters
    assert ib.gpu.peak_tflops == 312 and roce.gpu.name == "A100-80GB", "the top-level gpu is the default"
    assert ib.nic.count == 4 and roce.intra_node.kind == "nvlink"


def test_transport_rule() -> None:
    t = load_topology(EXAMPLE)
    assert t.between("ib", "ib").kind == "infiniband"
    assert t.between("roce", "roce").kind == "roce"
    cross = t.between("ib", "roce")
    assert cross.kind == "ethernet" and cross.gbps == 25 and cross.latency_us == 100
    eth = parse_topology(
        "clusters: [{name: e, nodes: 2, gpus_per_node: 8, nic: {kind: ethernet, gbps: 25, count: 2}, "
        "gpu: {name: g, peak_tflops: 100, memory_gib: 40}}]"
    )
    assert eth.between("e", "e").kind == "ethernet" and eth.between("e", "e").total_gbps == 50
    # NCCL told once to stay off RDMA: inside a cluster too, bytes go over the Ethernet NIC.
    assert t.between("ib", "ib", rdma=False).kind == "ethernet"
    assert t.between("ib", "ib", rdma=False).total_gbps == 25


BASE = """\
gpu: {name: A100, peak_tflops: 312, memory_gib: 80}
clusters:
  - name: ib
    nodes: 2
    gpus_per_node: 8
    nic: {kind: infiniband, gbps: 200}
"""


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            BASE.replace("infiniband", "myrinet"),
            r":6: clusters\[0\]\.nic\.kind: unknown kind 'myrinet'; allowed",
        ),
        (BASE.replace("gbps: 200", "gbps: -5"), r":6: clusters\[0\]\.nic\.gbps: bandwidth must be positive"),
        (BASE.replace("    nodes: 2\n", ""), r"clusters\[0\]: missing field 'nodes'"),
        (BASE + "links: [{between: [ib, nope], kind: ethernet, gbps: 25}]\n", r"unknown cluster 'nope'"),
        (BASE.replace("nodes: 2", "nodes: two"), r":4: clusters\[0\]\.nodes: must be an integer"),
        (BASE + "colour: blue\n", r"colour: unknown key"),
        (BASE.replace("gpu: {name: A100, peak_tflops: 312, memory_gib: 80}\n", ""), r"missing field 'gpu'"),
        ("clusters: [\n", r"line 2 is not valid YAML|line 1 is not valid YAML"),
        ("", r"empty"),
    ],
)
def test_bad_specs(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_topology(text, "spec.yaml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read cluster spec"):
        load_topology(tmp_path / "nope.yaml")
