"""Only the engine thread runs torch's intra-op threads in a serving process (coe/cores.py).

Run in a child process: the rule changes process-wide torch settings that the rest of the suite
must not inherit. The child is given two OpenMP threads whatever the machine's cores, so a team
(one more OS thread) is visible in /proc/self/task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SERVING = r"""
import json, os, sys, threading, time
import torch
from wallbreak.coe import cores

cores.keep_to_one_core()  # what `wallbreak serve` does first
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.engine import Engine, EngineConfig, Request, SamplingParams
from wallbreak.coe.tiers import TierConfig, TierManager
from wallbreak.coe.tokenization import load_tokenizers

bundle = Bundle.open(sys.argv[1])
size = max(e.total_bytes for e in bundle.experts.values())
tiers = TierManager(bundle, TierConfig(host_budget=4 * size, device_budget=2 * size))
config = EngineConfig(**json.loads(sys.argv[2]))
engine = Engine(bundle, tiers, load_tokenizers(bundle, tiers.entries), config)
engine.start()

def ask(expert, n, wait_s):
    done = threading.Event()
    engine.submit(Request(expert=expert, prompt_ids=[1, 2, 3], params=SamplingParams(max_tokens=n),
                          emit=lambda ev: done.set() if ev.finish_reason or ev.error else None))
    assert done.wait(wait_s), "the request did not finish"
"""  # a child process set up as `wallbreak serve` sets one up, its engine built from argv[2]

CHILD = (
    SERVING
    + r"""
def tasks():
    return len(os.listdir("/proc/self/task"))

def matmul():
    a = torch.randn(256, 256)
    return float((a @ a).sum())

ask(bundle.names[0], 4, 120)
out = {"main": torch.get_num_threads(), "engine": engine.stats.intra_op_threads}
time.sleep(0.5)
before = tasks()
seen, hold = {}, threading.Event()

def other():  # an HTTP worker that routes a prompt, say: it lives on after its work
    seen["other"] = torch.get_num_threads()
    matmul()
    hold.wait()

t = threading.Thread(target=other)
t.start()
time.sleep(0.5)
out["tasks_added_by_other"] = tasks() - before
out["on_all_cores"] = cores.on_all_cores(torch.get_num_threads)
late = threading.Thread(target=lambda: seen.__setitem__("late", torch.get_num_threads()))
late.start(); late.join()
hold.set(); t.join()
engine.stop(timeout=5)
tiers.close()
print(json.dumps(out | seen))
"""
)


def run_child(script: str, bundle: Path, config: dict, timeout: float) -> dict:
    """`script` in a child process with two OpenMP threads, its engine's `EngineConfig(**config)`;
    the JSON it printed last."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run(
        [sys.executable, "-c", script, str(bundle), json.dumps(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_only_the_engine_thread_runs_an_openmp_team(synth_bundle_dir: Path) -> None:
    got = run_child(CHILD, synth_bundle_dir, {"compile": "off"}, timeout=300)
    assert got["engine"] == 2  # the decode steps run on both threads
    assert got["main"] == 1 and got["other"] == 1 and got["late"] == 1  # every other thread: one
    assert got["tasks_added_by_other"] == 1  # the thread itself, and no team of its own
    assert got["on_all_cores"] == 2  # a start-up job may have both, on a thread that ends


DYNAMO_CHILD = (
    SERVING
    + r"""
expert = bundle.names[0]
ask(expert, 2, 300)  # its first step starts the background compile
key = engine.layouts[expert]
deadline = time.monotonic() + 600
while engine.steps.state.get(key) != "ready":
    assert engine.steps.state.get(key) != "eager" and time.monotonic() < deadline
    time.sleep(0.2)
ask(expert, 8, 300)
ask(bundle.names[1], 8, 300)  # a switch: same architecture, same graph
out = {"compiled_steps": engine.steps.compiled_steps, "recompiles": engine.steps.recompiles}
engine.stop(timeout=5)
tiers.close()
print(json.dumps(out))
"""
)


def test_a_step_compiled_in_the_background_is_not_recompiled_on_the_engine_thread(
    synth_bundle_dir: Path,
) -> None:
    """torch.compile's graphs are guarded on the calling thread's intra-op thread count, and in a
    serving process only the engine thread has every core: the background compile must trace with
    the engine thread's count, or the first compiled step recompiles on the engine thread."""
    got = run_child(
        DYNAMO_CHILD, synth_bundle_dir, {"compile": "all", "compile_backend": "dynamo"}, timeout=600
    )
    assert got["compiled_steps"] > 0 and got["recompiles"] == 0, got
