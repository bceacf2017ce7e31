"""A server over many experts, from a cold start: time to ready and to the first answer, what the
start read from disk, and the size and latency of /v1/models, /health and /metrics.

    python benchmarks/startup_scale.py BUNDLE [--host-budget 4GB] [--device-budget 1.1GB]

Starts `wallbreak serve` on BUNDLE (page cache dropped first when run as root), then:
- seconds from launch to /health answering, to the first answer by name, and to the first answer
  through the router (`model: coe`);
- the bytes the server process had read from storage when it was ready (/proc/PID/io), against
  the bundle's size: a start that read every blob would show the whole bundle;
- for /v1/models, /health and /metrics: bytes, milliseconds (median of 5), and for /metrics the
  number of series.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.server.net import free_port


def get(url: str, body: Any = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return bytes(r.read())


def read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return -1


def timed(url: str) -> tuple[int, float]:
    sizes, ms = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        sizes.append(len(get(url)))
        ms.append((time.perf_counter() - t0) * 1e3)
    return sizes[-1], round(statistics.median(ms), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--host-budget")
    ap.add_argument("--device-budget")
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle, lenient=True)
    total = sum(e.total_bytes for e in bundle.experts.values())
    if os.geteuid() == 0:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "wallbreak.cli", "serve", "--bundle", str(args.bundle), "--port", str(port)]
    for flag, v in (("--host-budget", args.host_budget), ("--device-budget", args.device_budget)):
        if v:
            cmd += [flag, v]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {"experts": len(bundle.names), "bundle_bytes": total}
    try:
        while True:
            try:
                get(f"{base}/health")
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("the server exited") from None
                time.sleep(0.1)
        out["ready_s"] = round(time.perf_counter() - t0, 2)
        out["read_at_ready_bytes"] = read_bytes(proc.pid)
        ask = {"prompt": "Give me three tips on sourdough baking.", "max_tokens": 8, "temperature": 0}
        get(f"{base}/v1/completions", {"model": bundle.names[-1], **ask})
        out["first_answer_by_name_s"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        routed = json.loads(get(f"{base}/v1/completions", {"model": "coe", **ask}))
        out["first_routed_answer_s"] = round(time.perf_counter() - t1, 2)
        out["routed_to"] = routed.get("model")
        for path in ("/v1/models", "/health", "/metrics"):
            size, ms = timed(base + path)
            out[path] = {"bytes": size, "ms": ms}
        metrics = get(f"{base}/metrics").decode()
        out["/metrics"]["series"] = sum(1 for ln in metrics.splitlines() if ln and not ln.startswith("#"))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
