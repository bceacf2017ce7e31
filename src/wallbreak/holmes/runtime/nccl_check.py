"""What NCCL says each communicator used, from its NCCL_DEBUG=INFO log, checked against the plan.

The gloo path verifies a group by the sockets it opened. NCCL's connections are not sockets we can
see (IB verbs), so the runtime asks NCCL: before the first communicator it turns on INFO logging of
the INIT and NET subsystems into a per-process file (unless the user set NCCL_DEBUG), and after
creating each group it reads the lines that group's initialisation appended:
- `NCCL INFO Using network IB|Socket` - the network plugin of the communicator (per init);
- `NCCL INFO NET/IB : Using [0]mlx5_0:1/RoCE ...` / `NET/Socket : Using [0]eth0:...` - devices
  (printed once per process, at the first init of that transport);
- `... via NET/IB/0` - the channels' transport, when a connection goes over the network.
A group whose communicator used another network than its NCCL_NET stops the run.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

NETWORK = re.compile(r"NCCL INFO Using network (\w+)")
DEVICES = re.compile(r"NCCL INFO NET/(\w+) : Using (.+?)\s*(?:;|$)")
CHANNEL = re.compile(r"via NET/(\w+)/")


@dataclass
class NetworkReport:
    networks: set[str] = field(default_factory=set)  # "IB" / "Socket": plugins communicators used
    devices: dict[str, str] = field(default_factory=dict)  # transport -> devices line
    channels: set[str] = field(default_factory=set)  # transports connections went over

    def describe(self) -> str:
        if not self.networks and not self.channels:
            return "no network (connections inside the node)"
        used = ",".join(sorted(self.networks | self.channels))
        devs = "; ".join(f"{k}: {v}" for k, v in sorted(self.devices.items()))
        return f"network {used}" + (f" ({devs})" if devs else "")


def parse(lines: list[str], report: NetworkReport | None = None) -> NetworkReport:
    out = report or NetworkReport()
    for line in lines:
        if m := NETWORK.search(line):
            out.networks.add(m.group(1))
        if m := DEVICES.search(line):
            out.devices[m.group(1)] = m.group(2)
        if m := CHANNEL.search(line):
            out.channels.add(m.group(1))
    return out


def mismatch(wanted: str | None, got: NetworkReport) -> str | None:
    """Why a group's communicator is not on its planned network, or None."""
    if wanted is None:
        return None
    used = got.networks | got.channels
    other = sorted(used - {wanted})
    if other:
        return f"its NCCL_NET is {wanted} but NCCL used {', '.join(other)}"
    return None


class DebugLog:
    """This process's NCCL debug file, read incrementally (each group's lines after its creation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    @classmethod
    def enable(cls, directory: Path) -> DebugLog | None:
        """Turn on INFO logging of INIT and NET into a file, unless the user chose NCCL_DEBUG;
        must run before the first communicator (NCCL reads these once per process)."""
        if os.environ.get("NCCL_DEBUG"):
            return None
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"nccl-{socket.gethostname()}-{os.getpid()}.log"
        os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET", NCCL_DEBUG_FILE=str(path))
        return cls(path)

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self.offset)
                text = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        return text.splitlines()
