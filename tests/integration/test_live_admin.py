"""Operating a served bundle live: the admin API adds, replaces, removes, pins and unloads experts
while the official openai client's requests run; another process's `bundle import` is picked up."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ROUTER_TOPICS, ServerThread, http, make_tiny_llama_folder, router_prompts, write_jsonl
from wallbreak.coe.server.serve import ServeOptions

openai = pytest.importorskip("openai")

API, ADMIN = "client-key", "admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("live-src")
    return {n: make_tiny_llama_folder(root / n, seed=s) for n, s in
            (("alpha", 1), ("beta", 2), ("gamma", 3), ("beta2", 4), ("delta", 5))}  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, folders: dict[str, Path], tiny_bert: Path) -> Path:
    from wallbreak.coe.bundle.importers import import_expert
    from wallbreak.coe.router import FitOptions, fit_router

    out = tmp_path_factory.mktemp("live") / "b"
    import_expert(folders["alpha"], "alpha", out)
    import_expert(folders["beta"], "beta", out)
    rows = [r for r in router_prompts(8, seed=0) if r[1] in ("alpha", "beta")]
    ex = write_jsonl(out.parent / "train.jsonl", rows)
    fit_router(out, FitOptions(examples=ex, encoder=tiny_bert, methods=("logreg",)), progress=False)
    return out


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[ServerThread]:
    with ServerThread(ServeOptions(bundle=bundle, api_key=API, admin_key=ADMIN)) as s:
        yield s


def client(s: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key=API, max_retries=0)


def greedy(s: ServerThread, model: str, n: int = 12) -> str:
    out = client(s).completions.create(model=model, prompt="the plum", max_tokens=n, temperature=0)
    return out.choices[0].text


def admin(s: ServerThread, method: str, path: str, body: object = None) -> tuple[int, dict]:
    status, _, text = http(method, f"{s.url}{path}", body, AUTH)
    return status, json.loads(text) if text else {}


def wait_job(s: ServerThread, job: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = admin(s, "GET", f"/admin/jobs/{job}")
        assert status == 200
        if body["state"] in ("done", "failed"):
            return body
        time.sleep(0.3)
    raise AssertionError(f"job {job} did not end")


class Load:
    """Clients sending greedy completions to `model` until stopped; every answer is kept."""

    def __init__(self, s: ServerThread, model: str, threads: int = 3) -> None:
        self.s, self.model = s, model
        self.answers: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(greedy(self.s, self.model, 24))
            except Exception as e:
                self.errors.append(e)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def test_admin_routes_need_the_admin_key(server: ServerThread, bundle: Path) -> None:
    for headers in ({}, {"Authorization": f"Bearer {API}"}):
        status, _, text = http("GET", f"{server.url}/admin/experts", None, headers)
        assert status == 401 and "admin key" in json.loads(text)["error"]["message"]
    status, _, _ = http(
        "POST", f"{server.url}/models/load", {"model": "alpha"}, {"Authorization": f"Bearer {API}"}
    )
    assert status == 401
    with ServerThread(ServeOptions(bundle=bundle)) as off:
        status, _, text = http("GET", f"{off.url}/admin/experts", None, AUTH)
        assert status == 404 and "--admin-key" in json.loads(text)["error"]["message"]


def test_bad_admin_requests_get_one_clear_4xx(server: ServerThread, folders: dict[str, Path]) -> None:
    cases = [
        ({"name": "x1", "source": "/no/such/model"}, 400, "not a model"),
        ({"name": "x2", "source": "relative/path"}, 400, "absolute path"),
        ({"name": "alpha", "source": str(folders["delta"])}, 409, "exists"),
        ({"name": "x3", "source": str(folders["delta"]), "dtype": "int3"}, 400, "int3"),
        ({"name": "bad name!", "source": str(folders["delta"])}, 400, "not allowed"),
        ({"name": "x4", "source": str(folders["delta"]), "surprise": 1}, 400, "surprise"),
    ]
    for body, code, words in cases:
        status, out = admin(server, "POST", "/admin/experts", body)
        assert status == code and words in out["error"]["message"], (body, out)
    status, out = admin(server, "POST", "/admin/experts/nobody/pin", {"tier": "device"})
    assert status == 404
    status, out = admin(server, "POST", "/admin/experts/alpha/keep-alive", {"keep_alive": "soon"})
    assert status == 400 and "duration" in out["error"]["message"]
    r = http("POST", f"{server.url}/v1/completions", {"model": "alpha", "prompt": "a", "keep_alive": "x"},
             {"Authorization": f"Bearer {API}"})  # fmt: skip
    assert r[0] == 400 and "keep_alive" in r[2]


def test_add_under_load_then_it_answers_and_routes(server: ServerThread, folders: dict[str, Path]) -> None:
    examples = [p for p, e in router_prompts(8, seed=1) if e == "gamma"]
    with Load(server, "alpha") as load:
        body = {"name": "gamma", "source": str(folders["gamma"]), "examples": examples}
        status, out = admin(server, "POST", "/admin/experts", body)
        assert status == 202
        job = wait_job(server, out["job"])
    assert job["state"] == "done", (job["error"], job["progress"])
    assert job["result"]["routable"] is True
    assert not load.errors and load.answers  # the other expert served throughout
    assert greedy(server, "gamma")  # servable by name at once
    topic = " ".join(ROUTER_TOPICS["gamma"].split()[:6])
    routed = client(server).chat.completions.create(
        model="coe", messages=[{"role": "user", "content": topic}], max_tokens=2
    )
    assert routed.model == "gamma"  # the router learned it without a refit
    cards = {m["id"]: m for m in json.loads(http("GET", f"{server.url}/v1/models", None,
                                                 {"Authorization": f"Bearer {API}"})[2])["data"]}  # fmt: skip
    state = cards["gamma"]["state"]
    assert state["tier"] in ("host", "device") and state["form"] == "float32" and state["bytes"] > 0


def test_replace_is_atomic_per_request(server: ServerThread, folders: dict[str, Path]) -> None:
    before = greedy(server, "beta", 24)
    assert admin(server, "POST", "/admin/experts/beta/pin", {"tier": "device"})[0] == 200
    with Load(server, "beta", threads=3) as load:
        status, out = admin(server, "PUT", "/admin/experts/beta", {"source": str(folders["beta2"])})
        assert status == 202
        assert wait_job(server, out["job"])["state"] == "done"
        time.sleep(1.0)  # requests bound after the switch
    after = greedy(server, "beta", 24)
    assert after != before  # other weights
    assert not load.errors
    assert set(load.answers) <= {before, after}, "an answer mixed two versions of the weights"
    assert after in load.answers
    deadline = time.monotonic() + 10  # the old version retires once its requests are done
    while time.monotonic() < deadline and server.app.state.live.retiring():
        time.sleep(0.2)
    assert server.app.state.live.retiring() == []
    # The pin carried over to the new version: held in the old one's slot once that retired.
    state = server.app.state.live.describe("beta")
    assert state["pinned"] == "device" and state["tier"] == "device" and state["version"] != "beta"
    assert admin(server, "POST", "/admin/experts/beta/unpin")[0] == 200


def test_pin_unload_and_llamacpp_aliases(server: ServerThread) -> None:
    status, out = admin(server, "POST", "/admin/experts/alpha/pin", {"tier": "device"})
    assert status == 200 and out["state"]["pinned"] == "device" and out["state"]["tier"] == "device"
    status, out = admin(server, "POST", "/admin/experts/alpha/unload")
    assert status == 409 and "unpin" in out["error"]["message"]
    assert admin(server, "POST", "/admin/experts/alpha/unpin")[0] == 200
    status, out = admin(server, "POST", "/models/unload", {"model": "alpha"})
    assert (status, out) == (200, {"success": True})
    listed = json.loads(http("GET", f"{server.url}/models", None, {"Authorization": f"Bearer {API}"})[2])
    assert {m["id"]: m["status"]["value"] for m in listed["data"]}["alpha"] == "unloaded"
    assert admin(server, "POST", "/models/load", {"model": "alpha"}) == (200, {"success": True})
    listed = json.loads(http("GET", f"{server.url}/models", None, {"Authorization": f"Bearer {API}"})[2])
    assert {m["id"]: m["status"]["value"] for m in listed["data"]}["alpha"] == "loaded"
    metrics = http("GET", f"{server.url}/metrics")[2]
    assert 'wallbreak_admin_operations_total{op="pin",result="ok"}' in metrics
    assert 'wallbreak_expert_tier{expert="alpha",tier="host"} 1.0' in metrics


def test_keep_alive_zero_unloads_an_idle_expert(server: ServerThread) -> None:
    client(server).completions.create(model="alpha", prompt="a", max_tokens=2, extra_body={"keep_alive": 0})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if admin(server, "GET", "/admin/experts")[1]["data"][0]["tier"] == "disk":
            break
        time.sleep(0.2)
    states = {e["id"]: e for e in admin(server, "GET", "/admin/experts")[1]["data"]}
    assert states["alpha"]["tier"] == "disk" and states["alpha"]["keep_alive_s"] == 0
    assert admin(server, "POST", "/admin/experts/alpha/keep-alive", {"keep_alive": None})[0] == 200


def test_an_import_by_another_process_is_picked_up(
    server: ServerThread, bundle: Path, folders: dict[str, Path]
) -> None:
    cmd = [sys.executable, "-m", "wallbreak.cli", "bundle", "import", str(folders["delta"]),
           "--name", "delta", "--out", str(bundle)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    deadline = time.monotonic() + 10
    while "delta" not in [m.id for m in client(server).models.list()]:
        assert time.monotonic() < deadline, "the server did not pick up the import"
        time.sleep(0.2)
    assert greedy(server, "delta")


def test_delete_lets_in_flight_finish_and_new_requests_404(server: ServerThread) -> None:
    with Load(server, "delta", threads=2) as load:
        time.sleep(0.5)
        status, out = admin(server, "DELETE", "/admin/experts/delta")
        assert status == 200 and out["removed"] == "delta"
        time.sleep(0.5)
    assert load.answers
    assert all(isinstance(e, openai.NotFoundError) for e in load.errors)  # only those sent after
    with pytest.raises(openai.NotFoundError):
        greedy(server, "delta")
    assert "delta" not in [m.id for m in client(server).models.list()]
