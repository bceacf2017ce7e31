"""Small network helpers shared by the servers' launchers and tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for a server started just after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
