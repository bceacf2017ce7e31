"""The live-change referee: 16 streams of the official `openai` client run for 60 s while a script
adds an expert, replaces one, pins one and deletes one through the admin API.

Every stream asks its expert one fixed greedy question, so each answer must equal that expert's
answer from one version of its weights (the replaced expert has two). Counted: answers, failed
requests (those to the deleted expert apart), answers that match no version, and the time from
the added expert's import finishing to its first answer. The changes are spaced a tenth of
`--seconds` apart, but each waits for the one before (an import at the lowest priority under 16
busy streams takes minutes), so the run lasts as long as they take, plus 10 s. The experts are
small synthetic Llamas (`--params`), written as Hugging Face folders so the admin API imports
them as a user's would.
Prints one JSON object.

    python benchmarks/live_referee.py [--streams 16] [--seconds 60] [--params 2M] [--ray REPLICAS]

With `--ray N` the server is `wallbreak serve --ray --replicas N` (a local Ray): the same changes
go through the ingress to every replica.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai
import torch
from safetensors.torch import save_file

from wallbreak.coe.bundle.importers import byte_tokenizer_dir, import_expert, synth_shape, synth_tensors
from wallbreak.coe.server.net import free_port
from wallbreak.units import parse_count

KEY, ADMIN = "referee-key", "referee-admin-key"
PROMPT = "the sea"
TOKENS = 32


def hf_folder(out: Path, params: int, seed: int) -> Path:
    """A synthetic Llama as a Hugging Face folder: config, safetensors, byte tokenizer."""
    config = synth_shape(params).llama_config()
    byte_tokenizer_dir(out)
    (out / "config.json").write_text(json.dumps(config))
    save_file(
        {n: t.contiguous() for n, t in synth_tensors(config, seed, torch.float32)},
        str(out / "model.safetensors"),
    )
    return out


def admin(base: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def wait_job(base: str, job: str) -> dict[str, Any]:
    while (j := admin(base, "GET", f"/admin/jobs/{job}"))["state"] in ("queued", "running"):
        time.sleep(0.1)
    return j


def answer(client: openai.OpenAI, model: str) -> str:
    text = []
    for chunk in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True
    ):
        text.extend(c.text for c in chunk.choices)
    return "".join(text)


class Streams:
    def __init__(self, base: str, experts: list[str], n: int) -> None:
        self.base, self.experts = base, experts
        self.answers: list[tuple[str, str]] = []
        self.failed: list[tuple[str, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(n)]

    def run(self, i: int) -> None:
        client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0)
        k = i
        while not self.stop.is_set():
            model = self.experts[k % len(self.experts)]
            k += 1
            try:
                self.answers.append((model, answer(client, model)))
            except openai.OpenAIError as e:
                self.failed.append((model, f"{type(e).__name__}: {str(e)[:120]}"))


def script(base: str, folders: dict[str, Path], streams: Streams, seconds: float) -> dict[str, Any]:
    """The operator's changes, spread over the run; returns what each took."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    out: dict[str, Any] = {}
    time.sleep(seconds * 0.1)
    job = admin(base, "POST", "/admin/experts", {"name": "zeta", "source": str(folders["zeta"])})
    done = wait_job(base, job["job"])
    t_done = time.perf_counter()
    answer(client, "zeta")
    out["add"] = {
        "state": done["state"],
        "import_s": done["result"].get("import_s"),
        "import_done_to_first_answer_s": round(time.perf_counter() - t_done, 3),
    }
    streams.experts.append("zeta")
    time.sleep(seconds * 0.1)
    job = admin(base, "PUT", "/admin/experts/beta", {"source": str(folders["beta2"])})
    out["replace"] = {"state": wait_job(base, job["job"])["state"]}
    time.sleep(seconds * 0.1)
    out["pin"] = admin(base, "POST", "/admin/experts/alpha/pin", {"tier": "device"})["state"]["pinned"]
    time.sleep(seconds * 0.1)
    out["delete"] = admin(base, "DELETE", "/admin/experts/epsilon")["removed"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--params", default="2M")
    ap.add_argument("--ray", type=int, default=0, metavar="REPLICAS", help="serve through Ray Serve replicas")
    args = ap.parse_args()
    params = parse_count(args.params, "--params")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        seeds = {"alpha": 1, "beta": 2, "gamma": 3, "epsilon": 4, "zeta": 5, "beta2": 6}
        folders = {n: hf_folder(t / n, params, s) for n, s in seeds.items()}
        bundle = t / "bundle"
        for n in ("alpha", "beta", "gamma", "epsilon"):
            import_expert(folders[n], n, bundle)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "wallbreak.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--port",
            str(port),
            "--api-key",
            KEY,
            "--admin-key",
            ADMIN,
            *(["--ray", "--replicas", str(args.ray)] if args.ray else []),
        ]
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            while True:
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=2).read()
                    break
                except OSError:
                    time.sleep(0.2)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
            versions = {n: {answer(client, n)} for n in ("alpha", "beta", "gamma", "epsilon")}
            streams = Streams(base, ["alpha", "beta", "gamma", "epsilon"], args.streams)
            for th in streams.threads:
                th.start()
            t0 = time.perf_counter()
            changes = script(base, folders, streams, args.seconds)
            # The streams go on at least 10 s past the last change (the deleted expert's requests 404).
            time.sleep(max(10.0, args.seconds - (time.perf_counter() - t0)))
            streams.stop.set()
            run_s = time.perf_counter() - t0
            for th in streams.threads:
                th.join()
            versions["zeta"] = {answer(client, "zeta")}
            versions["beta"].add(answer(client, "beta"))
        finally:
            server.terminate()
            server.wait()
    mixed = [(m, a) for m, a in streams.answers if a not in versions[m]]
    failed_others = [f for f in streams.failed if f[0] != "epsilon"]
    print(
        json.dumps(
            {
                "streams": args.streams,
                "ray_replicas": args.ray,
                "ran_s": round(run_s, 1),
                "seconds": args.seconds,
                "params": params,
                "answers": len(streams.answers),
                "answers_by_expert": dict(Counter(m for m, _ in streams.answers)),
                "beta_versions_seen": sorted(
                    {a for m, a in streams.answers if m == "beta"} & versions["beta"]
                ).__len__(),
                "failed_not_deleted": len(failed_others),
                "failed_examples": failed_others[:3],
                "failed_deleted_expert": len(streams.failed) - len(failed_others),
                "answers_matching_no_version": len(mixed),
                "changes": changes,
            }
        )
    )


if __name__ == "__main__":
    main()
