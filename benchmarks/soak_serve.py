"""Soak test: many concurrent streaming clients against `wallbreak serve` for a fixed time.

    python benchmarks/soak_serve.py [--bundle DIR] [--clients 100] [--seconds 60] [--max-queue 64]

Without --bundle the server uses the default bundle (built on first run). The script starts the
server, runs the clients, samples the server's resident memory every 2 s, stops everything and
prints one JSON object: request counts by outcome, errors other than 429, and the memory trend
after warm-up. It exits non-zero if any request failed with something other than a deliberate 429.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

from wallbreak.common.net import free_port

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a rainbow forms.",
    "Continue the story: The old lighthouse keeper opened the door and",
    "Give me three tips for learning a new language.",
    "The history of the printing press begins",
]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "wallbreak.cli", "serve", "--port", str(port)]
    cmd += ["--max-queue", str(a.max_queue)]
    if a.bundle:
        cmd += ["--bundle", a.bundle]
    proc = subprocess.Popen(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # the first run builds the default bundle
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None:
                print(json.dumps({"error": "server exited", "code": proc.returncode}))
                return 1
            time.sleep(0.5)
    outcomes: Counter[str] = Counter()
    errors: list[str] = []
    tokens = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + a.seconds

    def client(i: int) -> None:
        rnd = random.Random(i)
        while time.monotonic() < stop_at:
            body = {
                "model": "coe",
                "messages": [{"role": "user", "content": rnd.choice(PROMPTS)}],
                "max_tokens": a.max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            req = urllib.request.Request(
                f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    done = False
                    for raw in r:
                        line = raw.decode().strip()
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: ") and '"usage"' in line:
                            u = json.loads(line[6:]).get("usage")
                            if u:
                                with lock:
                                    tokens[0] += u["completion_tokens"]
                        elif line.startswith("data: ") and '"error"' in line:
                            with lock:
                                errors.append(line[:200])
                    with lock:
                        outcomes["200" if done else "incomplete"] += 1
            except urllib.error.HTTPError as e:
                with lock:
                    outcomes[str(e.code)] += 1
                    if e.code != 429:
                        errors.append(f"{e.code}: {e.read()[:200]!r}")
                if e.code == 429:
                    time.sleep(float(e.headers.get("Retry-After", "1")))
            except OSError as e:
                with lock:
                    outcomes["connection-error"] += 1
                    errors.append(repr(e)[:200])

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples = []
    while time.monotonic() < stop_at:
        samples.append((round(time.monotonic() - t0, 1), round(rss_mb(proc.pid), 1)))
        time.sleep(2)
    for t in threads:
        t.join(timeout=300)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    warm = [m for t, m in samples if t >= min(15.0, a.seconds / 4)]
    out = {
        "clients": a.clients,
        "seconds": a.seconds,
        "outcomes": dict(outcomes),
        "completion_tokens": tokens[0],
        "errors_other_than_429": len(errors),
        "first_errors": errors[:5],
        "rss_mb_after_warmup": warm[0] if warm else None,
        "rss_mb_end": warm[-1] if warm else None,
        "rss_mb_max_after_warmup": max(warm) if warm else None,
        "rss_samples": samples,
        "server_exit_code": code,
    }
    print(json.dumps(out))
    bad = errors or outcomes.get("incomplete") or outcomes.get("connection-error")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
