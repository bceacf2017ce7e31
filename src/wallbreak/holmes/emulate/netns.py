"""A heterogeneous cluster on one Linux machine: a network namespace per node, shaped links.

Each node gets two NICs, as real nodes in the Holmes setting have:
- `fab0`, into its cluster's fabric bridge (`<P>c<i>`), shaped to the cluster NIC's rate (the RDMA
  NIC, or the Ethernet one in an Ethernet cluster);
- `eth0`, into its cluster's Ethernet bridge (`<P>e<i>`), shaped to the node's TCP NIC. With more
  than one cluster, each cluster's Ethernet bridge reaches a hub bridge (`<P>x`) through an uplink
  shaped to the inter-cluster link, so traffic between clusters crosses that link.

tc shapes only what leaves an interface, so every veth is shaped at both ends (tbf), which shapes
both directions. Latency is **not** emulated: this kernel has no netem, and a tbf queue adds only
queueing delay; the state file says so (`latency_emulated: false`) and `up` prints it.

The namespaces get addresses only on these bridges (10.77.c.n/24 on fabrics, 10.78.c.n/16 on
Ethernet), no default route, and the bridges have no address in the root namespace: traffic stays
between the emulated nodes. `down` removes everything whose name matches the prefix's patterns,
with or without a state file, so it also cleans up after a crashed run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from wallbreak.common.atomic import atomic_write_json
from wallbreak.errors import ConfigError, WallbreakError
from wallbreak.holmes.plan.topology import Topology

DEFAULT_PREFIX = "wb"
DEFAULT_SCALE = 0.01  # 200 Gbit/s becomes 2 Gbit/s: what veths on a small machine can carry
FABRIC_IF, ETH_IF = "fab0", "eth0"
STATE_DIR = Path("/run/wallbreak")


@dataclass(frozen=True)
class EmuNode:
    index: int  # global node index, in file order
    cluster: str
    cluster_index: int
    host: str  # the node's name in the cluster file (or cluster-i)
    netns: str
    fabric_addr: str
    eth_addr: str
    fabric_mbit: float
    eth_mbit: float


@dataclass(frozen=True)
class Emulation:
    prefix: str
    scale: float
    nodes: tuple[EmuNode, ...]
    uplink_mbit: dict[str, float]  # cluster -> its uplink to the hub (only with several clusters)
    fabric_if: str = FABRIC_IF
    eth_if: str = ETH_IF
    latency_emulated: bool = False

    @classmethod
    def from_json(cls, text: str) -> Emulation:
        d = json.loads(text)
        d["nodes"] = tuple(EmuNode(**n) for n in d["nodes"])
        return cls(**d)


def check_prefix(prefix: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9]{0,3}", prefix):
        raise ConfigError(f"--prefix {prefix!r}: 1-4 lower-case letters or digits, starting with a letter")
    return prefix


def plan_emulation(topo: Topology, scale: float = DEFAULT_SCALE, prefix: str = DEFAULT_PREFIX) -> Emulation:
    """Names, addresses and shaped rates for every emulated node (pure: runs nothing)."""
    check_prefix(prefix)
    if not 0 < scale <= 1:
        raise ConfigError(f"--scale {scale}: give a factor in (0, 1], e.g. 0.01 (200 Gbit/s -> 2 Gbit/s)")
    if len(topo.clusters) > 250 or any(c.nodes > 250 for c in topo.clusters):
        raise ConfigError("the emulator supports up to 250 clusters of up to 250 nodes each")
    shaped = topo.network_scaled(scale)  # the rates the emulation carries, and the planner predicts on
    nodes: list[EmuNode] = []
    for ci, c in enumerate(topo.clusters):
        for i in range(c.nodes):
            g = len(nodes)
            nodes.append(
                EmuNode(
                    index=g,
                    cluster=c.name,
                    cluster_index=ci,
                    host=c.hosts[i].name if i < len(c.hosts) else f"{c.name}-{i}",
                    netns=f"{prefix}n{g}",
                    fabric_addr=f"10.77.{ci}.{i + 1}",
                    eth_addr=f"10.78.{ci}.{i + 1}",
                    fabric_mbit=shaped.cluster(c.name).nic.total_gbps * 1000,
                    eth_mbit=shaped.tcp(c.name).total_gbps * 1000,
                )
            )
    uplinks: dict[str, float] = {}
    if len(topo.clusters) > 1:
        for c in topo.clusters:
            # Per pair overrides are approximated by each cluster's slowest link to any other.
            rates = [shaped.links.get(frozenset((c.name, o.name)), shaped.inter_cluster).total_gbps
                     for o in topo.clusters if o is not c]  # fmt: skip
            uplinks[c.name] = min(rates) * 1000
    return Emulation(prefix, scale, tuple(nodes), uplinks)


def _tbf(dev: str, mbit: float, netns: str | None = None) -> list[str]:
    # The burst must hold a whole GSO packet (64 KiB) or tbf drops it; 10 ms at the rate otherwise.
    burst = max(256 * 1024, int(mbit * 1e6 / 8 * 0.01))
    where = ["-n", netns] if netns else []
    return ["tc", *where, "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", f"{int(mbit * 1e6)}bit", "burst", str(burst), "latency", "100ms"]  # fmt: skip


def up_commands(emu: Emulation) -> list[list[str]]:
    """Every ip/tc command that builds the emulation, in order (pure: runs nothing)."""
    p = emu.prefix
    cmds: list[list[str]] = []
    clusters = sorted({(n.cluster_index, n.cluster) for n in emu.nodes})
    for ci, _ in clusters:
        for br in (f"{p}c{ci}", f"{p}e{ci}"):
            cmds += [["ip", "link", "add", br, "type", "bridge"], ["ip", "link", "set", br, "up"]]
    if emu.uplink_mbit:
        cmds += [["ip", "link", "add", f"{p}x", "type", "bridge"], ["ip", "link", "set", f"{p}x", "up"]]
        for ci, name in clusters:
            a, b = f"{p}u{ci}a", f"{p}u{ci}b"
            cmds += [
                ["ip", "link", "add", a, "type", "veth", "peer", "name", b],
                ["ip", "link", "set", a, "master", f"{p}e{ci}", "up"],
                ["ip", "link", "set", b, "master", f"{p}x", "up"],
                _tbf(a, emu.uplink_mbit[name]),
                _tbf(b, emu.uplink_mbit[name]),
            ]
    for n in emu.nodes:
        cmds += [["ip", "netns", "add", n.netns], ["ip", "-n", n.netns, "link", "set", "lo", "up"]]
        for suffix, inner, bridge, addr, mbit in (
            ("f", emu.fabric_if, f"{p}c{n.cluster_index}", f"{n.fabric_addr}/24", n.fabric_mbit),
            ("e", emu.eth_if, f"{p}e{n.cluster_index}", f"{n.eth_addr}/16", n.eth_mbit),
        ):
            outer = f"{n.netns}{suffix}"
            cmds += [
                ["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", n.netns],
                ["ip", "link", "set", outer, "master", bridge, "up"],
                ["ip", "-n", n.netns, "addr", "add", addr, "dev", inner],
                ["ip", "-n", n.netns, "link", "set", inner, "up"],
                _tbf(outer, mbit),
                _tbf(inner, mbit, n.netns),
            ]
    return cmds


def state_path(prefix: str) -> Path:
    return STATE_DIR / f"emulate-{check_prefix(prefix)}.json"


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ConfigError("wallbreak emulate needs root (it creates network namespaces and shapes links)")


def _run(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise WallbreakError(f"{cmd[0]} is not installed (Debian: apt-get install iproute2)") from None
    if r.returncode != 0:
        raise WallbreakError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def existing(prefix: str) -> tuple[list[str], list[str]]:
    """(namespaces, links) in the root namespace whose names belong to this prefix's emulation."""
    check_prefix(prefix)
    ns_re = re.compile(rf"{prefix}n\d+")
    link_re = re.compile(rf"{prefix}(c\d+|e\d+|x|u\d+[ab]|n\d+[fe])")
    spaces = [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]
    links = []
    for line in _run(["ip", "-o", "link", "show"]).splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if link_re.fullmatch(name):
            links.append(name)
    return [s for s in spaces if ns_re.fullmatch(s)], links


def down(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove this prefix's namespaces, bridges, veths (and so their qdiscs) and state; idempotent."""
    _require_root()
    spaces, links = existing(prefix)
    for ns in spaces:
        _run(["ip", "netns", "del", ns])  # takes the namespace's veth ends, and so their peers
    for link in existing(prefix)[1]:
        subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=60)  # a peer may be gone
    state_path(prefix).unlink(missing_ok=True)
    return spaces + links  # what there was


def up(emu: Emulation, force: bool = False) -> Path:
    """Build the emulation; refuse to clobber an existing one unless `force` (then it is removed)."""
    _require_root()
    spaces, links = existing(emu.prefix)
    if spaces or links or state_path(emu.prefix).exists():
        if not force:
            raise ConfigError(
                f"an emulation with prefix {emu.prefix!r} exists "
                f"({len(spaces)} namespaces, {len(links)} links); "
                f"`wallbreak emulate down --prefix {emu.prefix}` removes it, or pass --force"
            )
        down(emu.prefix)
    try:
        for cmd in up_commands(emu):
            _run(cmd)
    except BaseException:
        down(emu.prefix)  # never leave half an emulation behind
        raise
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path(emu.prefix), asdict(emu))
    return state_path(emu.prefix)


def load_state(prefix: str = DEFAULT_PREFIX) -> Emulation:
    path = state_path(prefix)
    if not path.is_file():
        raise ConfigError(
            f"no emulation with prefix {prefix!r} is up (no {path}); run `wallbreak emulate up`"
        )
    return Emulation.from_json(path.read_text())


def describe(emu: Emulation) -> str:
    lines = [f"emulation {emu.prefix!r}: {len(emu.nodes)} nodes, rates x {emu.scale}"]
    for n in emu.nodes:
        lines.append(
            f"  {n.netns:<8} {n.cluster}/{n.host}: {emu.fabric_if} {n.fabric_addr} {n.fabric_mbit:g} Mbit/s, "
            f"{emu.eth_if} {n.eth_addr} {n.eth_mbit:g} Mbit/s"
        )
    for c, mbit in emu.uplink_mbit.items():
        lines.append(f"  uplink {c} <-> other clusters: {mbit:g} Mbit/s")
    lines.append("  latency is NOT emulated (no netem on this kernel); only bandwidth is shaped")
    return "\n".join(lines)
