"""The emulator's plan: names, addresses and shaped rates from a cluster file (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wallbreak.errors import ConfigError
from wallbreak.holmes.emulate.netns import plan_emulation, up_commands
from wallbreak.holmes.plan.topology import load_topology

SMALL = Path(__file__).parents[2] / "examples" / "clusters" / "emu-small.yaml"


def test_plan_names_addresses_and_rates() -> None:
    emu = plan_emulation(load_topology(SMALL), scale=0.01, prefix="t")
    assert [n.netns for n in emu.nodes] == ["tn0", "tn1", "tn2", "tn3"]
    assert [n.fabric_addr for n in emu.nodes] == ["10.77.0.1", "10.77.0.2", "10.77.1.1", "10.77.1.2"]
    assert [n.fabric_mbit for n in emu.nodes] == [1000, 1000, 500, 500]  # IB 100G, RoCE 50G x 0.01
    assert {n.eth_mbit for n in emu.nodes} == {100} and emu.uplink_mbit == {"ib": 100, "roce": 100}
    assert not emu.latency_emulated


def test_every_veth_is_shaped_at_both_ends() -> None:
    emu = plan_emulation(load_topology(SMALL), scale=0.01, prefix="t")
    cmds = up_commands(emu)
    shaped = {(c[c.index("dev") + 1], c[2] if c[1] == "-n" else None) for c in cmds if c[0] == "tc"}
    veths = [c for c in cmds if c[:2] == ["ip", "link"] and "veth" in c]
    assert len(veths) == 2 * 4 + 2  # two NICs per node, one uplink per cluster
    for c in veths:
        outer = c[3]
        inner = c[c.index("name") + 1]
        ns = c[c.index("netns") + 1] if "netns" in c else None
        assert (outer, None) in shaped and (inner, ns) in shaped, c
    rates = {c[c.index("dev") + 1]: c[c.index("rate") + 1] for c in cmds if c[0] == "tc" and c[1] != "-n"}
    assert (
        rates["tn0f"] == "1000000000bit"
        and rates["tn2f"] == "500000000bit"
        and rates["tu0a"] == "100000000bit"
    )
    assert not any(c[:3] == ["ip", "route", "add"] for c in cmds)  # no route off the emulated nodes


@pytest.mark.parametrize(("kw", "says"), [({"prefix": "Bad!"}, "--prefix"), ({"scale": 2.0}, "--scale")])
def test_bad_arguments_are_named(kw: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        plan_emulation(load_topology(SMALL), **kw)  # type: ignore[arg-type]


def test_reference_networks_set_every_link_to_one_rate() -> None:
    from wallbreak.holmes.plan.rates import reference_topology

    topo = load_topology(SMALL)
    fast = plan_emulation(reference_topology(topo, "all-rdma"), scale=0.01, prefix="t")
    slow = plan_emulation(reference_topology(topo, "all-ethernet"), scale=0.01, prefix="t")
    assert {n.fabric_mbit for n in fast.nodes} | {n.eth_mbit for n in fast.nodes} == {1000}  # the IB NIC
    assert set(fast.uplink_mbit.values()) == {1000}
    assert {n.fabric_mbit for n in slow.nodes} | {n.eth_mbit for n in slow.nodes} == {100}  # the Ethernet
    assert set(slow.uplink_mbit.values()) == {100}


def test_node_scripts_run_in_their_own_hosts_namespaces() -> None:
    """Node ranks follow the plan's cluster order, which need not be the file's: emu-three's holmes
    plan puts the Ethernet cluster before RoCE, so node rank 2 is an Ethernet host, not namespace 2."""
    from wallbreak.holmes.emulate.run import namespaces_in_rank_order, with_emulated_hosts
    from wallbreak.holmes.plan.launch import plan_body
    from wallbreak.holmes.plan.rates import emulated_rates
    from wallbreak.holmes.plan.report import make_report
    from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec

    topo = load_topology(SMALL.parent / "emu-three.yaml")
    emu = plan_emulation(topo, scale=0.01, prefix="t")
    planned = with_emulated_hosts(emulated_rates(topo, 0.01, 2), emu)
    report = make_report(
        planned, ModelSpec.llama("m", 4, 128, 4, 64, 256), TrainingSpec(8, 2, "none", "fp32")
    )
    nodes = plan_body(report)["nodes"]
    netns = namespaces_in_rank_order(emu, nodes)
    cluster_of = {n.netns: n.cluster for n in emu.nodes}
    assert [cluster_of[ns] for ns in netns] == [n["cluster"] for n in nodes]
    assert sorted(netns) == sorted(n.netns for n in emu.nodes)
    assert report.plan.cluster_order != [c.name for c in topo.clusters]  # the case that went wrong


def test_ending_a_node_script_ends_workers_in_their_own_sessions(tmp_path: Path) -> None:
    """As torchrun does, the 'agent' starts its worker with start_new_session: killing the agent's
    process group alone would leave the worker running."""
    import subprocess
    import sys
    import time

    from wallbreak.holmes.emulate.run import end_tree

    pidfile = tmp_path / "worker.pid"
    agent = (
        "import subprocess, sys, time\n"
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        "w = subprocess.Popen(sleeper, start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(w.pid))\n"
        "time.sleep(600)\n"
    )
    p = subprocess.Popen(["sh", "-c", f'exec "{sys.executable}" -c "$0"', agent], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    end_tree(p, grace_s=2)
    assert p.poll() is not None
    for _ in range(100):
        stat = Path(f"/proc/{worker}/stat")
        if not stat.exists() or " Z " in stat.read_text():
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the worker outlived its node script")


def test_a_run_prints_as_one_line_with_its_degrees() -> None:
    """What `emulate run` prints of a run record (the degrees at its top level, as every record has)."""
    from wallbreak.cli.emulate import _line

    record = {
        "placement": "holmes",
        "tp": 1,
        "pp": 2,
        "dp": 2,
        "measured": {"iteration_s": 0.25, "tokens_per_s": 2048.0},
        "predicted": {"iteration_s": 0.3},
        "error_pct": 20.0,
    }
    assert _line(record) == (
        "holmes        tp=1 pp=2 dp=2: measured 0.250 s/iteration (2048 tokens/s), predicted 0.300 s (+20%)"
    )
