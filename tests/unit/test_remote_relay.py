"""The Ray ingress's relay (`replicas.remote`): replicas send ids, the ingress turns them into text,
so text its detokenizer still held back (a possible stop string's start) survives a replica dying
mid-answer. The replica handles here are stand-ins that replay ids and then raise Ray's own actor
error; the real kill runs in tests/integration/test_ray_serve.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from wallbreak.coe.bundle.manifest import Bundle  # noqa: E402
from wallbreak.coe.engine import Event, SamplingParams  # noqa: E402
from wallbreak.coe.engine import Request as EngineRequest  # noqa: E402
from wallbreak.coe.replicas.placement import Placement  # noqa: E402
from wallbreak.coe.replicas.remote import RemoteEngine  # noqa: E402
from wallbreak.coe.tokenization import load_tokenizers  # noqa: E402

TOKENS = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 79, 75]  # "Hello, world! OK"


class Stream:
    """What `handle.options(stream=True).generate.remote(...)` returns: events, then maybe death."""

    def __init__(self, events: list[Event], die: bool) -> None:
        self.events, self.die = events, die

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[Event]:
        for ev in self.events:
            await asyncio.sleep(0)
            yield ev
        if self.die:
            raise ray.exceptions.RayActorError()

    def cancel(self) -> None:
        pass


class Status:
    """`handle.status.remote()`: what the ingress polls to see which replicas are up."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive

    async def remote(self) -> dict[str, object]:
        if not self.alive:
            raise ray.exceptions.RayActorError()
        return {"active": 0, "kv_bytes": 0, "engine": {}, "tiers": {}}


class Replica:
    """Replays TOKENS from where the prompt ends; the first replica dies after `die_after` ids."""

    def __init__(self, prompt: list[int], die_after: int | None) -> None:
        self.prompt, self.die_after = prompt, die_after
        self.generate = self
        self.status = Status(alive=die_after is None)

    def options(self, stream: bool) -> Replica:
        return self

    def remote(self, expert: str, blob: str | None, ids: list[int], params: SamplingParams) -> Stream:
        done = len(ids) - len(self.prompt)
        todo = TOKENS[done:]
        if self.die_after is not None:
            return Stream([Event(tokens=(t,)) for t in todo[: self.die_after]], die=True)
        events = [Event(tokens=(t,)) for t in todo]
        events[-1].finish_reason = "length"
        return Stream(events, die=False)


class Answer(list[Event]):
    """A request's events as the HTTP layer gets them (its `emit`); `done` is set at its end."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()

    def __call__(self, ev: Event) -> None:
        self.append(ev)
        if ev.finish_reason:
            self.done.set()


@pytest.mark.parametrize("die_after", [1, 3, 6, 13])
def test_text_held_back_survives_a_replica_that_dies(synth_bundle_dir: Path, die_after: int) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    expert = bundle.names[0]
    tok = load_tokenizers(bundle, [bundle.expert(expert)])[expert]
    stop = ("never appears",)  # 13 characters held back at every point
    want = tok.decode(TOKENS)
    alone = tok.stream(stop)
    assert "".join(alone.push(t) for t in TOKENS) + alone.finish() == want
    prompt = [1, 2, 3]
    handles = [Replica(prompt, die_after), Replica(prompt, None)]
    remote = RemoteEngine(bundle, handles, Placement.spread([expert], 2), max_queue=8)
    got = Answer()

    async def go() -> None:
        params = SamplingParams(max_tokens=len(TOKENS), temperature=0)
        remote.submit(EngineRequest(expert, prompt, params, got, tok.stream(stop)))
        await asyncio.wait_for(got.done.wait(), 30)

    asyncio.run(go())
    assert remote.retries == 1
    assert "".join(ev.text for ev in got) == want and got[-1].finish_reason == "length"
    assert [t for ev in got for t in ev.tokens] == TOKENS


@pytest.mark.parametrize(
    "params",
    [SamplingParams(n=2), SamplingParams(prompt_logprobs=1, max_tokens=0)],
)
def test_what_replicas_cannot_take_is_refused_by_name(synth_bundle_dir: Path, params: SamplingParams) -> None:
    from wallbreak.errors import ConfigError

    bundle = Bundle.open(synth_bundle_dir)
    expert = bundle.names[0]
    remote = RemoteEngine(bundle, [], Placement.spread([expert], 1), max_queue=8)
    with pytest.raises(ConfigError, match="not available with Ray replicas"):
        remote.submit(EngineRequest(expert, [1, 2], params, lambda ev: None))


class Held:
    """A replica deployment whose only replica has died: Ray Serve holds the call, no event comes."""

    def __init__(self) -> None:
        self.generate = self
        self.cancelled = 0

    def options(self, stream: bool) -> Held:
        return self

    def remote(self, *args: object) -> Held:
        return self

    def __aiter__(self) -> Held:
        return self

    async def __anext__(self) -> Event:
        await asyncio.Event().wait()  # never set: Ray waits for the restarted replica
        raise AssertionError("unreachable")

    def cancel(self) -> None:
        self.cancelled += 1


def test_a_call_held_for_a_dead_replica_moves_once_the_replica_is_marked_down(synth_bundle_dir: Path) -> None:
    """A request sent to replica 0 just after it died (before any relay saw the death) would wait
    for Ray to restart it; once another relay marks replica 0 down, it goes to replica 1."""
    bundle = Bundle.open(synth_bundle_dir)
    expert = bundle.names[0]
    prompt = [1, 2, 3]
    held = Held()
    remote = RemoteEngine(bundle, [held, Replica(prompt, None)], Placement.spread([expert], 1), max_queue=8)
    remote.placement = Placement(2, {expert: [0]})
    got = Answer()

    async def go() -> None:
        params = SamplingParams(max_tokens=len(TOKENS), temperature=0)
        remote.submit(EngineRequest(expert, prompt, params, got))
        await asyncio.sleep(1.0)
        assert got == [] and remote.retries == 0 and remote.placement.inflight == [1, 0]  # it waits
        remote.placement.mark_down(0)  # what a relay does when its stream from replica 0 fails
        await asyncio.wait_for(got.done.wait(), 30)

    asyncio.run(go())
    assert remote.retries == 1 and held.cancelled == 1
    assert [t for ev in got for t in ev.tokens] == TOKENS and got[-1].finish_reason == "length"


def test_a_drain_counts_requests_from_their_arrival_and_refuses_new_ones(synth_bundle_dir: Path) -> None:
    """SIGTERM through Ray: the drain waits for requests still being parsed or routed (not yet
    relayed), not only those a replica is generating for; /health polls do not count."""
    from wallbreak.coe.engine import ExpertUnavailable
    from wallbreak.coe.replicas.remote import CountRequests

    bundle = Bundle.open(synth_bundle_dir)
    expert = bundle.names[0]
    remote = RemoteEngine(bundle, [], Placement.spread([expert], 1), max_queue=8)
    release = asyncio.Event()
    seen: list[str] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        seen.append(scope["path"])
        if scope["path"] != "/health":
            await release.wait()

    counted = CountRequests(app, remote)

    async def go() -> None:
        slow = asyncio.ensure_future(counted({"type": "http", "path": "/v1/completions"}, None, None))
        await asyncio.sleep(0.05)
        await counted({"type": "http", "path": "/health"}, None, None)
        in_flight, quiet_s = remote.drain()
        assert in_flight == 1 and 0 <= quiet_s < 5
        assert remote.health()["requests_in_flight"] == 1
        with pytest.raises(ExpertUnavailable, match="shutting down"):
            remote.submit(EngineRequest(expert, [1], SamplingParams(), lambda ev: None))
        release.set()
        await slow
        assert remote.drain()[0] == 0

    asyncio.run(go())
    assert seen == ["/v1/completions", "/health"]
