"""The Holmes runtime under torchrun (gloo, CPU): pp=2 x dp=2 with an uneven split must train
exactly like one process; resume must continue the same loss curve; bad plans fail on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import one_process_training
from wallbreak.holmes.plan.launch import emit_launch
from wallbreak.holmes.plan.report import make_report
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import parse_topology
from wallbreak.holmes.runtime import checkpoint
from wallbreak.holmes.runtime.data import read_text
from wallbreak.holmes.runtime.gpt import GPTConfig

CPU_CLUSTER = """
name: localhost
gpu: {name: cpu, peak_tflops: 0.05, memory_gib: 8}
clusters:
  - name: local
    nodes: 1
    gpus_per_node: 4
    nic: {kind: ethernet, gbps: 10}
    intra_node: {kind: pcie, gbps: 100}
"""
MODEL = dict(layers=4, hidden=32, heads=4, seq_len=16, vocab=256)
STEPS = 5
LR = 1e-3


def make_plan(
    tmp: Path, layers: list[int] | None = None, pp: int = 2, dp: int = 2, tp: int = 1, **edit: object
) -> Path:
    m = ModelSpec("tiny", MODEL["layers"], MODEL["hidden"], MODEL["heads"], MODEL["seq_len"], MODEL["vocab"])
    report = make_report(
        parse_topology(CPU_CLUSTER, "cpu"),
        m,
        TrainingSpec(global_batch=8, micro_batch=2),
        tp=tp,
        pp=pp,
        dp=dp,
    )
    out = tmp / f"launch-{tp}x{pp}x{dp}"
    emit_launch(report, out)
    path = out / "plan.json"
    raw = json.loads(path.read_text())
    if layers is not None:
        for s, n in zip(raw["stages"], layers, strict=True):
            s["layers"] = n
    raw.update(edit)
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("data") / "corpus.txt"
    f.write_text(
        "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(400))
    )
    return f


def torchrun(plan: Path, nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "wallbreak.holmes.runtime.train", "--plan", str(plan), *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def reference(corpus: Path, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same model, data and optimizer in one process, on the whole global batch at once."""
    return one_process_training(GPTConfig(**MODEL), read_text(corpus), 8, steps, LR)  # type: ignore[arg-type]


def stage_params(ckpt: Path, step: int, layers: list[int]) -> dict[str, torch.Tensor]:
    """Rename each stage's parameters back to the full model's names."""
    out = {}
    start = 0
    for s, n in enumerate(layers):
        st = checkpoint.read_stage(ckpt / f"step-{step:08d}", s)["model"]
        for k, v in st.items():
            if k.startswith("blocks."):
                _, i, rest = k.split(".", 2)
                k = f"blocks.{start + int(i)}.{rest}"
            out[f"L{k}"] = v
        start += n
    return out


def losses(log: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


@pytest.mark.parametrize(("schedule", "tp", "dp"), [("gpipe", 1, 2), ("1f1b", 1, 2), ("1f1b", 2, 1)])
def test_pp2_uneven_matches_one_process(
    tmp_path: Path, corpus: Path, schedule: str, tp: int, dp: int
) -> None:
    """pp=2 x dp=2 (both schedules), and pp=2 x tp=2 (tensor parallel from outside the model)."""
    plan = make_plan(tmp_path, layers=[3, 1], tp=tp, dp=dp)
    ck = tmp_path / "ck"
    r = torchrun(plan, 4, "--steps", str(STEPS), "--schedule", schedule, "--data", str(corpus),
                 "--lr", str(LR), "--checkpoint-dir", str(ck))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ref_losses, ref_params = reference(corpus, STEPS)
    got = losses(ck / "train.jsonl")
    assert got == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    params = stage_params(ck, STEPS, [3, 1])
    assert params.keys() == ref_params.keys()
    for k, v in ref_params.items():
        torch.testing.assert_close(params[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # Each group reports the interface it uses; all of them are the loopback here.
    assert f"rank 0 {'dp' if dp > 1 else 'tp'} group [0, 1]: interface lo" in r.stderr


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pp4_matched_by_order_alone_matches_one_process(tmp_path: Path, corpus: Path, schedule: str) -> None:
    """Four stages, so middle stages talk to both neighbours, four micro-batches each way, and every
    message carries the same tag (NCCL ignores tags): any send/receive order the two sides disagree
    on hands a stage the wrong tensor (or deadlocks), and the losses would leave the reference."""
    from wallbreak.holmes.runtime import pipeline

    assert pipeline.TAG == 0  # one tag for every message, on gloo as on NCCL
    plan = make_plan(tmp_path, layers=[1, 1, 1, 1], pp=4, dp=1)
    r = torchrun(plan, 4, "--steps", "3", "--schedule", schedule, "--data", str(corpus), "--lr", str(LR),
                 "--log-file", str(tmp_path / "log.jsonl"), timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "log.jsonl") == pytest.approx(reference(corpus, 3)[0], rel=1e-5, abs=1e-6)


def test_resume_continues_the_same_loss_curve(tmp_path: Path, corpus: Path) -> None:
    """Three steps, then a resumed run to six: the curve is the uninterrupted one (the one-process
    reference, which the pp tests above show every layout equals)."""
    plan = make_plan(tmp_path, layers=[2, 2])
    first = torchrun(plan, 4, "--steps", "3", "--data", str(corpus), "--checkpoint-dir", str(tmp_path / "b"))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(
        plan, 4, "--steps", "6", "--data", str(corpus), "--checkpoint-dir", str(tmp_path / "b"), "--resume"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 3" in resumed.stderr
    assert losses(tmp_path / "b" / "train.jsonl") == pytest.approx(
        reference(corpus, 6)[0], rel=1e-5, abs=1e-6
    )
    # A checkpoint from another plan is refused, clearly.
    other = make_plan(tmp_path, layers=[3, 1])
    bad = torchrun(
        other, 4, "--steps", "6", "--data", str(corpus), "--checkpoint-dir", str(tmp_path / "b"), "--resume"
    )
    assert bad.returncode != 0 and "written by a different plan" in bad.stderr


@pytest.mark.parametrize(
    ("edit", "nproc", "needle"),
    [
        ({}, 2, "the plan is for 4 processes but torchrun started 2"),
        ({"stages": [{"index": 0, "cluster": "local", "layers": 3, "ranks": [0, 1]},
                     {"index": 1, "cluster": "local", "layers": 3, "ranks": [2, 3]}]}, 4, "sum to 6"),
        ({"stages": [{"index": 0, "cluster": "local", "layers": 2, "ranks": [0, 1]},
                     {"index": 1, "cluster": "local", "layers": 2, "ranks": [2]}]}, 4,
         "holds ranks [2]; the layout gives it [2, 3]"),
    ],
)  # fmt: skip
def test_bad_plans_fail_on_every_rank_without_hanging(
    tmp_path: Path, corpus: Path, edit: dict[str, object], nproc: int, needle: str
) -> None:
    plan = make_plan(tmp_path, **edit)  # type: ignore[arg-type]
    r = torchrun(plan, nproc, "--steps", "2", "--data", str(corpus), timeout=120)
    assert r.returncode != 0
    assert r.stderr.count(needle) == nproc, r.stderr[-2000:]


def test_killed_rank_restarts_and_resumes_the_same_curve(tmp_path: Path, corpus: Path) -> None:
    """torchrun --max-restarts 1: kill one worker mid-run; the restarted job resumes from the last
    checkpoint and ends on exactly the losses of an uninterrupted run."""
    import signal
    import time

    plan = make_plan(tmp_path, layers=[2, 2])
    common = ["--steps", "40", "--data", str(corpus), "--checkpoint-every", "1"]  # killed at step 5 or so
    ref = torchrun(plan, 4, *common, "--checkpoint-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    ck = tmp_path / "killed"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
        "--max-restarts=1", "-m", "wallbreak.holmes.runtime.train", "--plan", str(plan), *common,
        "--checkpoint-dir", str(ck),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log = ck / "train.jsonl"
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 5:
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if (
                    b"wallbreak.holmes.runtime.train" in cmdline
                    and b"RANK=2" in environ
                    and str(ck).encode() in cmdline
                ):
                    os.kill(int(pid), signal.SIGKILL)
                    killed = int(pid)
                    break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=240)
    assert killed is not None, "the run finished before a worker could be killed"
    assert proc.returncode == 0, err[-3000:]
    assert "resuming after step" in err
    last: dict[int, float] = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        last[rec["step"]] = rec["loss"]
    assert [last[s] for s in sorted(last)] == losses(tmp_path / "ref" / "train.jsonl")


@pytest.mark.netns
def test_each_group_uses_the_interface_its_plan_names(tmp_path: Path, corpus: Path) -> None:
    """Two interfaces on one machine (loopback and one end of a veth pair): data-parallel groups
    on lo, pipeline groups on the veth; the runtime checks each group's sockets and reports them."""
    import shutil

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to add a veth pair")
    dev = "wbtest0"
    subprocess.run(["ip", "link", "del", dev], capture_output=True)
    subprocess.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", "wbtest1"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.77.0.1/32", "dev", dev], check=True)
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        plan = make_plan(tmp_path, layers=[2, 2])
        raw = json.loads(plan.read_text())
        for g in raw["groups"]["dp"]:
            g["ifname"] = "lo"
        for g in raw["groups"]["pp"]:
            g["ifname"] = dev
        plan.write_text(json.dumps(raw))
        r = torchrun(plan, 4, "--steps", "2", "--data", str(corpus))
        assert r.returncode == 0, r.stderr[-3000:]
        for rank in range(4):
            assert f"rank {rank} pp group" in r.stderr
        assert f"rank 0 pp group [0, 2]: interface {dev} (plan: {dev})" in r.stderr
        assert "rank 3 dp group [2, 3]: interface lo (plan: lo)" in r.stderr
    finally:
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
