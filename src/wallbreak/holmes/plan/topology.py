"""Cluster spec (YAML) -> a typed, validated topology.

Every error names the key, its line in the file where known, and what is allowed. The transport rule
follows NCCL: RDMA works only between NICs of the same RDMA kind inside one cluster; anything else
falls back to TCP at the Ethernet rate of the link between the two sides.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from wallbreak.errors import ConfigError

NIC_KINDS = ("infiniband", "roce", "ethernet")
RDMA_KINDS = ("infiniband", "roce")
INTRA_KINDS = ("nvlink", "pcie")


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float
    memory_gib: float
    efficiency: float | None = None  # achieved share of peak in matmuls; None: the training default


@dataclass(frozen=True)
class Link:
    kind: str
    gbps: float
    latency_us: float = 0.0
    count: int = 1

    @property
    def total_gbps(self) -> float:
        """All ports together (per node for a NIC)."""
        return self.gbps * self.count

    @property
    def rdma(self) -> bool:
        return self.kind in RDMA_KINDS


@dataclass(frozen=True)
class Host:
    name: str
    address: str | None = None
    ifname: str | None = None  # the interface of the cluster NIC (RDMA traffic, or all traffic)
    tcp_ifname: str | None = None  # the Ethernet interface for socket traffic; None: ifname
    hca: str | None = None  # RDMA devices for NCCL_IB_HCA, e.g. "mlx5_0,mlx5_1" (None: NCCL picks)


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    gpus_per_node: int
    nic: Link
    intra_node: Link
    gpu: GPU
    hosts: tuple[Host, ...] = ()
    ethernet: Link | None = None  # the nodes' TCP NIC; None: the inter-cluster Ethernet rate

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Topology:
    name: str
    clusters: tuple[Cluster, ...]
    inter_cluster: Link
    links: dict[frozenset[str], Link] = field(default_factory=dict)
    # GPUs that share fewer compute units than they number (an emulation on one machine's cores):
    # how many compute at once. None: every GPU computes on its own.
    shared_compute: float | None = None

    @property
    def gpus(self) -> int:
        return sum(c.gpus for c in self.clusters)

    def cluster(self, name: str) -> Cluster:
        for c in self.clusters:
            if c.name == name:
                return c
        raise ConfigError(f"no cluster {name!r}; clusters are: {', '.join(c.name for c in self.clusters)}")

    def tcp(self, name: str) -> Link:
        """What a node of this cluster gets over sockets: its Ethernet NIC (an Ethernet 'nic' is one)."""
        c = self.cluster(name)
        if c.ethernet is not None:
            return c.ethernet
        if c.nic.kind == "ethernet":
            return c.nic
        return Link(
            "ethernet", self.inter_cluster.gbps, self.inter_cluster.latency_us, self.inter_cluster.count
        )

    def map_network(self, fn: Callable[[Link], Link]) -> Topology:
        """The same topology with `fn` applied to every network link (NICs, Ethernet, inter-cluster
        links); links inside a node are left alone."""
        clusters = tuple(
            replace(c, nic=fn(c.nic), ethernet=fn(c.ethernet) if c.ethernet else None) for c in self.clusters
        )
        links = {k: fn(v) for k, v in self.links.items()}
        return replace(self, clusters=clusters, inter_cluster=fn(self.inter_cluster), links=links)

    def network_scaled(self, factor: float) -> Topology:
        """Every network link at `factor` times its rate: what `wallbreak emulate --scale` builds."""
        return self.map_network(lambda ln: replace(ln, gbps=ln.gbps * factor))

    def between(self, a: str, b: str, rdma: bool = True) -> Link:
        """The transport two nodes use: their RDMA NICs inside one cluster, else TCP over Ethernet.

        `rdma=False` models a job whose NCCL was told once, process-wide, to stay off RDMA
        (NCCL_IB_DISABLE=1): every inter-node byte then goes over sockets.
        """
        ca = self.cluster(a)
        self.cluster(b)  # an unknown name is an error, not a silent Ethernet link
        if a == b:
            return ca.nic if ca.nic.rdma and rdma else self.tcp(a)
        link = self.links.get(frozenset((a, b)), self.inter_cluster)
        slow = min((self.tcp(a), self.tcp(b), link), key=lambda x: x.total_gbps)
        return Link("ethernet", slow.gbps, max(link.latency_us, slow.latency_us), slow.count)


# ----------------------------------------------------------------------------------------------
# Loading, with line numbers for every key


class _Doc:
    """A YAML document as plain Python values plus the line of every key path."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}
        try:
            node = yaml.compose(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{source}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
        if node is None:
            raise ConfigError(f"{source}: the file is empty; it needs at least 'clusters:'")
        self.value = self._walk(node, "")

    def _walk(self, node: yaml.Node, path: str) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out = {}
            for k, v in node.value:
                key = str(k.value)
                out[key] = self._walk(v, f"{path}.{key}" if path else key)
                self.lines.setdefault(f"{path}.{key}" if path else key, k.start_mark.line + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._walk(v, f"{path}[{i}]") for i, v in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))

    def err(self, path: str, msg: str) -> ConfigError:
        line = self.lines.get(path)
        where = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{where}: {path}: {msg}")


def _get(
    doc: _Doc, obj: dict[str, Any], path: str, key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    full = f"{path}.{key}" if path else key
    if key not in obj:
        if default is ...:
            raise doc.err(path or key, f"missing field {key!r}")
        return default
    val = obj[key]
    if kind in (float, (float,)) and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if not isinstance(val, kind) or (isinstance(val, bool) and kind is not bool):
        words = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
        kinds = (kind,) if isinstance(kind, type) else kind
        raise doc.err(full, f"must be {' or '.join(words.get(k, k.__name__) for k in kinds)}, got {val!r}")
    return val


# The one rule for names that reach node scripts, namespaces and file names: cluster, host and
# interface names. Addresses and HCA lists have their own characters, and no shell meta-character.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,252}$")
_HCA = re.compile(r"^[A-Za-z0-9=^][A-Za-z0-9._:,=^-]{0,252}$")
_RULES = {
    "name": (NAME, "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    "address": (_ADDRESS, "a host name or an IP address (letters, digits, '.', ':', '_', '-')"),
    "hca": (_HCA, "an NCCL_IB_HCA list (letters, digits, '.', '_', ':', ',', '=', '^', '-')"),
}


def _name(doc: _Doc, obj: dict[str, Any], path: str, key: str, rule: str = "name", default: Any = ...) -> Any:
    """A string field that must match one of the `_RULES` (None stays None where it is allowed)."""
    val = _get(doc, obj, path, key, str, default)
    pattern, allowed = _RULES[rule]
    if val is not None and not pattern.match(val):
        raise doc.err(f"{path}.{key}" if path else key, f"{val!r} is not allowed: use {allowed}")
    return val


def _positive(doc: _Doc, path: str, value: float, what: str) -> float:
    if value <= 0:
        raise doc.err(path, f"{what} must be positive, got {value}")
    return value


def _link(doc: _Doc, obj: Any, path: str, kinds: tuple[str, ...], with_count: bool = False) -> Link:
    if not isinstance(obj, dict):
        raise doc.err(path, f"must be a mapping like {{kind: {kinds[0]}, gbps: 100}}")
    allowed = {"kind", "gbps", "latency_us"} | ({"count"} if with_count else set())
    for k in obj:
        if k not in allowed:
            raise doc.err(f"{path}.{k}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
    kind = _get(doc, obj, path, "kind", str)
    if kind not in kinds:
        raise doc.err(f"{path}.kind", f"unknown kind {kind!r}; allowed: {', '.join(kinds)}")
    gbps = _positive(doc, f"{path}.gbps", _get(doc, obj, path, "gbps", float), "bandwidth")
    lat = _get(doc, obj, path, "latency_us", float, 0.0)
    if lat < 0:
        raise doc.err(f"{path}.latency_us", f"latency must not be negative, got {lat}")
    count = _get(doc, obj, path, "count", int, 1) if with_count else 1
    if count < 1:
        raise doc.err(f"{path}.count", f"count must be >= 1, got {count}")
    return Link(kind, gbps, lat, count)


def _gpu(doc: _Doc, obj: Any, path: str) -> GPU:
    if not isinstance(obj, dict):
        raise doc.err(path, "must be a mapping like {name: A100-80GB, peak_tflops: 312, memory_gib: 80}")
    for k in obj:
        if k not in {"name", "peak_tflops", "memory_gib", "efficiency"}:
            raise doc.err(f"{path}.{k}", "unknown key; allowed: efficiency, memory_gib, name, peak_tflops")
    eff = _get(doc, obj, path, "efficiency", float, None)
    if eff is not None and not 0 < eff <= 1:
        raise doc.err(f"{path}.efficiency", f"must be a share of peak in (0, 1], got {eff}")
    return GPU(
        efficiency=eff,
        name=_get(doc, obj, path, "name", str),
        peak_tflops=_positive(
            doc, f"{path}.peak_tflops", _get(doc, obj, path, "peak_tflops", float), "peak_tflops"
        ),
        memory_gib=_positive(
            doc, f"{path}.memory_gib", _get(doc, obj, path, "memory_gib", float), "memory_gib"
        ),
    )


_CLUSTER_KEYS = {"name", "nodes", "gpus_per_node", "nic", "intra_node", "gpu", "hosts", "ethernet"}
_TOP_KEYS = {"name", "gpu", "clusters", "inter_cluster", "links"}


def _hosts(doc: _Doc, c: dict[str, Any], path: str, nodes: int) -> tuple[Host, ...]:
    """A cluster's optional host list: one per node, for launch files."""
    hosts: list[Host] = []
    for j, h in enumerate(_get(doc, c, path, "hosts", list, [])):
        hp = f"{path}.hosts[{j}]"
        if not isinstance(h, dict):
            raise doc.err(hp, "must be a mapping like {name: a0, address: 10.0.0.1, ifname: ib0}")
        for k in h:
            if k not in {"name", "address", "ifname", "tcp_ifname", "hca"}:
                raise doc.err(f"{hp}.{k}", "unknown key; allowed: address, hca, ifname, name, tcp_ifname")
        hosts.append(
            Host(
                _name(doc, h, hp, "name"),
                _name(doc, h, hp, "address", "address", None),
                _name(doc, h, hp, "ifname", "name", None),
                _name(doc, h, hp, "tcp_ifname", "name", None),
                _name(doc, h, hp, "hca", "hca", None),
            )
        )
    if hosts and len(hosts) != nodes:
        raise doc.err(f"{path}.hosts", f"lists {len(hosts)} host(s) but nodes is {nodes}")
    return tuple(hosts)


def parse_topology(text: str, source: str = "<cluster spec>") -> Topology:
    doc = _Doc(text, source)
    top = doc.value
    if not isinstance(top, dict):
        raise doc.err("", "the top level must be a mapping with 'clusters:'")
    for k in top:
        if k not in _TOP_KEYS:
            raise doc.err(k, f"unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}")
    default_gpu = _gpu(doc, top["gpu"], "gpu") if "gpu" in top else None
    raw_clusters = _get(doc, top, "", "clusters", list)
    if not raw_clusters:
        raise doc.err("clusters", "needs at least one cluster")
    clusters: list[Cluster] = []
    for i, c in enumerate(raw_clusters):
        path = f"clusters[{i}]"
        if not isinstance(c, dict):
            raise doc.err(path, "must be a mapping with name, nodes, gpus_per_node and nic")
        for k in c:
            if k not in _CLUSTER_KEYS:
                raise doc.err(f"{path}.{k}", f"unknown key; allowed: {', '.join(sorted(_CLUSTER_KEYS))}")
        name = _name(doc, c, path, "name")
        if any(x.name == name for x in clusters):
            raise doc.err(f"{path}.name", f"cluster name {name!r} is used twice")
        nodes = int(_positive(doc, f"{path}.nodes", _get(doc, c, path, "nodes", int), "nodes"))
        gpn = int(
            _positive(doc, f"{path}.gpus_per_node", _get(doc, c, path, "gpus_per_node", int), "gpus_per_node")
        )
        if "gpu" in c:
            gpu = _gpu(doc, c["gpu"], f"{path}.gpu")
        elif default_gpu is not None:
            gpu = default_gpu
        else:
            raise doc.err(path, "missing field 'gpu' (give it here or once at the top level)")
        if "nic" not in c:
            raise doc.err(path, "missing field 'nic'")
        nic = _link(doc, c["nic"], f"{path}.nic", NIC_KINDS, with_count=True)
        intra = (
            _link(doc, c["intra_node"], f"{path}.intra_node", INTRA_KINDS)
            if "intra_node" in c
            else Link("nvlink", 2400.0)
        )
        hosts = _hosts(doc, c, path, nodes)
        eth = (
            _link(doc, c["ethernet"], f"{path}.ethernet", ("ethernet",), with_count=True)
            if "ethernet" in c
            else None
        )
        clusters.append(Cluster(name, nodes, gpn, nic, intra, gpu, hosts, eth))
    names = {c.name for c in clusters}
    inter = (
        _link(doc, top["inter_cluster"], "inter_cluster", NIC_KINDS, with_count=True)
        if "inter_cluster" in top
        else Link("ethernet", 25.0, 100.0)
    )
    links: dict[frozenset[str], Link] = {}
    for i, ln in enumerate(_get(doc, top, "", "links", list, [])):
        path = f"links[{i}]"
        if not isinstance(ln, dict):
            raise doc.err(path, "must be a mapping like {between: [a, b], kind: ethernet, gbps: 25}")
        between = _get(doc, ln, path, "between", list)
        if len(between) != 2 or len(set(between)) != 2:
            raise doc.err(f"{path}.between", f"must name two different clusters, got {between}")
        for b in between:
            if b not in names:
                raise doc.err(
                    f"{path}.between", f"unknown cluster {b!r}; clusters are: {', '.join(sorted(names))}"
                )
        rest = {k: v for k, v in ln.items() if k != "between"}
        links[frozenset(between)] = _link(doc, rest, path, NIC_KINDS, with_count=True)
    return Topology(_name(doc, top, "", "name", "name", "cluster"), tuple(clusters), inter, links)


def load_topology(path: str | Path) -> Topology:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read cluster spec {p}: {e.strerror}") from None
    return parse_topology(text, str(p))
