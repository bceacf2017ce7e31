"""`wallbreak bench serve`: drive the real HTTP server with a Zipf workload, for each policy.

For each concurrency and each policy, a fresh `wallbreak serve` process (same bundle, same budgets)
on a free port gets the same request sequence: expert i drawn with probability ~ 1/rank^s, pinned by
name, streamed, from C client threads. Reported per run: requests/s, output tokens/s, p50/p99
latency, p50 time to first token, switches, failed requests, and how many of the disk reads the
prefetch made ahead of need. `per-expert-lru` is the referee: what Ray Serve multiplexing and
Ollama do (see `coe/engine/scheduler.py`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wallbreak.coe import defaults
from wallbreak.coe.bench.switch import o_direct_read_gbps
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.policy import POLICIES
from wallbreak.coe.server.net import free_port
from wallbreak.coe.tiers import TierConfig, TierManager
from wallbreak.common.plots import save_figure
from wallbreak.errors import ConfigError

PROMPT = "Tell me something about the weather, the sea, and the mountains today."
SETTLE_TIMEOUT_S = 900.0  # a build from nothing takes minutes on 2 cores; bench serve builds them first


@dataclass(kw_only=True)
class BenchServeArgs:
    bundle: Path
    device_budget: int | None = None
    host_budget: int | None = None
    workload: str = "zipf:1.0"
    requests: int = 200
    concurrency: tuple[int, ...] = (16,)
    policies: tuple[str, ...] = tuple(POLICIES)
    max_tokens: int = 32
    seed: int = 0
    alone: bool = True
    max_wait: float = defaults.MAX_WAIT_S
    drop_caches: bool = False  # start every server with the bundle out of the page cache (root)
    direct_io: str | None = None  # the servers' --direct-io
    huge_pages: str | None = None  # the servers' --huge-pages
    replicas: int | None = None  # --ray: compare 1 replica with this many, each with the same budgets
    expert_load: Path | None = None  # --ray: the servers' --expert-load (measured load per expert)
    compile: str = defaults.COMPILE  # the servers' --compile; steps are built before any timing
    experts_subset: tuple[int, ...] | None = None  # requests over the first N experts, for each N
    compile_rows: tuple[int, ...] = ()  # the servers' --compile-rows


def drop_page_cache() -> None:
    """Make the next reads of the bundle real disk reads, so every policy starts equally cold."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as e:
        raise ConfigError(f"--drop-caches needs root (cannot write /proc/sys/vm/drop_caches: {e})") from None


def zipf_sequence(workload: str, experts: list[str], n: int, seed: int) -> list[str]:
    kind, _, arg = workload.partition(":")
    if kind != "zipf":
        raise ConfigError(f"--workload {workload!r}: only zipf:S is supported (e.g. zipf:1.0)")
    try:
        s = float(arg or "1.0")
    except ValueError:
        raise ConfigError(f"--workload {workload!r}: S must be a number, as in zipf:1.0") from None
    if s < 0:
        raise ConfigError(f"--workload zipf:{s}: the exponent must be >= 0")
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, len(experts) + 1) ** s
    order = rng.permutation(len(experts))  # which expert is popular is not tied to its name
    picks = rng.choice(len(experts), size=n, p=w / w.sum())
    return [experts[order[i]] for i in picks]


class _Server:
    """`wallbreak serve` in its own process, so the load generator does not share its GIL."""

    def __init__(self, a: BenchServeArgs, policy: str, replicas: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{defaults.HOST}:{self.port}"
        self.cmd = [
            sys.executable, "-m", "wallbreak.cli", "serve", "--bundle", str(a.bundle),
            "--port", str(self.port), "--policy", policy, "--max-queue", str(max(256, a.requests)),
            "--max-wait", str(a.max_wait), "--compile", a.compile,
        ]  # fmt: skip
        # given, or none: a figure must not depend on which packages an earlier run left in the cache
        self.cmd += ["--compile-rows", ",".join(map(str, a.compile_rows)) or "none"]
        if a.device_budget:
            self.cmd += ["--device-budget", str(a.device_budget)]
        if a.host_budget:
            self.cmd += ["--host-budget", str(a.host_budget)]
        if a.direct_io:
            self.cmd += ["--direct-io", a.direct_io]
        if a.huge_pages:
            self.cmd += ["--huge-pages", a.huge_pages]
        if replicas:
            self.cmd += ["--ray", "--replicas", str(replicas)]
            if a.expert_load:
                self.cmd += ["--expert-load", str(a.expert_load)]
        self.proc: subprocess.Popen[str] | None = None

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/health", timeout=30) as r:
            return dict(json.loads(r.read()))

    def settle(self, timeout_s: float = SETTLE_TIMEOUT_S) -> float | None:
        """Wait until no compiled step is being built, loaded or checked (the warm-up's first uses
        start that work, in the server, on the cores the timed run needs); seconds waited, or None
        if it was still going after `timeout_s` (the run's `compile` state then says so)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if not self.health().get("compile", {}).get("warming"):
                return round(time.monotonic() - t0, 1)
            time.sleep(0.25)
        return None

    def __enter__(self) -> _Server:
        # stdout: Ray prints its own status lines there, which must not mix with the bench's JSON.
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise ConfigError(f"the benchmark server exited: {err.strip().splitlines()[-1:]}")
            try:
                self.health()
                return self
            except OSError:
                time.sleep(0.1)
        raise ConfigError("the benchmark server did not come up within 300 s")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _one(url: str, expert: str, max_tokens: int) -> tuple[float, float | None, int, bool]:
    body = {
        "model": expert,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # every answer is max_tokens long, whatever the model would say
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    first = None
    tokens = 0
    ok = False
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    ok = True
                    break
                msg = json.loads(data)
                if "error" in msg:
                    break
                if msg.get("choices") and msg["choices"][0].get("text") and first is None:
                    first = time.perf_counter() - t0
                if msg.get("usage"):
                    tokens = int(msg["usage"]["completion_tokens"])
    except OSError:
        ok = False
    return time.perf_counter() - t0, first, tokens, ok


def drive(url: str, sequence: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    results: list[tuple[float, float | None, int, bool]] = [(0.0, None, 0, False)] * len(sequence)
    nxt = iter(range(len(sequence)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            results[i] = _one(url, sequence[i], max_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [r[0] for r in results if r[3]]
    ttft = [r[1] for r in results if r[3] and r[1] is not None]
    return {
        "req_per_s": len(lat) / wall,
        "tokens_per_s": sum(r[2] for r in results if r[3]) / wall,
        "p50_s": float(np.percentile(lat, 50)) if lat else None,
        "p99_s": float(np.percentile(lat, 99)) if lat else None,
        "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else None,
        "ttft_p99_s": float(np.percentile(ttft, 99)) if ttft else None,
        "failed": len(sequence) - len(lat),
        "wall_s": wall,
    }


def transformers_alone(bundle: Bundle, expert: str, n: int, max_tokens: int) -> dict[str, Any]:
    """The same expert through plain `generate`, one request at a time: the engine's floor."""
    from transformers import AutoTokenizer  # deferred: loads transformers

    size = bundle.expert(expert).total_bytes
    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path(expert)))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with (
        TierManager(bundle, TierConfig(host_budget=size, device_budget=size), [expert]) as mgr,
        mgr.acquire(expert) as lease,
        torch.inference_mode(),
    ):
        model: Any = lease.model
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        made = 0
        for _ in range(n):
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            made += out.shape[1] - ids.shape[1]
        wall = time.perf_counter() - t0
    return {"requests": n, "tokens_per_s": made / wall, "req_per_s": n / wall}


def _one_run(
    a: BenchServeArgs, policy: str, seq: list[str], concurrency: int, replicas: int | None = None
) -> dict[str, Any]:
    if a.drop_caches:
        drop_page_cache()
    with _Server(a, policy, replicas) as srv:
        drive(srv.url, seq[: min(len(seq), concurrency)], concurrency, 2)  # warm-up: first loads
        settled_s = srv.settle()
        h0 = srv.health()
        res = drive(srv.url, seq, concurrency, a.max_tokens)
        h1 = srv.health()
    e0, e1 = h0["engine"], h1["engine"]
    t0, t1 = h0["tiers"], h1["tiers"]
    dt = e1["switch_seconds"] - e0["switch_seconds"]
    res["switches"] = e1["switches"] - e0["switches"]
    res["switches_per_request"] = res["switches"] / len(seq)
    # Engine switches count every change of the running expert, resident or not; these count loads.
    res["device_loads"] = t1["switches"] - t0["switches"]
    res["device_loads_per_request"] = res["device_loads"] / len(seq)
    res["host_evictions"] = t1["evictions"]["host"] - t0["evictions"]["host"]
    if "replicas" in h1:
        res["replicas"] = [{k: r.get(k) for k in ("index", "placed", "device")} for r in h1["replicas"]]
        res["retried_requests"] = h1["retried_requests"]
        res["requests_by_expert"] = h1.get("requests_by_expert", {})  # what a next --expert-load reads
    res["switch_s"] = dt
    res["mean_batch"] = (e1["tokens"] - e0["tokens"]) / max(1, e1["steps"] - e0["steps"])
    res["steps_by_rows"] = steps_by_rows(e0.get("step_seconds", {}), e1.get("step_seconds", {}))
    read = t1["bytes_disk_to_host"] - t0["bytes_disk_to_host"]
    ahead = t1["bytes_disk_to_host_prefetch"] - t0["bytes_disk_to_host_prefetch"]
    res["disk_read_bytes"] = read
    res["disk_read_by_prefetch"] = ahead / read if read else None
    read_s = t1.get("disk_to_host_s", 0.0) - t0.get("disk_to_host_s", 0.0)
    res["disk_read_gbps"] = round(read / read_s / 1e9, 3) if read_s > 0 else None  # while reading
    res["compile"] = compile_state(h1.get("compile", {})) | {"settled_s": settled_s}
    res["tiers"] = t1
    return res


def steps_by_rows(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, Any]:
    """The timed run's decode steps by rows and path ("2/compiled"): how many, their mean
    milliseconds, and the share of the run's tokens they made."""
    cells = {}
    for cell, (n1, s1) in after.items():
        n0, s0 = before.get(cell, (0, 0.0))
        if n1 > n0:
            cells[cell] = (int(n1 - n0), s1 - s0, int(cell.split("/")[0]) * (n1 - n0))
    tokens = sum(t for _, _, t in cells.values()) or 1
    return {
        cell: {"steps": n, "ms_per_step": round(1e3 * secs / n, 2), "token_share": round(t / tokens, 3)}
        for cell, (n, secs, t) in sorted(cells.items(), key=lambda kv: (int(kv[0].split("/")[0]), kv[0]))
    }


def compile_state(summary: dict[str, Any]) -> dict[str, Any]:
    """A server's compile state in short: its policy, how many experts' decode steps are in each
    state, the steps it ran compiled (a build still running means the figure is not clean), and
    what each row size's paths cost at the end."""
    states: dict[str, int] = {}
    for state in summary.get("experts", {}).values():
        states[state] = states.get(state, 0) + 1
    keys = ("policy", "compiled_steps", "compiled_row_steps", "row_steps", "row_paths", "compiled_prefills",
            "recompiles")  # fmt: skip
    return {k: summary.get(k) for k in keys} | {"experts_by_state": states}


def build_steps(a: BenchServeArgs, experts: list[str]) -> None:
    """Every compiled step the servers will use, built before timing (`wallbreak bundle compile`),
    so no policy runs while a build takes the CPU."""
    if a.compile == "off":
        return
    print("bench serve: building the compiled steps first (wallbreak bundle compile) ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "wallbreak.cli", "bundle", "compile", str(a.bundle),
           "--experts", ",".join(experts)]  # fmt: skip
    if a.compile_rows:
        cmd += ["--rows", ",".join(map(str, a.compile_rows))]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise ConfigError(f"building the compiled steps failed: {done.stdout.strip().splitlines()[-1:]}")


def subsets(a: BenchServeArgs, bundle: Bundle) -> list[int]:
    n = len(bundle.names)
    chosen = list(a.experts_subset or (n,))
    bad = [k for k in chosen if not 1 <= k <= n]
    if bad:
        raise ConfigError(f"--experts-subset {bad[0]}: the bundle has {n} experts; give sizes from 1 to {n}")
    return sorted(set(chosen))


def run_bench_serve(a: BenchServeArgs) -> dict[str, Any]:
    bundle = Bundle.open(a.bundle)
    if a.requests < 1 or not a.concurrency or min(a.concurrency) < 1:
        raise ConfigError("--requests and --concurrency must be at least 1")
    unknown = [p for p in a.policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"--policy {','.join(unknown)}: choose from {', '.join(POLICIES)}")
    sizes = subsets(a, bundle)
    zipf_sequence(a.workload, bundle.names, 1, a.seed)  # a bad --workload fails before any work
    build_steps(a, bundle.names[: max(sizes)])
    out: dict[str, Any] = {"workload": a.workload, "requests": a.requests, "runs": []}
    blob = bundle.blob_path(bundle.names[0])
    out["o_direct_ceiling_gbps"] = round(o_direct_read_gbps(blob), 3)
    for n in sizes:
        seq = zipf_sequence(a.workload, bundle.names[:n], a.requests, a.seed)
        for c in a.concurrency:
            run = _policies_at(a, seq, c, n)
            for r in run["policies"].values():
                gbps = r.get("disk_read_gbps")
                r["disk_read_vs_ceiling"] = round(gbps / out["o_direct_ceiling_gbps"], 3) if gbps else None
            out["runs"].append(run)
    if a.alone:
        seq = zipf_sequence(a.workload, bundle.names[: sizes[0]], a.requests, a.seed)
        popular = max(set(seq), key=seq.count)
        out["transformers_generate_alone"] = {"expert": popular} | transformers_alone(
            bundle, popular, min(10, a.requests), a.max_tokens
        )
    return out


def _policies_at(a: BenchServeArgs, seq: list[str], c: int, n: int) -> dict[str, Any]:
    """One cell: every policy (or Ray Serve x1 against xN) on the same sequence at concurrency c."""
    run: dict[str, Any] = {"concurrency": c, "experts": n, "policies": {}}
    if a.replicas:  # the same budgets per replica: one replica against N, both through Ray Serve
        for k in sorted({1, a.replicas}):
            print(
                f"bench serve: {n} experts, concurrency {c}, Ray Serve x{k} ...", file=sys.stderr, flush=True
            )
            run["policies"][f"ray-x{k}"] = _one_run(a, "ours", seq, c, k)
        p = run["policies"]
        base = p["ray-x1"]["req_per_s"]
        run["speedup"] = (
            {f"ray-x{a.replicas}_vs_ray-x1": p[f"ray-x{a.replicas}"]["req_per_s"] / base} if base else {}
        )
        return run
    for policy in a.policies:
        print(f"bench serve: {n} experts, concurrency {c}, policy {policy} ...", file=sys.stderr, flush=True)
        run["policies"][policy] = _one_run(a, policy, seq, c)
    p = run["policies"]
    run["speedup"] = {
        f"ours_vs_{k}": p["ours"]["req_per_s"] / p[k]["req_per_s"]
        for k in p
        if k != "ours" and "ours" in p and p[k]["req_per_s"] > 0
    }
    return run


def format_bench_serve(out: dict[str, Any]) -> str:
    lines = [f"workload {out['workload']}, {out['requests']} requests"]
    if out.get("o_direct_ceiling_gbps"):
        lines.append(f"O_DIRECT read ceiling {out['o_direct_ceiling_gbps']:.2f} GB/s")
    for run in out["runs"]:
        lines.append(f"{run.get('experts', '?')} experts, concurrency {run['concurrency']}:")
        for name, r in run["policies"].items():
            hidden = r["disk_read_by_prefetch"]
            lines.append(
                f"  {name:<15} {r['req_per_s']:7.2f} req/s {r['tokens_per_s']:8.1f} tok/s  "
                f"p50 {r['p50_s']:.2f} s  p99 {r['p99_s']:.2f} s  ttft p50 {r['ttft_p50_s']:.2f} s  "
                f"ttft p99 {r.get('ttft_p99_s') or 0:.2f} s  "
                f"switches {r['switches']}  batch {r['mean_batch']:.1f}"
                + (f"  prefetched {hidden:.0%} of disk reads" if hidden is not None else "")
                + (f"  FAILED {r['failed']}" if r["failed"] else "")
            )
        for k, v in run["speedup"].items():
            lines.append(f"  {k.replace('_', ' ')}: {v:.2f}x requests/s")
    if "transformers_generate_alone" in out:
        t = out["transformers_generate_alone"]
        lines.append(
            f"transformers generate, {t['expert']} alone, one at a time: {t['tokens_per_s']:.1f} tok/s"
        )
    return "\n".join(lines)


def plot_bench_serve(out: dict[str, Any], path: Path) -> None:
    """Several subset sizes: p99 latency against the number of experts, one line per policy and
    concurrency (the paper's DGX-style curve). Otherwise grouped bars: requests/s and p99 latency
    per policy, one group per concurrency."""
    import matplotlib  # deferred: loads matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: loads matplotlib

    runs = out["runs"]
    policies = list(runs[0]["policies"])
    sizes = sorted({r.get("experts", 0) for r in runs})
    if len(sizes) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in sorted({r["concurrency"] for r in runs}):
            for name in policies:
                pts = sorted(
                    (r["experts"], r["policies"][name]["p99_s"] or 0) for r in runs if r["concurrency"] == c
                )
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{name}, {c} clients")
        ax.set_xlabel("experts behind the endpoint")
        ax.set_ylabel("p99 latency, s (lower is better)")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(k) for k in sizes])
        ax.legend(fontsize=8)
        fig.suptitle(f"wallbreak bench serve: p99 against expert count, {out['workload']}")
        save_figure(fig, path, "the serving benchmark plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(policies)
    for ax, key, label in ((axes[0], "req_per_s", "requests/s (higher is better)"),
                           (axes[1], "p99_s", "p99 latency, s (lower is better)")):  # fmt: skip
        for i, name in enumerate(policies):
            xs = [j + i * width for j in range(len(runs))]
            ax.bar(xs, [r["policies"][name][key] or 0 for r in runs], width, label=name)
        ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(runs))])
        ax.set_xticklabels([f"{r['concurrency']} clients" for r in runs])
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle(f"wallbreak bench serve: {out['workload']}, {out['requests']} requests")
    save_figure(fig, path, "the serving benchmark plot")
