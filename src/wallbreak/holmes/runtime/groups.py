"""Process groups from the plan, each built while its own NIC variables are set.

gloo reads GLOO_SOCKET_IFNAME and NCCL reads its NCCL_* variables when a communicator is created,
so each group is created with its variables in place and then forced to connect (a barrier)
before they are restored. The binding is then *checked*, not assumed: the sockets the group
opened are looked up in /proc and their local addresses mapped to interfaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from wallbreak.holmes.plan.plan_file import RunPlan
from wallbreak.holmes.runtime.nccl_check import DebugLog, NetworkReport, parse

SIOCGIFADDR = 0x8915


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def socket_inodes() -> set[int]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                out.add(int(target[8:-1]))
    return out


def local_addresses(inodes: set[int]) -> set[str]:
    """Local IPs of the TCP sockets with these inodes (from /proc/net/tcp and tcp6)."""
    found = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        with contextlib.suppress(OSError), open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                parts = line.split()
                if int(parts[9]) not in inodes:
                    continue
                hexip = parts[1].split(":")[0]
                raw = bytes.fromhex(hexip)
                if width == 8:
                    ip = str(ipaddress.IPv4Address(raw[::-1]))
                else:  # four little-endian 32-bit words
                    ip6 = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
                    ip = str(ip6.ipv4_mapped or ip6)
                found.add(ip)
    return found


def interface_of(ip: str) -> str | None:
    for _, name in socket.if_nameindex():
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    return None


def nccl_options(net: str | None) -> tuple[Any, str]:
    """ProcessGroupNCCL options carrying the group's network as `config.net_name`, and how it was set.

    torch binds `ncclConfig_t.netName` as `ProcessGroupNCCL.Options().config.net_name` in builds
    with NCCL 2.17+ (torch/csrc/distributed/c10d/init.cpp); elsewhere only `NCCL_NET` carries it.
    """
    if not net:
        return None, "NCCL chooses"
    cls = getattr(dist, "ProcessGroupNCCL", None)
    opts = cls.Options() if cls is not None else None
    config = getattr(opts, "config", None)
    if config is None or not hasattr(config, "net_name"):
        return None, f"NCCL_NET={net} (this torch has no ncclConfig_t.netName binding)"
    config.net_name = net
    return opts, f"NCCL_NET={net} and config.net_name={net}"


@dataclass
class Groups:
    pg: dict[str, Any] = field(default_factory=dict)  # kind -> this rank's ProcessGroup
    ranks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    interfaces: dict[str, list[str]] = field(default_factory=dict)  # kind -> interfaces seen in use
    wanted: dict[str, str | None] = field(default_factory=dict)
    nccl: dict[str, NetworkReport] = field(default_factory=dict)  # kind -> what NCCL says it used
    nccl_via: dict[str, str] = field(default_factory=dict)  # kind -> how the network was requested


def build_groups(
    plan: RunPlan, rank: int, timeout_s: float, backend: str, nccl_log: DebugLog | None = None
) -> Groups:
    """Create every group of the plan (all ranks, same order) and record what this rank's use."""
    out = Groups()
    for g in plan.groups:
        env = dict(g.env)
        if g.ifname:  # gloo reads it per group; NCCL_SOCKET_IFNAME is per process (node scripts)
            env["GLOO_SOCKET_IFNAME"] = g.ifname
        mine = rank in g.ranks
        before = socket_inodes() if mine else set()
        opts, via = nccl_options(g.env.get("NCCL_NET")) if backend == "nccl" else (None, "")
        with environment(env):
            pg = dist.new_group(
                list(g.ranks), timeout=timedelta(seconds=timeout_s), backend=backend, pg_options=opts
            )
            if mine and len(g.ranks) > 1:
                dist.barrier(group=pg)  # connect now, while this group's variables are set
        if nccl_log is not None:
            lines = nccl_log.new_lines()  # read by every rank, so the next group's lines start fresh
            if mine:
                out.nccl[g.kind] = parse(lines)
        if mine:
            out.pg[g.kind] = pg
            out.ranks[g.kind] = g.ranks
            out.wanted[g.kind] = g.ifname
            if via:
                out.nccl_via[g.kind] = via
            if len(g.ranks) > 1:
                ips = local_addresses(socket_inodes() - before)
                out.interfaces[g.kind] = sorted({interface_of(ip) or ip for ip in ips})
    return out


def tied_group(plan: RunPlan, rank: int, timeout_s: float, backend: str) -> Any:
    """Megatron's embedding group: for a model with tied embeddings split over several stages, the
    first and last stage's ranks of each (data-parallel, tensor-parallel) position, which sum their
    copies' gradients before the step. Every rank creates every group (same order); returns this
    rank's, or None."""
    if not plan.model.tied or plan.pp == 1:
        return None
    lay, mine = plan.layout, None
    for d in range(lay.dp):
        for k in range(lay.tp):
            ranks = [lay.rank(0, d, k), lay.rank(lay.pp - 1, d, k)]
            pg = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s), backend=backend)
            if rank in ranks:
                mine = pg
    return mine
