"""Train -> serve, as a user runs it: plan a fine-tune of a tied SmolLM2-like model on the emulated
two-cluster file, prepare local text with its tokenizer, `wallbreak train` a few steps, `wallbreak
export` the checkpoint into a CoE bundle as a third expert (int8), fit the router, serve, and ask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import ServerThread, fit_test_router, http, make_tiny_llama_folder

EXAMPLES = Path(__file__).parents[2] / "examples"


def wallbreak(*args: str) -> None:
    """The CLI, in this process (what `wallbreak ARGS` runs); `train` starts torchrun itself."""
    from wallbreak.cli import main

    assert main(list(args)) == 0, args


def train(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "wallbreak.cli", "train", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_fine_tune_export_into_a_bundle_and_serve(tmp_path: Path, tiny_bert: Path) -> None:
    from safetensors.torch import load_file

    from wallbreak.coe.bundle.importers import synth_bundle
    from wallbreak.coe.bundle.manifest import Bundle, iter_blob_tensors
    from wallbreak.coe.server.serve import ServeOptions

    base = make_tiny_llama_folder(tmp_path / "base", tie=True)
    (tmp_path / "text.txt").write_text(
        "Holmes places each kind of traffic on the links that carry it.\n" * 60
    )
    launch, data, ck = tmp_path / "launch", tmp_path / "data", tmp_path / "ck"
    cluster = EXAMPLES / "clusters" / "emu-small.yaml"
    wallbreak("plan", str(cluster), "--model", str(base), "--seq-len", "32", "--global-batch", "4",
              "--micro-batch", "1", "--dtype", "fp32", "--emit-launch", str(launch))  # fmt: skip
    wallbreak("data", "prepare", str(tmp_path / "text.txt"), "--tokenizer", str(base), "--out", str(data))
    r = train("--plan", str(launch / "plan.json"), "--steps", "3", "--data", str(data),
              "--checkpoint-dir", str(ck), "--lr", "1e-2")  # fmt: skip
    steps = [json.loads(x) for x in (ck / "train.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3] and steps[-1]["loss"] < steps[0]["loss"], r.stderr[-2000:]

    bundle = tmp_path / "bundle"
    synth_bundle(bundle, experts=2, params=300_000, names=["alpha", "gamma"], seed=3)
    wallbreak("export", str(ck), "--bundle", str(bundle), "--name", "beta", "--dtype", "int8",
              "--description", "a fine-tune", "--example", "links and traffic")  # fmt: skip
    b = Bundle.open(bundle)
    assert sorted(b.experts) == ["alpha", "beta", "gamma"] and b.experts["beta"].dtype == "int8"
    # The expert holds the trained weights, not the base's (its norms are stored unquantized).
    before = load_file(str(base / "model.safetensors"))["model.norm.weight"]
    after = dict(iter_blob_tensors(b.read_blob("beta"), b.experts["beta"]))["model.norm.weight"]
    assert not torch.allclose(before, after.float(), atol=1e-3)

    fit_test_router(bundle, tiny_bert)  # the router learns the third expert
    with ServerThread(ServeOptions(bundle=bundle)) as s:
        models = json.loads(http("GET", f"{s.url}/v1/models")[2])
        assert "beta" in {m["id"] for m in models["data"]}
        status, _, text = http("POST", f"{s.url}/v1/chat/completions", {
            "model": "beta", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
        })  # fmt: skip
        assert status == 200, text
        reply = json.loads(text)
        assert reply["model"] == "beta" and reply["usage"]["completion_tokens"] >= 1
