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
    got: list[Event] = []

    async def go() -> None:
        done = asyncio.Event()

        def emit(ev: Event) -> None:
            got.append(ev)
            if ev.finish_reason:
                done.set()

        params = SamplingParams(max_tokens=len(TOKENS), temperature=0)
        remote.submit(EngineRequest(expert, prompt, params, emit, tok.stream(stop)))
        await asyncio.wait_for(done.wait(), 30)

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
