"""What an emulated cluster gives the planner: the reference topologies (every NIC at one rate) and
the emulated rates (the network scaled, every GPU sharing one machine's cores). The emulator shapes
its links from these and the calibration re-predicts measured runs on them, so the two cannot
drift apart."""

from __future__ import annotations

import dataclasses

from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.topology import Link, Topology

REFERENCES = ("all-rdma", "all-ethernet")  # the planner's reference placements, as emulated clusters


def reference_topology(topo: Topology, kind: str) -> Topology:
    """The same nodes with every NIC and link at one rate: the best RDMA NIC's (all-rdma), or the
    inter-cluster Ethernet's (all-ethernet) - what the planner's references assume."""
    if kind == "all-rdma":
        nics = [c.nic for c in topo.clusters]
        best = max([n for n in nics if n.rdma] or nics, key=lambda n: n.total_gbps)
        nic = Link("infiniband", best.total_gbps)
    elif kind == "all-ethernet":
        nic = Link("ethernet", topo.inter_cluster.total_gbps)
    else:
        raise ConfigError(f"unknown reference {kind!r}; allowed: {', '.join(REFERENCES)}")
    eth = Link("ethernet", nic.gbps)
    clusters = tuple(dataclasses.replace(c, nic=nic, ethernet=eth) for c in topo.clusters)
    return dataclasses.replace(topo, clusters=clusters, inter_cluster=eth, links={})


def emulated_rates(net: Topology, scale: float, cores: float | None) -> Topology:
    """What the emulation gives the planner: network rates x `scale`, no link latency (the emulation
    has none), and every GPU computing on one machine's `cores`. The calibration re-predicts
    measured runs on exactly this topology."""
    shaped = net.network_scaled(scale).map_network(lambda ln: dataclasses.replace(ln, latency_us=0.0))
    return dataclasses.replace(shaped, shared_compute=cores)
