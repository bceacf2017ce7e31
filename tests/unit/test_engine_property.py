"""Property: however requests arrive, stop, get cancelled or preempted, greedy decoding in a batch
produces exactly what each request produces alone, on every architecture the importers accept.

The driver is the engine's own loop made deterministic: ticks, one expert's batch steps per tick
(switching experts mid-batch is a preemption: the other batch keeps its KV cache and resumes),
requests join between steps, cancellations land between steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.cores import intra_op_threads
from wallbreak.coe.engine import Event, Request, SamplingParams
from wallbreak.coe.engine.runner import Batch
from wallbreak.coe.tiers import TierConfig, TierManager
from wallbreak.coe.tokenization import ExpertTokenizer, load_tokenizers

EXPERTS = ("llama", "gemma")


@dataclass
class Out:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finishes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __call__(self, ev: Event) -> None:
        self.tokens.extend(ev.tokens)
        self.text += ev.text
        if ev.error:
            self.errors.append(ev.error)
        if ev.finish_reason:
            self.finishes.append(ev.finish_reason)


@dataclass
class World:
    models: dict[str, Any]
    toks: dict[str, ExpertTokenizer]

    def batch(self, expert: str, chunk: int = 5) -> Batch:
        t = self.toks[expert]
        return Batch(expert, t.eos_ids, t.context, prefill_chunk=chunk)

    def request(
        self, expert: str, prompt: list[int], max_tokens: int, stop: tuple[str, ...]
    ) -> tuple[Request, Out]:
        out = Out()
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        return Request(expert, prompt, params, out, self.toks[expert].stream(stop)), out

    def alone(self, expert: str, prompt: list[int], max_tokens: int, stop: tuple[str, ...] = ()) -> Out:
        req, out = self.request(expert, prompt, max_tokens, stop)
        b = self.batch(expert)
        b.admit(self.models[expert], [req])
        while len(b):
            b.step(self.models[expert])
        return out


@pytest.fixture(scope="module")
def world(arch_bundle_dir: Path) -> Iterator[World]:
    """The two experts, stepped on this thread with one intra-op thread: these models are too small
    to gain from more, and beside the suite's other worker two threads on two cores made libgomp's
    team sleep between the many short parallel regions of a step (the module took 257 s in `make
    test` on the 2-core CPU machine, 31 s on one thread)."""
    intra_op_threads()  # read first: the process's own count, which `split_linears` uses from now on
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield from _world(arch_bundle_dir)
    finally:
        torch.set_num_threads(threads)


def _world(arch_bundle_dir: Path) -> Iterator[World]:
    bundle = Bundle.open(arch_bundle_dir)
    total = sum(e.total_bytes for e in bundle.experts.values()) + (1 << 20)
    with TierManager(bundle, TierConfig(host_budget=total, device_budget=total)) as tiers:
        leases = [tiers.acquire(e) for e in EXPERTS]
        try:
            yield World({lz.expert: lz.model for lz in leases}, load_tokenizers(bundle, tiers.entries))
        finally:
            for lz in leases:
                lz.release()


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    reqs = [
        {
            "expert": draw(st.sampled_from(EXPERTS)),
            # Up to 3x the gemma expert's sliding window, so prompts and outputs cross it.
            "prompt": draw(st.lists(st.integers(3, 250), min_size=1, max_size=24)),
            "max_tokens": draw(st.integers(1, 14)),
            "arrive": draw(st.integers(0, 12)),
            "cancel": draw(st.none() | st.integers(0, 20)),
            "stop": draw(st.none() | st.tuples(st.integers(0, 12), st.integers(1, 3))),
        }
        for _ in range(draw(st.integers(1, 6)))
    ]
    order = draw(st.lists(st.sampled_from(EXPERTS), min_size=1, max_size=40))  # who steps at each tick
    return {"reqs": reqs, "order": order, "chunk": draw(st.integers(1, 9))}


def expected(world: World, r: dict[str, Any]) -> tuple[tuple[str, ...], Out]:
    """The request's stop strings (cut from its own output, so they do occur) and its alone run."""
    free = world.alone(r["expert"], r["prompt"], r["max_tokens"])
    stop: tuple[str, ...] = ()
    if r["stop"] is not None:
        at, n = r["stop"]
        if free.text[at : at + n]:
            stop = (free.text[at : at + n],)
    return stop, world.alone(r["expert"], r["prompt"], r["max_tokens"], stop) if stop else free


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_any_interleaving_produces_what_each_request_produces_alone(world: World, sc: dict[str, Any]) -> None:
    want = [expected(world, r) for r in sc["reqs"]]
    live = [
        world.request(r["expert"], r["prompt"], r["max_tokens"], stop)
        for r, (stop, _) in zip(sc["reqs"], want, strict=True)
    ]
    batches = {e: world.batch(e, sc["chunk"]) for e in EXPERTS}
    admitted = [False] * len(live)
    for tick in range(400):
        has_work = {
            e: len(batches[e]) > 0
            or any(
                not admitted[i] and r["arrive"] <= tick and r["expert"] == e for i, r in enumerate(sc["reqs"])
            )
            for e in EXPERTS
        }
        expert = sc["order"][tick % len(sc["order"])]
        if not has_work[expert]:  # as the engine does: an expert without work gives way
            expert = next((e for e in EXPERTS if has_work[e]), expert)
        for i, r in enumerate(sc["reqs"]):
            if r["cancel"] is not None and r["cancel"] <= tick:
                live[i][0].cancel()
        new = [
            live[i][0]
            for i, r in enumerate(sc["reqs"])
            if not admitted[i] and r["arrive"] <= tick and r["expert"] == expert
        ]
        admitted = [a or (live[i][0] in new) for i, a in enumerate(admitted)]
        if new:
            batches[expert].admit(world.models[expert], new)
        batches[expert].step(world.models[expert])
        if all(admitted) and not any(len(b) for b in batches.values()):
            break
    for (_req, out), r, (_, alone) in zip(live, sc["reqs"], want, strict=True):
        assert not out.errors and len(out.finishes) == 1, (r, out)
        if out.finishes == ["cancelled"]:
            assert out.tokens == alone.tokens[: len(out.tokens)]  # a prefix, cut where it was cancelled
            continue
        assert out.tokens == alone.tokens, r
        assert out.text == alone.text and out.finishes == alone.finishes, r
    for b in batches.values():
        assert len(b) == 0 and (b.cache is None or b.cache.rows == 0)


def test_batched_decoding_matches_transformers_generate(world: World) -> None:
    """The engine's own runs agree with plain `generate`, past the sliding window too."""
    import torch

    for expert, model in world.models.items():
        prompts = [list(range(3, 3 + n)) for n in (5, 3, 20, 11)]
        reqs = [world.request(expert, p, 15, ()) for p in prompts]
        b = world.batch(expert, chunk=4)
        b.admit(model, [reqs[0][0], reqs[1][0]])
        for _ in range(3):
            b.step(model)
        b.admit(model, [reqs[2][0], reqs[3][0]])
        while len(b):
            b.step(model)
        eos = sorted(world.toks[expert].eos_ids)
        for p, (_, out) in zip(prompts, reqs, strict=True):
            ref = model.generate(
                torch.tensor([p]), max_new_tokens=15, do_sample=False, eos_token_id=eos, pad_token_id=0
            )[0, len(p) :].tolist()
            ends = [i for i, t in enumerate(ref) if t in eos]
            assert out.tokens == ref[: ends[0]] if ends else ref, expert


class FailingDetokenizer:
    """A detokenizer that raises on its k-th token: a stop-string or decode bug of one request."""

    stopped = False

    def __init__(self, inner: Any, k: int) -> None:
        self.inner, self.k = inner, k

    def push(self, token: int) -> str:
        self.k -= 1
        if self.k < 0:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "poisoned")
        return str(self.inner.push(token))

    def finish(self) -> str:
        return str(self.inner.finish())


POISONS = ("seed", "detokenizer", "prompt", "logprobs")


def poisoned(world: World, expert: str, kind: str, k: int) -> tuple[Request, Out]:
    """A request whose own values break: a seed torch refuses, a detokenizer that raises, a prompt
    id past the vocabulary (its prefill fails), a top-k wider than the vocabulary."""
    out = Out()
    prompt, params = [5, 6, 7], SamplingParams(max_tokens=8, temperature=0)
    detok: Any = world.toks[expert].stream()
    if kind == "seed":
        params = SamplingParams(max_tokens=8, temperature=0.7, seed=1 << 64)
    elif kind == "detokenizer":
        detok = FailingDetokenizer(detok, k)
    elif kind == "prompt":
        prompt = [5, 10**6, 7]
    else:
        params = SamplingParams(max_tokens=8, temperature=0, logprobs=10**6)
    return Request(expert, prompt, params, out, detok), out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sc=scenarios(),
    kind=st.sampled_from(POISONS),
    k=st.integers(0, 4),
    at=st.integers(0, 6),
    expert=st.sampled_from(EXPERTS),
)
def test_a_poisoned_request_fails_alone(
    world: World, sc: dict[str, Any], kind: str, k: int, at: int, expert: str
) -> None:
    """Whatever one request brings, it gets an error event, and every other request of its batch
    (and the other expert's) produces exactly the tokens it produces alone."""
    want = [world.alone(r["expert"], r["prompt"], r["max_tokens"]) for r in sc["reqs"]]
    live = [world.request(r["expert"], r["prompt"], r["max_tokens"], ()) for r in sc["reqs"]]
    bad, bad_out = poisoned(world, expert, kind, k)
    batches = {e: world.batch(e, sc["chunk"]) for e in EXPERTS}
    pending = [(r["arrive"], req) for r, (req, _) in zip(sc["reqs"], live, strict=True)] + [(at, bad)]
    for tick in range(400):
        for e in EXPERTS:
            new = [req for t, req in pending if t <= tick and req.expert == e]
            pending = [(t, req) for t, req in pending if req not in new]
            if new:
                batches[e].admit(world.models[e], new)
            batches[e].step(world.models[e])
        if not pending and not any(len(b) for b in batches.values()):
            break
    assert bad_out.finishes == ["error"] and len(bad_out.errors) == 1, (kind, bad_out)
    for (_, out), alone, r in zip(live, want, sc["reqs"], strict=True):
        assert not out.errors and out.tokens == alone.tokens and out.finishes == alone.finishes, r


def test_a_batch_whose_step_fails_goes_on_row_by_row(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step that fails for the whole batch (as an out-of-memory might) is retried for each
    row alone: the rows that succeed alone go on and produce what they produce alone."""
    expert, model = "llama", world.models["llama"]
    prompts = [[3, 4, 5], [9, 8], [20, 21, 22, 23]]
    want = [world.alone(expert, p, 10).tokens for p in prompts]
    real = Batch._decode
    calls = {"failed": 0}

    def flaky(self: Batch, m: Any, next_ids: list[int], cache: Any) -> Any:
        if len(next_ids) > 1:
            calls["failed"] += 1
            raise RuntimeError("out of memory (injected for batches of more than one row)")
        if next_ids[0] == want[1][3]:  # the second request's fifth step fails alone too
            raise RuntimeError("a fault that follows this row")
        return real(self, m, next_ids, cache)

    reqs = [world.request(expert, p, 10, ()) for p in prompts]
    b = world.batch(expert)
    b.admit(model, [r for r, _ in reqs])
    monkeypatch.setattr(Batch, "_decode", flaky)
    while len(b):
        b.step(model)
    assert calls["failed"] > 0
    outs = [o for _, o in reqs]
    assert outs[1].finishes == ["error"] and outs[1].tokens == want[1][:4]
    for i in (0, 2):
        assert not outs[i].errors and outs[i].tokens == want[i]
