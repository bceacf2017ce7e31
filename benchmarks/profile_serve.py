"""Where a serving run's time goes: py-spy samples of `wallbreak serve` under load, by thread and
by what the thread was doing, with each thread's CPU seconds from /proc.

    python benchmarks/profile_serve.py --bundle DIR [--host-budget 4GB] [--device-budget 1.1GB]
        [--direct-io on] [--experts N] [--concurrency 64] [--requests 200] [--max-tokens 32]

The server runs in its own process (policy `ours`, the bench's Zipf 1.0 sequence over the first N
experts), warmed as `bench serve` warms it; then py-spy (`record --threads`, 100 Hz, on-CPU
samples only) runs for the whole timed load. Each sample is put in one bucket by its thread and
innermost recognised frame:
  decode, prefill, sampling, scheduling, weights (tier loads and copies), disk reads,
  http (the event loop and its worker threads), other.
Reported: samples per bucket (each 10 ms of one thread on CPU), CPU seconds per thread kind from
/proc/PID/task (utime + stime), the run's wall time and figures. Prints one JSON object.
py-spy must be installed (`pip install py-spy`); as root it needs nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from wallbreak.coe.bench.serve import BenchServeArgs, _Server, drive, zipf_sequence
from wallbreak.coe.bundle.manifest import Bundle

# Innermost frame first: the first pattern any frame of a sample matches (searched from the leaf up).
BUCKETS: list[tuple[str, re.Pattern[str]]] = [
    ("disk reads", re.compile(r"tiers/disk\.py|preadv|_read_extent|read_into")),
    ("weights", re.compile(r"tiers/(manager|device|host)\.py|bind_to_flat|copy_")),
    ("sampling", re.compile(r"engine/sampling\.py")),
    ("prefill", re.compile(r"prefill")),
    ("decode", re.compile(r"engine/(step|aot|compiled)\.py|run_step|_decode")),
    ("scheduling", re.compile(r"engine/scheduler\.py|engine/engine\.py|engine/runner\.py")),
    ("http", re.compile(r"uvicorn|starlette|fastapi|anyio|asyncio|server/")),
]
PY_SPY = str(next((p for p in [Path(sys.executable).parent / "py-spy"] if p.exists()), "py-spy"))
SAMPLE = re.compile(r"^thread \((\d+)\): ([^;]*);(.*) (\d+)$")


def bucket(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pat in BUCKETS:
            if pat.search(frame):
                return name
    return "other"


def thread_kind(name: str) -> str:
    for prefix in ("wb-engine", "wb-disk", "wb-prefetch", "wb-compile", "wb-live", "MainThread", "AnyIO"):
        if name.startswith(prefix):
            return prefix
    return "other"


def cpu_by_tid(pid: int) -> dict[int, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--host-budget", type=int)
    ap.add_argument("--device-budget", type=int)
    ap.add_argument("--direct-io", default="on")
    ap.add_argument("--experts", type=int, default=None, help="the first N experts (default all)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--compile", default="auto")
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    names = bundle.names[: args.experts or len(bundle.names)]
    a = BenchServeArgs(bundle=args.bundle, host_budget=args.host_budget, device_budget=args.device_budget,
                       direct_io=args.direct_io, requests=args.requests, compile=args.compile)  # fmt: skip
    seq = zipf_sequence(a.workload, names, a.requests, a.seed)
    with _Server(a, "ours") as srv, tempfile.TemporaryDirectory() as tmp:
        assert srv.proc is not None
        pid = srv.proc.pid
        drive(srv.url, seq[: args.concurrency], args.concurrency, 2)
        raw = Path(tmp) / "raw.txt"
        spy = subprocess.Popen(
            [PY_SPY, "record", "--pid", str(pid), "--threads", "--rate", "100", "--format", "raw",
             "-o", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)
        cpu0 = cpu_by_tid(pid)
        res = drive(srv.url, seq, args.concurrency, args.max_tokens)
        cpu1 = cpu_by_tid(pid)
        spy.send_signal(2)  # py-spy writes its file on SIGINT
        spy.wait(timeout=60)
        lines = raw.read_text().splitlines() if raw.is_file() else []
    by_bucket: Counter[str] = Counter()
    by_thread_bucket: dict[str, Counter[str]] = {}
    names_of: dict[int, str] = {}
    for line in lines:
        m = SAMPLE.match(line)
        if not m:
            continue
        tid, tname, stack, n = int(m[1]), m[2], m[3], int(m[4])
        names_of[tid] = tname
        b = bucket(stack.split(";"))
        by_bucket[b] += n
        by_thread_bucket.setdefault(thread_kind(tname), Counter())[b] += n
    cpu: Counter[str] = Counter()
    for tid, t1 in cpu1.items():
        cpu[thread_kind(names_of.get(tid, "other"))] += t1 - cpu0.get(tid, 0.0)
    out = {
        "experts": len(names),
        "concurrency": args.concurrency,
        "run": {k: res[k] for k in ("req_per_s", "tokens_per_s", "p50_s", "p99_s", "failed", "wall_s")},
        "samples_by_bucket": dict(by_bucket.most_common()),
        "samples_by_thread": {k: dict(v.most_common()) for k, v in by_thread_bucket.items()},
        "cpu_s_by_thread": {k: round(v, 2) for k, v in cpu.most_common()},
        "cpu_s_total": round(sum(cpu.values()), 2),
        "cores_busy": round(sum(cpu.values()) / res["wall_s"], 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
