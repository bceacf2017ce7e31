"""Start-up verification on NCCL: what each communicator's init logged, against its NCCL_NET.

The lines follow NCCL's INFO format (host:pid:tid [dev] NCCL INFO ...). No GPU runs here, so these
are written from that format, not captured from a run: the device check script is what runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wallbreak.holmes.runtime.nccl_check import DebugLog, mismatch, parse

IB_INIT = [
    "a0:1234:1234 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/RoCE [1]mlx5_1:1/RoCE ; OOB eth0:10.0.1.1<0>",
    "a0:1234:1234 [0] NCCL INFO Using network IB",
    "a0:1234:1301 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/IB/0",
]
SOCKET_INIT = [
    "a0:1234:1234 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.1.1<0>",
    "a0:1234:1234 [0] NCCL INFO Using network Socket",
    "a0:1234:1302 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/Socket/0",
]


def test_parse_names_the_network_and_devices() -> None:
    ib = parse(IB_INIT)
    assert ib.networks == {"IB"} and ib.channels == {"IB"}
    assert ib.devices["IB"] == "[0]mlx5_0:1/RoCE [1]mlx5_1:1/RoCE"
    assert ib.describe() == "network IB (IB: [0]mlx5_0:1/RoCE [1]mlx5_1:1/RoCE)"
    assert mismatch("IB", ib) is None
    sock = parse(SOCKET_INIT)
    assert mismatch("IB", sock) == "its NCCL_NET is IB but NCCL used Socket"
    assert mismatch("Socket", sock) is None
    assert parse(["x NCCL INFO Channel 00 : 0[0] -> 1[1] via P2P/IPC"]).describe().startswith("no network")


def test_debug_log_reads_each_groups_lines_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("NCCL_DEBUG", "NCCL_DEBUG_FILE", "NCCL_DEBUG_SUBSYS"):
        monkeypatch.setenv(k, "")  # recorded, so the test's own settings are undone afterwards
        monkeypatch.delenv(k)
    log = DebugLog.enable(tmp_path)
    assert log is not None
    import os

    assert os.environ["NCCL_DEBUG"] == "INFO" and os.environ["NCCL_DEBUG_FILE"] == str(log.path)
    assert log.new_lines() == []  # nothing written yet
    log.path.write_text("\n".join(IB_INIT) + "\n")
    assert parse(log.new_lines()).networks == {"IB"}
    with open(log.path, "a") as f:
        f.write("\n".join(SOCKET_INIT) + "\n")
    assert parse(log.new_lines()).networks == {"Socket"}  # only the second group's lines
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    assert DebugLog.enable(tmp_path) is None  # the user's own NCCL_DEBUG is left alone


def test_group_network_goes_to_config_net_name_where_torch_binds_it(monkeypatch):
    from types import SimpleNamespace

    import torch.distributed as dist

    from wallbreak.holmes.runtime.groups import nccl_options

    assert nccl_options(None) == (None, "NCCL chooses")
    if not hasattr(dist, "ProcessGroupNCCL"):  # CPU builds of torch: only NCCL_NET carries it
        opts, via = nccl_options("IB")
        assert opts is None and "no ncclConfig_t.netName" in via

    class Options:  # the shape torch binds with NCCL >= 2.17: Options().config.net_name
        def __init__(self):
            self.config = SimpleNamespace(net_name=None)

    monkeypatch.setattr(dist, "ProcessGroupNCCL", SimpleNamespace(Options=Options), raising=False)
    opts, via = nccl_options("Socket")
    assert opts.config.net_name == "Socket" and via == "NCCL_NET=Socket and config.net_name=Socket"
