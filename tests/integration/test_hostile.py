"""What a hostile or careless client sends, through HTTP, while other clients' streams run on the
same expert: each bad request gets its own clear answer, and every stream finishes untouched."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import ServerThread, http
from wallbreak.coe.server.serve import ServeOptions


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wallbreak.coe.bundle.importers import synth_bundle

    out = tmp_path_factory.mktemp("hostile") / "b"
    synth_bundle(out, experts=2, params=300_000, names=["alpha", "beta"], seed=3)
    return out


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[ServerThread]:
    with ServerThread(ServeOptions(bundle=bundle, max_body=1 << 20)) as s:
        yield s


class Stream(threading.Thread):
    """One streamed completion read to its end: its text and how it finished."""

    def __init__(self, url: str, max_tokens: int = 400) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.text, self.finish, self.errors = "", None, []  # type: ignore[var-annotated]
        self.started = threading.Event()

    def run(self) -> None:
        import urllib.request

        body = {
            "model": "alpha",
            "prompt": "go",
            "max_tokens": self.max_tokens,
            "stream": True,
            "temperature": 0,
        }
        req = urllib.request.Request(
            f"{self.url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                self.started.set()
                if not line.startswith(b"data: {"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    self.errors.append(ev["error"]["message"])
                    continue
                c = ev["choices"][0]
                self.text += c["text"]
                self.finish = c["finish_reason"] or self.finish


def alone(server: ServerThread, max_tokens: int) -> str:
    _, _, text = http(
        "POST",
        f"{server.url}/v1/completions",
        {"model": "alpha", "prompt": "go", "max_tokens": max_tokens, "temperature": 0},
    )
    return str(json.loads(text)["choices"][0]["text"])


HOSTILE: list[tuple[dict[str, Any], int]] = [
    ({"seed": 2**64, "temperature": 0.8}, 400),  # past a signed 64-bit integer
    ({"seed": -(2**63) - 1}, 400),
    ({"temperature": 1e-40}, 200),  # greedy, as vLLM does
    ({"top_p": 1e-300, "temperature": 1.0}, 200),
    ({"stop": ["x" * 600, "y" * 600]}, 400),  # stop strings past 1024 characters in all
    ({"stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"max_tokens": 10**30}, 200),  # capped at the context
    ({"logprobs": 5, "seed": 2**63 - 1, "temperature": 1.5}, 200),
    # The OpenAI surface beside the streams: each its own rows, grammar and generators.
    ({"n": 8, "seed": 2**63 - 1, "temperature": 2.0, "logit_bias": {str(i): 100 for i in range(64)}}, 200),
    ({"n": 9}, 400),
    ({"logit_bias": {"99999999": 5}}, 400),  # past the vocabulary
    ({"logit_bias": {"-1": 5}}, 400),
    ({"presence_penalty": 2.0, "frequency_penalty": -2.0, "extra": "x", "repetition_penalty": 9.9}, 200),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, 400),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"pattern": "(?<=x)"}}}}, 400),
    ({"response_format": {"type": "json_object"}, "n": 3, "temperature": 2.0}, 200),
    ({"prompt": [[1, 2], [3]], "echo": True, "logprobs": 20, "max_tokens": 0}, 200),
    ({"prompt": [10**12]}, 400),
    ({"prompt": [[]]}, 400),
    ({"echo": True, "max_tokens": 0}, 200),
    ({"top_k": -5}, 400),
    ({"min_p": 1.5}, 400),
]


def test_hostile_values_never_touch_other_streams(server: ServerThread) -> None:
    want = alone(server, 2000)
    streams = [Stream(server.url, 2000) for _ in range(4)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(60)
    running = []
    for extra, status in HOSTILE:
        running.append(server.engine.active())
        got, _, text = http(
            "POST",
            f"{server.url}/v1/completions",
            {"model": "alpha", "prompt": "hi", "max_tokens": 3} | extra,
        )
        assert got == status, (extra, text)
        if got != 200:
            err = json.loads(text)["error"]
            assert err["param"] and err["message"], err
    assert min(running) >= 1, running  # the streams were running through all of it
    for s in streams:
        s.join(120)
        assert not s.errors and s.finish == "length" and s.text == want
    assert not server.engine.broken


def test_a_body_past_the_limit_gets_413(server: ServerThread) -> None:
    """A 10 MB body is refused on its declared length, before the server reads it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (10 << 20, b"{" + b" " * (64 << 10))
        )
        got = b""
        while b"}}" not in got and (part := sock.recv(65536)):
            got += part
    assert got.startswith(b"HTTP/1.1 413") and b"limit" in got


def test_a_chunked_body_past_the_limit_gets_413(server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"a" * (256 << 10)
        try:
            for _ in range(8):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server answered and closed before the rest arrived
        assert sock.recv(64).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_posts_need_a_json_content_type(server: ServerThread, ctype: str) -> None:
    """So a web page cannot POST to a local server that has no key (a 'simple' request)."""
    import urllib.error
    import urllib.request

    body = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 2}).encode()
    req = urllib.request.Request(
        f"{server.url}/v1/completions", body, {"Content-Type": ctype} if ctype else {}
    )
    if not ctype:
        req.remove_header("Content-type")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 415


def test_a_prompt_far_past_the_context_is_refused_before_tokenizing(server: ServerThread) -> None:
    context = server.app.state.catalog.public_tokenizers()["alpha"].context
    got, _, text = http(
        "POST", f"{server.url}/v1/completions", {"model": "alpha", "prompt": "a" * (context * 40)}
    )
    assert got == 400 and "characters" in json.loads(text)["error"]["message"]


def test_a_whole_answer_client_that_leaves_frees_its_row(server: ServerThread) -> None:
    """Not streamed: the server notices the closed connection and the engine drops the row at its
    next step, long before the 2,000 tokens it asked for."""
    tokens_before = server.engine.stats.tokens
    body = json.dumps({"model": "beta", "prompt": "go", "max_tokens": 100000, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    deadline = time.monotonic() + 30
    while server.engine.active() == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.engine.active() == 1
    sock.close()
    while server.engine.active() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.active() == 0
    context = server.app.state.catalog.public_tokenizers()["beta"].context
    assert server.engine.stats.tokens - tokens_before < context - 10  # it did not run to the end
    _, _, metrics = http("GET", f"{server.url}/metrics")
    assert 'endpoint="completions",expert="beta",status="499"' in metrics


def test_api_key_from_a_file(bundle: Path, tmp_path: Path) -> None:
    from wallbreak.cli.coe import api_key
    from wallbreak.errors import ConfigError

    f = tmp_path / "key"
    f.write_text("s3cret\n")
    assert api_key(None, f) == "s3cret"
    f.write_text("")
    with pytest.raises(ConfigError, match="alone, on one line"):
        api_key(None, f)
    with pytest.raises(ConfigError, match="not both"):
        api_key("k", f)


def test_a_damaged_tokenizer_makes_its_expert_unavailable_and_the_rest_serve(
    bundle: Path, tmp_path: Path
) -> None:
    import shutil

    from wallbreak.coe.bundle.manifest import Bundle

    root = tmp_path / "b"
    shutil.copytree(bundle, root)
    tok = Bundle.open(root).tokenizer_path("beta")
    assert tok is not None
    (tok / "tokenizer.json").write_text("{not json")
    with ServerThread(ServeOptions(bundle=root)) as s:
        got, _, text = http(
            "POST", f"{s.url}/v1/completions", {"model": "beta", "prompt": "x", "max_tokens": 2}
        )
        assert got == 503 and "beta" in json.loads(text)["error"]["message"]
        got, _, _ = http(
            "POST", f"{s.url}/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 2}
        )
        assert got == 200
        health = json.loads(http("GET", f"{s.url}/health")[2])
        assert "tokenizer" in health["unavailable"]["beta"] and str(tmp_path) not in json.dumps(health)
