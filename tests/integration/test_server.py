"""The OpenAI-compatible server on a tiny synthetic bundle, driven by the official openai client."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ServerThread, fit_test_router, http
from wallbreak.coe.engine import EngineConfig
from wallbreak.coe.server.serve import ServeOptions

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    from wallbreak.coe.bundle.importers import synth_bundle

    out = tmp_path_factory.mktemp("serve") / "b"
    synth_bundle(out, experts=3, params=300_000, names=["alpha", "beta", "gamma"], seed=3)
    fit_test_router(out, tiny_bert)
    return out


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[ServerThread]:
    with ServerThread(ServeOptions(bundle=bundle)) as s:
        yield s


def client(s: ServerThread, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0)


def test_models_health_and_metrics(server: ServerThread) -> None:
    ids = [m.id for m in client(server).models.list()]
    assert ids == ["coe", "alpha", "beta", "gamma", "tiny-bert"]  # the router's encoder embeds
    status, _, text = http("GET", f"{server.url}/health")
    assert status == 200 and json.loads(text)["status"] == "ok"
    client(server).completions.create(model="beta", prompt="hi", max_tokens=2)
    status, _, text = http("GET", f"{server.url}/metrics")
    for name in (
        "wallbreak_requests_total",
        "wallbreak_tokens_total",
        "wallbreak_tier_events_total",
        "wallbreak_switch_seconds_bucket",
        "wallbreak_queue_depth",
        "wallbreak_batch_size_bucket",
        "wallbreak_routing_decisions_total",
    ):
        assert name in text, name
    assert 'wallbreak_requests_total{endpoint="completions",expert="beta",status="200"}' in text


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])


def test_histograms_fill_with_traffic(bundle: Path) -> None:
    """A histogram nobody observes reads as 'no switches, no batches': it must fill with traffic."""
    with ServerThread(ServeOptions(bundle=bundle)) as s:
        text = http("GET", f"{s.url}/metrics")[2]
        assert metric(text, "wallbreak_switch_seconds_count") == 0
        for expert in ("alpha", "beta", "alpha"):
            client(s).completions.create(model=expert, prompt="hi", max_tokens=3, temperature=0)
        text = http("GET", f"{s.url}/metrics")[2]
        assert metric(text, "wallbreak_switch_seconds_count") >= 2
        assert metric(text, "wallbreak_batch_size_count") >= 3
        # On the CPU a device slot aliases the host arena: a switch reads from disk at most once.
        moved = metric(text, "wallbreak_switch_bytes_total")
        health = json.loads(http("GET", f"{s.url}/health")[2])
        assert moved == health["engine"]["switch_bytes"]
        assert moved <= health["tiers"]["bytes_disk_to_host"] + health["tiers"]["bytes_host_to_device"]
        arena = health["tiers"]["host_memory"]  # huge pages are asked for by default
        assert arena["huge_pages"] is hasattr(mmap, "MADV_HUGEPAGE") and 0 < arena["used"] <= arena["budget"]


def test_logprobs_through_the_official_client(server: ServerThread) -> None:
    c = client(server)
    r = c.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0].token == tok.token  # greedy picks the most likely token
        assert tok.top_logprobs[0].logprob == pytest.approx(tok.logprob)
        assert [t.logprob for t in tok.top_logprobs] == sorted(
            (t.logprob for t in tok.top_logprobs), reverse=True
        )
    assert "".join(t.token for t in content) == r.choices[0].message.content
    stream = c.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        stream=True,
    )
    streamed = [
        t for ch in stream if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in content]
    cp = c.completions.create(model="gamma", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    lp = cp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == cp.choices[0].text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f", "parameters": {}}]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("prediction", {"type": "content", "content": "x"}),
    ],
)
def test_features_we_do_not_implement_get_a_400_naming_them(
    server: ServerThread, field: str, value: object
) -> None:
    body = {"model": "alpha", "messages": [{"role": "user", "content": "x"}], field: value}
    got, _, text = http("POST", f"{server.url}/v1/chat/completions", body)
    err = json.loads(text)["error"]
    assert got == 400 and err["param"] == field and field in err["message"]


def test_harmless_values_and_unknown_fields_still_pass(server: ServerThread) -> None:
    body = {
        "model": "alpha",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 2,
        "tools": [],
        "response_format": {"type": "text"},
        "presence_penalty": 0,
        "user": "someone",
        "parallel_tool_calls": True,
    }
    assert http("POST", f"{server.url}/v1/chat/completions", body)[0] == 200
    got, _, text = http(
        "POST", f"{server.url}/v1/completions", {"model": "alpha", "prompt": "x", "suffix": "y"}
    )
    assert got == 400 and json.loads(text)["error"]["param"] == "suffix"


def test_chat_and_completions(server: ServerThread) -> None:
    c = client(server)
    r = c.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hello"}], max_tokens=5, seed=7
    )
    assert r.model == "alpha" and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage is not None and r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = c.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hello"}], max_tokens=5, seed=7
    )
    assert again.choices[0].message.content == r.choices[0].message.content  # seeded sampling repeats
    g1 = c.completions.create(model="gamma", prompt="abc", max_tokens=6, temperature=0)
    g2 = c.completions.create(model="gamma", prompt="abc", max_tokens=6, temperature=0)
    assert g1.choices[0].text == g2.choices[0].text and g1.model == "gamma"


def test_coe_routes_by_prompt(server: ServerThread) -> None:
    r = client(server).chat.completions.create(
        model="coe", messages=[{"role": "user", "content": "bus train taxi of a"}], max_tokens=2
    )
    assert r.model == "beta"


def test_streaming_chat_and_raw_sse(server: ServerThread) -> None:
    stream = client(server).chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(ch.choices and ch.choices[0].finish_reason for ch in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    status, headers, text = http(
        "POST",
        f"{server.url}/v1/completions",
        {"model": "beta", "prompt": "x", "max_tokens": 3, "stream": True},
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        ({"model": "alpha"}, 400, "messages"),
        (
            {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            400,
            "temperature",
        ),
        ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "n": 9}, 400, "n"),
        (
            {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "max_tokens",
        ),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_error_bodies(
    server: ServerThread, body: object, status: int, param: str | None
) -> None:
    got, _, text = http("POST", f"{server.url}/v1/chat/completions", body)
    err = json.loads(text)["error"]
    assert got == status and set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]


def test_prompt_longer_than_the_context_states_the_limit(server: ServerThread) -> None:
    context = server.app.state.catalog.public_tokenizers()["alpha"].context
    got, _, text = http(
        "POST", f"{server.url}/v1/completions", {"model": "alpha", "prompt": "a" * (context + 10)}
    )
    assert got == 400 and f"takes at most {context - 1}" in json.loads(text)["error"]["message"]


def test_client_disconnect_frees_its_batch_place(server: ServerThread) -> None:
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps(
        {"model": "gamma", "prompt": "go", "max_tokens": 100000, "stream": True, "temperature": 0}
    )
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event: generation is under way
    deadline = time.monotonic() + 10
    while server.engine.active() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.active() == 1
    assert json.loads(http("GET", f"{server.url}/health")[2])["kv_bytes"] > 0
    conn.close()
    deadline = time.monotonic() + 20
    while server.engine.active() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.active() == 0
    assert json.loads(http("GET", f"{server.url}/health")[2])["kv_bytes"] == 0


def test_api_key_is_required_when_set(bundle: Path) -> None:
    with ServerThread(ServeOptions(bundle=bundle, api_key="s3cret")) as s:
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").models.list()
        assert next(m.id for m in client(s, "s3cret").models.list()) == "coe"
        assert http("GET", f"{s.url}/v1/models")[0] == 401
        assert http("GET", f"{s.url}/health")[0] == 200


def test_full_queue_gets_429_with_retry_after(bundle: Path) -> None:
    with ServerThread(ServeOptions(bundle=bundle, engine=EngineConfig(max_queue=1, max_batch=1))) as s:
        results: list[tuple[int, dict[str, str]]] = []

        def one() -> None:
            st, hd, _ = http(
                "POST", f"{s.url}/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 300}
            )
            results.append((st, hd))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(st for st, _ in results)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        assert all(hd.get("retry-after") or hd.get("Retry-After") for st, hd in results if st == 429)


def test_an_expert_that_fails_to_load_gets_503_and_the_rest_serve(bundle: Path, tmp_path: Path) -> None:
    from wallbreak.coe.bundle.manifest import Bundle

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    blob = broken / Bundle.open(broken).expert("gamma").blob
    blob.write_bytes(blob.read_bytes()[:1000])  # truncated
    with ServerThread(ServeOptions(bundle=broken)) as s:
        c = client(s)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="gamma", prompt="x", max_tokens=2)
        assert e.value.status_code == 503
        assert c.completions.create(model="alpha", prompt="x", max_tokens=2).model == "alpha"
        with pytest.raises(openai.APIStatusError) as e:  # still refused, without another load attempt
            c.completions.create(model="gamma", prompt="x", max_tokens=2)
        assert e.value.status_code == 503
        assert "gamma" in json.loads(http("GET", f"{s.url}/health")[2])["unavailable"]


def test_sigterm_drains_in_flight_requests(bundle: Path) -> None:
    from wallbreak.coe.server.net import free_port

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "wallbreak.cli", "serve", "--bundle", str(bundle), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--no-compile"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if http("GET", f"{url}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        out: list[tuple[int, str]] = []
        body = {"model": "alpha", "prompt": "x", "max_tokens": 400, "stream": True, "temperature": 0}
        t = threading.Thread(target=lambda: out.append(http("POST", f"{url}/v1/completions", body)[::2]))
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        assert proc.wait(timeout=60) == 0
        status, text = out[0]
        assert status == 200 and text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    finally:
        if proc.poll() is None:
            proc.kill()


def test_burst_over_both_architectures_has_no_failures(arch_bundle_dir: Path) -> None:
    """What first failed in the field: concurrent chat requests, streaming and not, mixed prompt
    lengths past the sliding window, some clients leaving mid-stream. Nothing may fail."""
    import random

    with ServerThread(ServeOptions(bundle=arch_bundle_dir, engine=EngineConfig(max_batch=8))) as s:
        gemma = s.app.state.catalog.public_tokenizers()["gemma"]
        assert gemma.context == 4096  # the model's own context, not its window
        failures: list[str] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            rnd = random.Random(i)
            model = rnd.choice(["coe", "llama", "gemma"])
            words = " ".join(
                rnd.choice(["sea", "mountain", "river", "cloud"])
                for _ in range(rnd.randint(1, 60 if model == "gemma" else 10))
            )
            kw = {
                "model": model,
                "messages": [{"role": "user", "content": words}],
                "max_tokens": rnd.randint(1, 24),
            }
            try:
                if i % 3 == 0:
                    with client(s).chat.completions.create(**kw, stream=True) as stream:
                        for n, _chunk in enumerate(stream):
                            if i % 6 == 0 and n == 2:
                                break  # the client leaves mid-stream
                else:
                    client(s).chat.completions.create(**kw, temperature=rnd.choice([0, 0.8]))
            except Exception as e:  # any failure, of any kind, is what this test is about
                with lock:
                    failures.append(f"{model}: {e!r}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(36)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert failures == []
        deadline = time.monotonic() + 20
        while s.engine.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.engine.active() == 0
        text = http("GET", f"{s.url}/metrics")[2]
        assert 'status="503"' not in text and 'status="500"' not in text
