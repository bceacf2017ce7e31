"""`wallbreak serve --ray`: the OpenAI endpoints through Ray Serve replicas, as a user runs them.

One server for the module (a local Ray on 127.0.0.1, 2 replicas, 4 tiny experts): the official
`openai` client, /health and /metrics, a replica killed under load, the admin API changing every
replica, and a drained shutdown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'wallbreak[ray]')")

from helpers import http, make_tiny_llama_folder
from wallbreak.coe.server.net import free_port

pytestmark = pytest.mark.ray
ADMIN = "admin-key"


class RayServer:
    def __init__(self, bundle: Path, replicas: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # No test here is about compiled steps, so no replica builds one in the background.
        self.cmd = [sys.executable, "-m", "wallbreak.cli", "serve", "--ray", "--replicas", str(replicas),
                    "--bundle", str(bundle), "--port", str(self.port), "--max-queue", "64",
                    "--compile", "off", "--admin-key", ADMIN]  # fmt: skip
        self.log = bundle.parent / "ray-serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=30) as r:
            return dict(json.loads(r.read()))

    def start(self) -> RayServer:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wallbreak serve --ray exited: {self.log.read_text()[-3000:]}")
            try:
                h = self.health()
                if all(r["up"] for r in h["replicas"]):
                    return self
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"wallbreak serve --ray did not come up: {self.log.read_text()[-3000:]}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    from wallbreak.coe.bundle.importers import synth_bundle

    bundle = tmp_path_factory.mktemp("ray") / "bundle"
    synth_bundle(bundle, experts=4, params=300_000, seed=3)
    srv = RayServer(bundle, replicas=2).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_the_official_openai_client_works_through_the_replicas(server: RayServer) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert {m.id for m in client.models.list().data} == {
        "coe",
        "expert-00",
        "expert-01",
        "expert-02",
        "expert-03",
    }
    r = client.completions.create(model="expert-01", prompt="hello", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 8
    again = client.completions.create(model="expert-01", prompt="hello", max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy: the same answer from whichever replica
    stream = client.chat.completions.create(
        model="expert-02", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    status, _, body = http("POST", f"{server.url}/v1/completions", {"model": "nobody", "prompt": "x"})
    assert status == 404 and "does not exist" in body


def test_health_and_metrics_report_the_replicas_and_their_experts(server: RayServer) -> None:
    h = server.health()
    assert len(h["replicas"]) == 2 and all(r["up"] for r in h["replicas"])
    placed = sorted(e for r in h["replicas"] for e in r["placed"])
    assert placed == ["expert-00", "expert-01", "expert-02", "expert-03"]  # spread, each once
    assert any(r["device"] for r in h["replicas"])  # the earlier test's experts are held
    # Each replica reserved the share of the cores that the driver said (before it deployed), and Ray
    # gave its torch that many threads.
    said = re.search(r"deploying 2 replica\(s\) of ([0-9.]+) CPU", server.log.read_text())
    assert said is not None, server.log.read_text()[-3000:]
    cpus = float(said[1])
    assert cpus > 0 and [r["cpus"] for r in h["replicas"]] == [cpus] * 2, h["replicas"]
    assert [r["intra_op_threads"] for r in h["replicas"]] == [max(1, int(cpus))] * 2, h["replicas"]
    status, _, text = http("GET", f"{server.url}/metrics")
    assert status == 200 and 'wallbreak_replica_up{replica="0"} 1.0' in text
    assert "wallbreak_replica_expert{" in text


def test_a_killed_replica_costs_no_request_the_client_cannot_retry(server: RayServer) -> None:
    victim = server.health()["replicas"][0]
    outcomes: list[tuple[int, dict]] = []
    lock = threading.Lock()
    experts = ["expert-00", "expert-01", "expert-02", "expert-03"]

    def client(i: int) -> None:
        body = {"model": experts[i % 4], "prompt": "tell me", "max_tokens": 150, "temperature": 0}
        status, headers, _ = http("POST", f"{server.url}/v1/completions", body)
        with lock:
            outcomes.append((status, headers))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for t in threads[:20]:
        t.start()
    time.sleep(1.0)
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads[20:]:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=180)
    assert len(outcomes) == 40
    bad = [
        (s, h)
        for s, h in outcomes
        if s != 200 and not (s in (429, 503) and "retry-after" in {k.lower() for k in h})
    ]
    assert bad == []
    assert sum(s == 200 for s, _ in outcomes) >= 30
    deadline = time.monotonic() + 120  # Ray restarts the replica; the ingress routes to it again
    while time.monotonic() < deadline:
        h = server.health()
        if all(r["up"] for r in h["replicas"]) and h["replicas"][0]["pid"] != victim["pid"]:
            break
        time.sleep(2)
    else:
        pytest.fail(f"replica 0 did not come back: {server.health()}")


def admin(server: RayServer, method: str, path: str, body: object = None) -> tuple[int, dict]:
    status, _, text = http(method, f"{server.url}{path}", body, {"Authorization": f"Bearer {ADMIN}"})
    return status, json.loads(text) if text else {}


def import_job(server: RayServer, method: str, path: str, body: dict) -> dict:
    status, started = admin(server, method, path, body)
    assert status == 202, started
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status, job = admin(server, "GET", f"/admin/jobs/{started['job']}")
        if job["state"] in ("done", "failed"):
            assert job["state"] == "done", job
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {started['job']} did not end")


def greedy(server: RayServer, model: str, extra: dict | None = None) -> tuple[int, str]:
    body = {"model": model, "prompt": "the plum", "max_tokens": 16, "temperature": 0, **(extra or {})}
    status, _, text = http("POST", f"{server.url}/v1/completions", body)
    return status, json.loads(text)["choices"][0]["text"] if status == 200 else text


def state_of(server: RayServer, name: str) -> dict:
    status, listed = admin(server, "GET", "/admin/experts")
    assert status == 200
    return next(e for e in listed["data"] if e["id"] == name)


def test_the_admin_api_changes_every_replica(server: RayServer, tmp_path: Path) -> None:
    """Add, pin, replace under load, keep-alive, a restarted replica given its pin again, delete."""
    old_src = make_tiny_llama_folder(tmp_path / "old", seed=1)
    new_src = make_tiny_llama_folder(tmp_path / "new", seed=2)
    assert http("GET", f"{server.url}/admin/experts")[0] == 401
    job = import_job(server, "POST", "/admin/experts", {"name": "added", "source": str(old_src)})
    status, old = greedy(server, "added")
    assert status == 200, old
    holders = [r for r in server.health()["replicas"] if "added" in r["placed"]]
    assert len(holders) == 1, server.health()["replicas"]  # placed once, on one replica
    assert job["result"]["version"] == "added" and state_of(server, "added")["tier"] in ("host", "device")

    status, pinned = admin(server, "POST", "/admin/experts/added/pin", {"tier": "device"})
    assert status == 200 and pinned["state"]["pinned"] == "device", pinned
    assert pinned["state"]["replicas"][str(holders[0]["index"])] == "device"
    assert admin(server, "POST", "/admin/experts/nobody/pin", {"tier": "host"})[0] == 404
    assert http("GET", f"{server.url}/metrics")[2].count('wallbreak_expert_pinned{expert="added"') == 1

    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            answers.append(greedy(server, "added"))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        import_job(server, "PUT", "/admin/experts/added", {"source": str(new_src)})
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    _, new = greedy(server, "added", {"keep_alive": "10m"})
    assert new != old
    assert all(s == 200 for s, _ in answers) and {a for _, a in answers} <= {old, new}, answers[:5]
    st = state_of(server, "added")
    assert st["version"] != "added" and st["pinned"] == "device" and st["keep_alive_s"] == 600

    victim = next(r for r in server.health()["replicas"] if "added" in r["placed"])
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Ray restarts it; the ingress gives it its pin again
        st = state_of(server, "added")
        if st["pinned"] == "device" and st["replicas"].get(str(victim["index"])) == "device":
            break
        time.sleep(2)
    else:
        pytest.fail(f"the restarted replica did not get its pin back: {state_of(server, 'added')}")

    assert admin(server, "POST", "/admin/experts/added/unpin")[0] == 200
    status, removed = admin(server, "DELETE", "/admin/experts/added")
    assert status == 200 and removed["changes"]["removed"] == ["added"], removed
    assert greedy(server, "added")[0] == 404
    deadline = time.monotonic() + 30
    while any("added" in r["placed"] for r in server.health()["replicas"]):
        assert time.monotonic() < deadline, "the removed expert stayed in the placement table"
        time.sleep(0.5)


def test_sigterm_drains_and_exits_cleanly(server: RayServer) -> None:
    """Requests in flight when SIGTERM comes finish (Ray Serve's own shutdown closes the proxy's
    connections at once: the server first refuses new requests and waits for these)."""
    results: list[int] = []

    def one(expert: str) -> None:
        body = {"model": expert, "prompt": "x", "max_tokens": 200, "temperature": 0}
        results.append(http("POST", f"{server.url}/v1/completions", body)[0])

    threads = [threading.Thread(target=one, args=(f"expert-0{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60  # on a busy host the proxy may take seconds to hand them on
    while server.health()["requests_in_flight"] + len(results) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stop() == 0
    for t in threads:
        t.join(timeout=60)
    # the in-flight requests finished before the server went away
    assert results == [200] * 4, server.log.read_text()[-3000:]
