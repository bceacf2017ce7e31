"""The emulator for real: namespaces, bridges, shaped veths (root; marked netns)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wallbreak.errors import ConfigError
from wallbreak.holmes.emulate import netns as emulate
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import load_topology

pytestmark = pytest.mark.netns
SMALL = Path(__file__).parents[2] / "examples" / "clusters" / "emu-small.yaml"
PREFIX = "wbt"
MODEL, TRAINING = ModelSpec.llama("tiny", 2, 64, 2, 32, 256), TrainingSpec(8, 2, "none", "fp32")


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs iproute2 ({', '.join(missing)} not found)"
    r = subprocess.run(["ip", "netns", "add", f"{PREFIX}probe"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create network namespaces here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"{PREFIX}probe"], capture_output=True)
    return None


@pytest.fixture()
def emu() -> Iterator[emulate.Emulation]:
    why = _can_make_namespaces()
    if why:
        pytest.skip(why)
    plan = emulate.plan_emulation(load_topology(SMALL), scale=0.01, prefix=PREFIX)
    emulate.up(plan, force=True)
    try:
        yield plan
    finally:
        emulate.down(PREFIX)


def test_up_then_down_leaves_nothing_even_after_a_crash(emu: emulate.Emulation) -> None:
    spaces, links = emulate.existing(PREFIX)
    assert len(spaces) == 4 and len(links) == 17
    with pytest.raises(ConfigError, match="exists"):
        emulate.up(emu)  # no clobbering unless asked
    emulate.state_path(PREFIX).unlink()  # as if the run that made it had been killed
    emulate.down(PREFIX)
    assert emulate.existing(PREFIX) == ([], [])
    assert emulate.down(PREFIX) == []  # idempotent


RATE = """
import socket, sys, time
mode, addr = sys.argv[1], sys.argv[2]
if mode == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 5201)); s.listen(1)
    c, _ = s.accept(); n = 0; t0 = None
    while (b := c.recv(1 << 20)):
        if t0 is None: t0 = time.perf_counter()
        else: n += len(b)
    print(n * 8 / (time.perf_counter() - t0) / 1e6)
else:
    s = socket.create_connection((addr, 5201)); end = time.perf_counter() + 2.5
    while time.perf_counter() < end: s.sendall(b"x" * 65536)
    s.close()
"""


def _measure(src_ns: str, dst_ns: str, addr: str) -> float:
    recv = subprocess.Popen(["ip", "netns", "exec", dst_ns, sys.executable, "-c", RATE, "recv", addr],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(0.5)
    subprocess.run(
        ["ip", "netns", "exec", src_ns, sys.executable, "-c", RATE, "send", addr], check=True, timeout=60
    )
    out, _ = recv.communicate(timeout=60)
    return float(out)


@pytest.mark.parametrize(
    ("src", "dst", "kind", "mbit"),
    [(0, 1, "fabric", 1000), (0, 2, "eth", 100), (3, 0, "eth", 100)],  # fabric; across clusters, both ways
)
def test_a_shaped_link_carries_its_set_rate(
    emu: emulate.Emulation, src: int, dst: int, kind: str, mbit: float
) -> None:
    a, b = emu.nodes[src], emu.nodes[dst]
    got = _measure(a.netns, b.netns, b.fabric_addr if kind == "fabric" else b.eth_addr)
    # tbf is a cap: never above it; far below it would mean a wrong unit (a busy machine slows it)
    assert 0.3 * mbit < got < 1.15 * mbit, got


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, Any]]:
    """One `bench holmes` run on emu-small (all four placements), shared by the tests that read it;
    with the emulation's state right after it."""
    why = _can_make_namespaces()
    if why:
        pytest.skip(why)
    from wallbreak.holmes.emulate.run import EmuJob, bench_holmes

    job = EmuJob(SMALL, load_topology(SMALL), MODEL, TRAINING, 4, (1, 2, 2), 0.01, PREFIX, timeout_s=300)
    try:
        res = bench_holmes(job)
        yield res | {"state_after": emulate.load_state(PREFIX)}
    finally:
        emulate.down(PREFIX)


def test_the_trainer_runs_on_the_emulated_cluster_with_its_groups_on_their_nics(
    bench: dict[str, Any],
) -> None:
    """The runtime checks every group's sockets against its NIC at start-up and stops on a mismatch,
    so a run that completes had its DP groups on fab0 (holmes) or everything on eth0 (megatron)."""
    ref = one_process_losses(MODEL, TRAINING, 4)
    for placement in ("holmes", "megatron"):
        r = bench["placements"][placement]
        assert (r["tp"], r["pp"], r["dp"]) == (1, 2, 2)
        assert r["measured"]["iteration_s"] > 0 and r["measured"]["steps"] == 2
        # The emulated network changes the time, never the arithmetic: same losses as one process.
        assert r["measured"]["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-6), placement
        assert r["job"]["split"] == [1, 1] and r["job"]["placement"] == placement


def one_process_losses(model: ModelSpec, training: TrainingSpec, steps: int) -> list[float]:
    """The trainer's defaults (seed 0, the default optimizer, the default corpus) in transformers."""
    from helpers import hf_reference
    from wallbreak.holmes.runtime.data import default_corpus, read_text, tokenize

    tokens = tokenize(read_text(default_corpus()), None, model.vocab)
    return hf_reference(model, tokens, training.global_batch, steps)[0]


def test_bench_holmes_runs_every_placement_and_leaves_the_last_emulation_up(bench: dict[str, Any]) -> None:
    assert list(bench["placements"]) == ["holmes", "megatron", "all-rdma", "all-ethernet"]
    assert bench["speedup_holmes_vs_megatron"] > 0 and bench["holmes_vs_all_rdma"] > 0
    assert bench["state_after"].uplink_mbit == {"ib": 100, "roce": 100}  # all-ethernet's, torn down after
