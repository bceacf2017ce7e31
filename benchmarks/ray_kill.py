"""The replicas' fault check: kill a replica of `wallbreak serve --ray` in the middle of a request run.

    python benchmarks/ray_kill.py --bundle DIR [--replicas 2] [--requests 200] [--concurrency 16]
        [--max-tokens 32] [--kill-at 0.3] [--device-budget 76MiB] [--host-budget 150MiB]

Starts the server (a local Ray), sends `--requests` non-streaming completions at random experts
from `--concurrency` client threads, SIGKILLs replica 0's process once `--kill-at` of them have
finished, and prints JSON: the count of each HTTP status, how many failures were *not* retryable
(anything but 200, or 429/503 without Retry-After), how many requests the ingress moved to another
replica, and whether Ray brought the replica back.
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
from pathlib import Path
from typing import Any

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.server.net import free_port


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)
    except OSError:
        return -1, {}  # the connection itself failed: the worst outcome, counted as not retryable


def health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        return dict(json.loads(r.read()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--kill-at", type=float, default=0.3, help="share of requests finished before the kill")
    p.add_argument("--device-budget")
    p.add_argument("--host-budget")
    a = p.parse_args()
    experts = Bundle.open(a.bundle).names
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "wallbreak.cli", "serve", "--ray", "--replicas", str(a.replicas),
           "--bundle", str(a.bundle), "--port", str(port)]  # fmt: skip
    cmd += ["--device-budget", a.device_budget] if a.device_budget else []
    cmd += ["--host-budget", a.host_budget] if a.host_budget else []
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if all(r["up"] for r in health(url)["replicas"]):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("the server did not come up")
            time.sleep(1)
        victim = health(url)["replicas"][0]["pid"]
        rng = random.Random(0)
        todo = [rng.choice(experts) for _ in range(a.requests)]
        outcomes: list[tuple[int, bool]] = []
        lock = threading.Lock()
        killed = threading.Event()

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    expert = todo.pop()
                body = {"model": expert, "prompt": "Tell me about the sea.", "max_tokens": a.max_tokens}
                status, headers = post(f"{url}/v1/completions", body)
                retry = status in (429, 503) and any(k.lower() == "retry-after" for k in headers)
                with lock:
                    outcomes.append((status, retry))
                    if len(outcomes) >= a.kill_at * a.requests and not killed.is_set():
                        killed.set()
                        os.kill(victim, signal.SIGKILL)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(5)
        h = health(url)
        back = h["replicas"][0]["up"] and h["replicas"][0].get("pid") not in (None, victim)
        print(json.dumps({
            "requests": a.requests,
            "statuses": dict(Counter(str(s) for s, _ in outcomes)),
            "not_retryable_failures": sum(1 for s, r in outcomes if s != 200 and not r),
            "retried_by_ingress": h["retried_requests"],
            "killed_pid": victim,
            "replica_back": back,
            "wall_s": round(wall, 2),
            "req_per_s": round(len(outcomes) / wall, 2),
        }))  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
