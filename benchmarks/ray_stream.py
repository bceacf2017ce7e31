"""One expert's streams through `wallbreak serve --ray` against plain `wallbreak serve`, in one run.

    python benchmarks/ray_stream.py --bundle DIR --expert NAME [--modes plain,ray1] [--clients 1,4]
        [--requests 3] [--max-tokens 64] [--rounds 2] [--compile off]

Each mode starts its own server on the bundle (`plain`: `wallbreak serve`; `rayN`: `--ray
--replicas N` on a local Ray), waits for /health, loads the expert with one request, then for each
client count sends `--requests` chat answers per client through the official `openai` client and
prints JSON: completion tokens per second for each mode, client count and round (modes alternate
within a round), and the engine's intra-op threads from /health.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from wallbreak.coe.server.net import free_port


def wait_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
                h = dict(json.loads(r.read()))
            if all(r["up"] for r in h.get("replicas", [])) and h["engine"].get("intra_op_threads"):
                return h
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server did not come up: {log.read_text()[-2000:]}")


def one_mode(mode: str, args: argparse.Namespace, clients: list[int]) -> dict[str, Any]:
    from openai import OpenAI  # the referee client

    port = free_port()
    cmd = [sys.executable, "-m", "wallbreak.cli", "serve", "--bundle", str(args.bundle), "--port", str(port),
           "--compile", args.compile]  # fmt: skip
    if mode.startswith("ray"):
        cmd += ["--ray", "--replicas", mode[3:]]
    log = Path(f"/tmp/ray_stream_{mode}.log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        h = wait_up(url, proc, log)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600)

        def ask(n: int) -> int:
            msg = [{"role": "user", "content": f"Tell me a story about the number {n}."}]
            r = client.chat.completions.create(
                model=args.expert, messages=msg, max_tokens=args.max_tokens, temperature=0
            )
            assert r.usage is not None
            return r.usage.completion_tokens

        ask(0)  # the expert's first load is not what this measures
        out: dict[str, Any] = {"intra_op_threads": h["engine"]["intra_op_threads"]}
        for c in clients:
            tokens: list[int] = []

            def worker(i: int) -> None:
                for j in range(args.requests):
                    tokens.append(ask(100 * i + j + 1))

            t0 = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[f"tokens_per_s_{c}_clients"] = round(sum(tokens) / (time.perf_counter() - t0), 1)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(180)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--expert", required=True)
    p.add_argument("--modes", default="plain,ray1", help="plain and/or rayN, comma-separated")
    p.add_argument("--clients", default="1,4")
    p.add_argument("--requests", type=int, default=3, help="answers per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", default="off", choices=["on", "off"])
    args = p.parse_args()
    modes = args.modes.split(",")
    for m in modes:
        if m != "plain" and not (m.startswith("ray") and m[3:].isdigit() and int(m[3:]) >= 1):
            p.error(f"--modes {m!r}: give plain or rayN (N replicas)")
    clients = [int(c) for c in args.clients.split(",")]
    runs = [{"round": r, "mode": m, **one_mode(m, args, clients)} for r in range(args.rounds) for m in modes]
    print(json.dumps({"expert": args.expert, "max_tokens": args.max_tokens, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
