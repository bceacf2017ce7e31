"""Soak test: many concurrent clients against `wallbreak serve` for a fixed time, with the mix that
once failed in the field.

    python benchmarks/soak_serve.py [--bundle DIR] [--clients 100] [--seconds 120] [--max-queue 64]

Each request picks, at random: `model: "coe"` or one expert pinned by name; streaming or not; a
short question or a long text to continue (past Gemma-3's 512-token sliding window); and a few
streaming clients hang up mid-stream. Without --bundle the server uses the default bundle (built
on first run). The script samples the server's resident memory every 2 s, stops everything and
prints one JSON object: request counts by outcome, any error, and the memory trend. It exits
non-zero on any 5xx or broken stream (a deliberate 429 is fine, and so is a client's own hang-up).
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
from typing import Any

from wallbreak.coe.server.net import free_port

LONG_WORDS = ["the", "river", "mountain", "village", "story", "old", "history", "morning", "city", "water"]
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


class Clients:
    """The load: each client loops over random requests of the mix until the time is up."""

    def __init__(self, url: str, seconds: float, max_tokens: int) -> None:
        listed = json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"]
        self.models = [m["id"] for m in listed]  # "coe" and every expert by name
        self.url, self.max_tokens = url, max_tokens
        self.stop_at = time.monotonic() + seconds
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self.tokens = [0]
        self.lock = threading.Lock()

    def body_for(self, rnd: random.Random) -> dict[str, Any]:
        prompt = rnd.choice(PROMPTS)
        if rnd.random() < 0.25:  # a long text: hundreds of tokens, past a 512-token sliding window
            prompt = " ".join(rnd.choice(LONG_WORDS) for _ in range(rnd.randint(300, 700)))
        body: dict[str, Any] = {
            "model": rnd.choice(self.models),
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": rnd.choice([8, self.max_tokens, 2 * self.max_tokens]),
            "temperature": rnd.choice([0, 0.7]),
            "stream": rnd.random() < 0.6,
        }
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        return body

    def record(self, outcome: str, error: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if error:
                self.errors.append(error[:300])

    def one(self, rnd: random.Random) -> None:
        body = self.body_for(rnd)
        hang_up = body["stream"] and rnd.random() < 0.15
        req = urllib.request.Request(
            f"{self.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            if not body["stream"]:
                out = json.loads(r.read())
                with self.lock:
                    self.tokens[0] += out["usage"]["completion_tokens"]
                self.record("200")
                return
            done = False
            for n, raw in enumerate(r):
                line = raw.decode().strip()
                if hang_up and n >= 4:
                    self.record("client-hung-up")
                    return  # closing the response drops the connection mid-stream
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"error"' in line:
                    self.record("stream-error", line)
                    return
                elif line.startswith("data: ") and '"usage"' in line:
                    u = json.loads(line[6:]).get("usage")
                    if u:
                        with self.lock:
                            self.tokens[0] += u["completion_tokens"]
            self.record("200" if done else "incomplete", None if done else "stream ended without [DONE]")

    def client(self, i: int) -> None:
        rnd = random.Random(i)
        while time.monotonic() < self.stop_at:
            try:
                self.one(rnd)
            except urllib.error.HTTPError as e:
                if e.code == 429:
                    self.record("429")
                    time.sleep(float(e.headers.get("Retry-After", "1")))
                else:
                    self.record(str(e.code), f"{e.code}: {e.read()[:300]!r}")
            except OSError as e:
                self.record("connection-error", repr(e))


def start_server(a: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
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
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(json.dumps({"error": "server exited", "code": proc.returncode})) from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(json.dumps({"error": "server did not come up in 900 s"}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    proc, url = start_server(a)
    load = Clients(url, a.seconds, a.max_tokens)
    threads = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(a.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples = []
    while time.monotonic() < load.stop_at:
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
        "outcomes": dict(load.outcomes),
        "completion_tokens": load.tokens[0],
        "errors": len(load.errors),
        "first_errors": load.errors[:5],
        "rss_mb_after_warmup": warm[0] if warm else None,
        "rss_mb_end": warm[-1] if warm else None,
        "rss_mb_max_after_warmup": max(warm) if warm else None,
        "rss_samples": samples,
        "server_exit_code": code,
    }
    print(json.dumps(out))
    return 1 if load.errors or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
