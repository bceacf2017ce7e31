"""The Holmes runtime under torchrun (gloo, CPU), refereed by transformers: stages built from
transformers' modules under pp x dp and pp x tp train exactly like AutoModelForCausalLM with
torch's AdamW, clipping and schedule in one process; checkpoints reshard across plans; an export
loads with from_pretrained; bad plans fail on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import hf_reference
from wallbreak.holmes.export import export, load_model
from wallbreak.holmes.plan.launch import emit_launch
from wallbreak.holmes.plan.report import make_report
from wallbreak.holmes.plan.source import resolve_model
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import parse_topology
from wallbreak.holmes.runtime.data import read_text, tokenize
from wallbreak.holmes.runtime.optim import OptimSpec

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
SEQ, BATCH, STEPS = 16, 8, 5
# Warm-up, cosine, weight decay and a clip low enough to act: every part of the optimizer is refereed.
OPTIM = OptimSpec(lr=1e-3, min_lr=1e-4, warmup_steps=2, weight_decay=0.1, clip_grad=0.5)
OPTIM_ARGS = ["--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "2", "--weight-decay", "0.1",
              "--clip-grad", "0.5"]  # fmt: skip
TINY = {"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "vocab_size": 256, "max_position_embeddings": 64}  # fmt: skip
ARCHS = {
    "llama": {"model_type": "llama", **TINY},
    "qwen2": {"model_type": "qwen2", **TINY},  # q/k/v biases
    "smollm2-like": {"model_type": "llama", **TINY, "tie_word_embeddings": True},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models as transformers saves them: the folders `--model` takes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    root = tmp_path_factory.mktemp("models")
    for i, (name, c) in enumerate(ARCHS.items()):
        torch.manual_seed(i)
        body = {k: v for k, v in c.items() if k != "model_type"}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c["model_type"], **body))
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def make_plan(
    tmp: Path, model: ModelSpec | Path, layers: list[int] | None = None, pp: int = 2, dp: int = 2,
    tp: int = 1, recompute: str = "none", dtype: str = "fp32", **edit: object,
) -> Path:  # fmt: skip
    m = model if isinstance(model, ModelSpec) else resolve_model(str(model), SEQ)
    report = make_report(parse_topology(CPU_CLUSTER, "cpu"), m,
                         TrainingSpec(global_batch=BATCH, micro_batch=2, recompute=recompute, dtype=dtype),
                         tp=tp, pp=pp, dp=dp)  # fmt: skip
    out = tmp / f"launch-{tp}x{pp}x{dp}-{len(list(tmp.glob('launch-*')))}"
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
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def tokens_of(corpus: Path) -> torch.Tensor:
    return tokenize(read_text(corpus), None, 256)


def log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(path: Path) -> list[float]:
    return [r["loss"] for r in log(path)]


@pytest.mark.parametrize(
    ("arch", "tp", "dp", "schedule"),
    [("llama", 1, 2, "1f1b"), ("llama", 2, 1, "gpipe"), ("qwen2", 1, 2, "gpipe"), ("qwen2", 2, 1, "1f1b"),
     ("smollm2-like", 1, 2, "1f1b"), ("smollm2-like", 2, 1, "1f1b"), ("smollm2-like", 1, 2, "interleaved")],
)  # fmt: skip
def test_pp2_trains_exactly_like_transformers(
    tmp_path: Path, corpus: Path, models: dict[str, Path], arch: str, tp: int, dp: int, schedule: str
) -> None:
    """pp=2 (uneven: 3 + 1 layers) x dp=2, and pp=2 x tp=2 (DTensor from outside the model): the
    first loss is transformers' own loss on the same batch, every later loss and, after 5 AdamW
    steps with clipping and the schedule, every parameter are the one-process run's. The tied
    model's two embedding copies (first and last stage) stay one matrix. Interleaved 1F1B (two
    chunks per rank, torch's schedule) computes the same numbers."""
    spec = resolve_model(str(models[arch]), SEQ)
    plan = make_plan(tmp_path, spec, layers=[2, 2] if schedule == "interleaved" else [3, 1], tp=tp, dp=dp)
    ck = tmp_path / "ck"
    r = torchrun(plan, 4, "--steps", str(STEPS), "--schedule", schedule, "--data", str(corpus),
                 "--checkpoint-dir", str(ck), *OPTIM_ARGS)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ref_losses, ref_params, ref_model = hf_reference(spec, tokens_of(corpus), BATCH, STEPS, OPTIM)
    got = log(ck / "train.jsonl")
    assert [g["loss"] for g in got] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert max(g["grad_norm"] for g in got) > OPTIM.clip_grad  # the clip acted
    trained, _ = load_model(ck)  # DCP reassembles the stages' and shards' pieces
    params = dict(trained.named_parameters())
    assert params.keys() == ref_params.keys()
    for k, v in ref_params.items():
        torch.testing.assert_close(params[k], v, rtol=1e-4, atol=1e-5, msg=k)
    if arch == "smollm2-like" and tp == 1:
        # Export: transformers loads the folder, and its logits are the trained model's.
        from transformers import AutoModelForCausalLM

        out = export(ck, tmp_path / "export")
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert loaded.config.tie_word_embeddings
        ids = tokens_of(corpus)[: 2 * SEQ].reshape(2, SEQ)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ref_model(ids).logits, rtol=1e-4, atol=1e-5)
    assert f"rank 0 {'dp' if dp > 1 else 'tp'} group [0, 1]: interface lo" in r.stderr


def test_pp4_matched_by_order_alone_with_recompute(tmp_path: Path, corpus: Path) -> None:
    """Four stages, so middle stages talk to both neighbours, four micro-batches each way, and every
    message carries the same tag (NCCL ignores tags): any send/receive order the two sides disagree
    on hands a stage the wrong tensor (or deadlocks), and the losses would leave the reference.
    Activation checkpointing per layer (--recompute full) changes no number."""
    from wallbreak.holmes.runtime import pipeline

    assert pipeline.TAG == 0  # one tag for every message, on gloo as on NCCL
    spec = ModelSpec.preset("llama-tiny", SEQ)
    plan = make_plan(tmp_path, spec, layers=[1, 1, 1, 1], pp=4, dp=1, recompute="full")
    r = torchrun(plan, 4, "--steps", "3", "--data", str(corpus), "--log-file", str(tmp_path / "log.jsonl"),
                 *OPTIM_ARGS, timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ref = hf_reference(spec, tokens_of(corpus), BATCH, 3, OPTIM)[0]
    assert losses(tmp_path / "log.jsonl") == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_checkpoints_reshard_across_plans_and_the_curve_continues(
    tmp_path: Path, corpus: Path, models: dict[str, Path]
) -> None:
    """pp2 x dp2 for 2 steps, then pp4 x dp1 to 4, then pp1 x tp2 x dp2 to 6, each resuming the
    last one's DCP checkpoint: the losses are those of one uninterrupted run."""
    spec = resolve_model(str(models["smollm2-like"]), SEQ)
    ck = tmp_path / "ck"
    common = ["--data", str(corpus), "--checkpoint-dir", str(ck), "--decay-steps", "6", *OPTIM_ARGS]
    legs = [(make_plan(tmp_path, spec, pp=2, dp=2), 2), (make_plan(tmp_path, spec, pp=4, dp=1), 4),
            (make_plan(tmp_path, spec, pp=1, dp=2, tp=2), 6)]  # fmt: skip
    for i, (plan, upto) in enumerate(legs):
        r = torchrun(plan, 4, "--steps", str(upto), *common, *(["--resume"] if i else []))
        assert r.returncode == 0, r.stderr[-3000:]
        if i:
            assert f"resuming after step {legs[i - 1][1]}" in r.stderr and "resharded to" in r.stderr
    o = OptimSpec(**{**OPTIM.__dict__, "decay_steps": 6})
    ref = hf_reference(spec, tokens_of(corpus), BATCH, 6, o)[0]
    assert losses(ck / "train.jsonl") == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # (Another model's checkpoint is refused: tests/unit/test_checkpoint.py.)


def test_bf16_autocast_trains_close_to_fp32(tmp_path: Path, corpus: Path) -> None:
    """--dtype bf16: autocast over fp32 weights, bf16 on the pipeline's wire; the losses stay within
    bf16's rounding of the fp32 reference, and are not identical to it (bf16 really ran)."""
    spec = ModelSpec.preset("llama-tiny", SEQ)
    plan = make_plan(tmp_path, spec, dtype="bf16")
    r = torchrun(plan, 4, "--steps", "2", "--data", str(corpus), "--log-file", str(tmp_path / "l.jsonl"),
                 *OPTIM_ARGS)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ref = hf_reference(spec, tokens_of(corpus), BATCH, 2, OPTIM)[0]
    got = losses(tmp_path / "l.jsonl")
    assert got == pytest.approx(ref, rel=2e-2) and got != pytest.approx(ref, rel=1e-6)


def test_a_bad_plan_fails_on_every_rank_without_hanging(tmp_path: Path, corpus: Path) -> None:
    """Every rank checks the plan before any collective and says what is wrong (the checks
    themselves are unit-tested on load_plan in tests/unit/test_layout.py)."""
    stages = [{"index": 0, "cluster": "local", "layers": 3, "ranks": [0, 1]},
              {"index": 1, "cluster": "local", "layers": 3, "ranks": [2, 3]}]  # fmt: skip
    plan = make_plan(tmp_path, ModelSpec.preset("llama-tiny", SEQ), stages=stages)
    r = torchrun(plan, 4, "--steps", "2", "--data", str(corpus), timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("sum to 6") == 4, r.stderr[-2000:]


def test_killed_rank_restarts_and_resumes_the_same_curve(tmp_path: Path, corpus: Path) -> None:
    """torchrun --max-restarts 1: kill one worker mid-run; the restarted job resumes from the last
    checkpoint and ends on exactly the losses of an uninterrupted run."""
    import signal
    import time

    spec = ModelSpec.preset("llama-tiny", SEQ)
    plan = make_plan(tmp_path, spec, layers=[2, 2])
    common = ["--steps", "20", "--data", str(corpus), "--checkpoint-every", "1", *OPTIM_ARGS]
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
    ref = hf_reference(spec, tokens_of(corpus), BATCH, 20, OPTIM)[0]
    assert [last[s] for s in sorted(last)] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # Exporting it: a preset has no tokenizer, which a bundle's expert needs; an existing --out stays.
    from wallbreak.errors import ConfigError
    from wallbreak.holmes.export import export_to_bundle

    with pytest.raises(ConfigError, match=r"names no tokenizer .* give --tokenizer DIR"):
        export_to_bundle(ck, tmp_path / "bundle", "tuned")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        export(ck, tmp_path / "taken")


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
        plan = make_plan(tmp_path, ModelSpec.preset("llama-tiny", SEQ), layers=[2, 2])
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
