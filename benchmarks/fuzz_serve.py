"""Fuzz `wallbreak serve` with schemathesis (a fuzzer we did not write) against the OpenAPI schema
the server publishes, while streams run on the same expert; every stream must finish untouched.

    python benchmarks/fuzz_serve.py [--bundle DIR] [--cases 1000] [--streams 4] [--seed 1]

Without --bundle it builds a two-expert synthetic bundle (2,048-token context) in a temporary
folder. The server runs in its own process (compile off, so nothing builds meanwhile). First one
request alone gives the reference text; then `--streams` clients stream that same greedy request
over and over on expert `alpha` while `st run` sends its cases with the official checks
(not_a_server_error, status_code_conformance, content_type_conformance,
response_schema_conformance). Prints one JSON object: schemathesis' case count, failures and
status codes (from its own reports), the slowest 4xx answer, and every stream round (each must
equal the reference). Exits non-zero on a failure, a 5xx or a stream that differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wallbreak.coe.server.net import free_port

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
STREAM = {"model": "alpha", "prompt": "go", "temperature": 0}


def post(url: str, body: dict[str, Any], timeout: float = 300) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


class Streams:
    """`n` clients each streaming STREAM again and again until `stop`; every round's text and end
    are compared with the reference."""

    def __init__(self, url: str, n: int, tokens: int) -> None:
        self.url, self.tokens = url, tokens
        with post(f"{url}/v1/completions", STREAM | {"max_tokens": tokens}) as r:
            choice = json.loads(r.read())["choices"][0]
        self.want = (choice["text"], choice["finish_reason"])
        self.rounds = 0
        self.bad: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(n)]

    def one(self) -> tuple[str, str | None]:
        text, finish = "", None
        with post(f"{self.url}/v1/completions", STREAM | {"max_tokens": self.tokens, "stream": True}) as r:
            for line in r:
                if not line.startswith(b"data: {"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return text, f"error: {ev['error']['message']}"
                text += ev["choices"][0]["text"]
                finish = ev["choices"][0]["finish_reason"] or finish
        return text, finish

    def loop(self) -> None:
        while not self.stop.is_set():
            try:
                got = self.one()
            except OSError as e:
                got = ("", f"{type(e).__name__}: {e}")
            with self.lock:
                self.rounds += 1
                if got != self.want:
                    self.bad.append(f"round {self.rounds}: finish {got[1]!r}, {len(got[0])} characters")

    def __enter__(self) -> Streams:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(600)


def responses(ndjson: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every response schemathesis recorded, with its operation ("POST /v1/completions")."""
    for line in ndjson.read_text().splitlines():
        if '"ScenarioFinished"' not in line:
            continue
        recorder = json.loads(line)["ScenarioFinished"].get("recorder") or {}
        for interaction in (recorder.get("interactions") or {}).values():
            if interaction.get("response"):
                yield recorder.get("label", "?"), interaction["response"]


def schemathesis(url: str, cases: int, seed: int, out: Path) -> dict[str, Any]:
    """`st run` with the official checks; its own reports, summed."""
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "run", f"{url}/openapi.json", "--checks", CHECKS, "--max-examples", str(cases)]
    cmd += ["--seed", str(seed), "--workers", "1", "--no-color", "--generation-database", "none"]
    cmd += ["--request-timeout", "600", "--report", "json,ndjson"]
    cmd += ["--report-json-path", str(out / "run.json"), "--report-ndjson-path", str(out / "run.ndjson")]
    # In `out`: schemathesis keeps a crash cache in its working directory.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * 3600, cwd=out)
    report = json.loads((out / "run.json").read_text())
    seen = list(responses(out / "run.ndjson"))
    codes = Counter(r["status_code"] for _, r in seen)
    slow_4xx = max((r["elapsed"] for _, r in seen if 400 <= r["status_code"] < 500), default=0.0)
    return {
        "exit_code": proc.returncode,
        "cases": report["test_cases"]["generated"],
        "failures": [f.get("title", f) if isinstance(f, dict) else f for f in report["failures"]],
        "errors": report["errors"],
        "responses": len(seen),
        "responses_by_operation": dict(Counter(label for label, _ in seen)),
        "status_codes": dict(sorted(codes.items())),
        "server_errors": sum(n for c, n in codes.items() if c >= 500),
        "slowest_4xx_s": round(slow_4xx, 3),
        "summary": proc.stdout.strip().splitlines()[-3:],
    }


def serve(bundle: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "wallbreak.cli", "serve", "--bundle", str(bundle), "--port", str(port)]
    server = subprocess.Popen([*cmd, "--compile", "off"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr.read().decode()[-2000:]}") from None  # type: ignore[union-attr]
            time.sleep(0.3)
    server.kill()
    raise RuntimeError("the server did not start in 120 s")


def run(bundle: Path, cases: int, streams: int, seed: int, tokens: int, work: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve(bundle, port)
    try:
        t0 = time.monotonic()
        with Streams(url, streams, tokens) as s:
            fuzz = schemathesis(url, cases, seed, work)
        health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return {
        "schemathesis": fuzz,
        "streams": {"clients": streams, "rounds": s.rounds, "differed": s.bad, "tokens_each": tokens},
        "unavailable_after": health["unavailable"],
        "seconds": round(time.monotonic() - t0, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle with an expert named alpha (default: a synthetic one)")
    p.add_argument("--cases", type=int, default=1000, help="schemathesis cases per operation at most")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--stream-tokens", type=int, default=1500)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wallbreak-fuzz-"))
    try:
        bundle = a.bundle
        if bundle is None:
            from wallbreak.coe.bundle.importers import synth_bundle

            bundle = work / "bundle"
            synth_bundle(bundle, experts=2, params=300_000, names=["alpha", "beta"], seed=3)
        res = run(bundle, a.cases, a.streams, a.seed, a.stream_tokens, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    fz = res["schemathesis"]
    ok = fz["exit_code"] == 0 and not fz["server_errors"] and not res["streams"]["differed"]
    return 0 if ok and res["streams"]["rounds"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
