"""Engine: batched decoding equals decoding alone, the scheduler's policies, prefetch, the KV budget."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import Collector, make_engine, run, running_engine
from wallbreak.coe.bench.serve import steps_by_rows
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.engine import POLICIES, Engine, Request, SamplingParams
from wallbreak.coe.engine.engine import EngineStats
from wallbreak.coe.engine.kv import decode_attention, write_columns
from wallbreak.coe.engine.scheduler import Scheduler


@pytest.fixture()
def engine(synth_bundle_dir: Path) -> Iterator[Engine]:
    with running_engine(synth_bundle_dir) as eng:
        yield eng


def test_batched_greedy_decoding_equals_decoding_alone(engine: Engine) -> None:
    expert = engine.experts[0]
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [90, 91, 92, 93]]
    alone = []
    for p in prompts:
        c = run(engine, expert, p, 12)
        assert c.done.wait(30)
        alone.append(c.tokens)
    # Now together, the later ones joining a batch already under way (different lengths: padding).
    together = [run(engine, expert, prompts[0], 12)]
    time.sleep(0.01)
    together += [run(engine, expert, p, 12) for p in prompts[1:]]
    for c in together:
        assert c.done.wait(30) and c.finish == "length"
    assert [c.tokens for c in together] == alone
    # Every decode step was timed under its rows and path, batches under their own row counts.
    public = json.loads(json.dumps(engine.stats.public()))
    cells = public["step_seconds"]
    assert sum(n for n, _ in cells.values()) == public["steps"]
    assert sum(int(k.split("/")[0]) * n for k, (n, _) in cells.items()) == public["tokens"]
    rows = max(cells, key=lambda k: int(k.split("/")[0]))
    assert int(rows.split("/")[0]) >= 2 and all(secs > 0 for _, secs in cells.values())
    fleet = EngineStats()
    fleet.add(public)
    fleet.add(public)  # two replicas' figures sum, cell by cell
    assert fleet.steps == 2 * public["steps"] and fleet.step_seconds[rows][0] == 2 * cells[rows][0]
    by_rows = steps_by_rows({}, cells)
    assert by_rows[rows]["steps"] == cells[rows][0]
    assert sum(c["token_share"] for c in by_rows.values()) == pytest.approx(1.0, abs=0.01)


def test_stop_strings_end_generation_without_emitting_them(engine: Engine) -> None:
    expert = engine.experts[1]
    full = run(engine, expert, [3, 4, 5], 30)
    assert full.done.wait(30)
    text = "".join(full.text)
    assert text == engine.tokenizers[expert].decode(full.tokens)
    stop = text[5:7]
    cut = run(engine, expert, [3, 4, 5], 30, stop=(stop,))
    assert cut.done.wait(30) and cut.finish == "stop"
    assert "".join(cut.text) == text[: text.find(stop)]
    assert len(cut.tokens) < len(full.tokens)  # generation really ended there


def test_ignore_eos_runs_an_answer_to_max_tokens(engine: Engine) -> None:
    expert = engine.experts[1]
    eos = min(engine.tokenizers[expert].eos_ids)
    results = []
    for ignore in (False, True):
        c = Collector()
        params = SamplingParams(max_tokens=6, temperature=0, logit_bias=((eos, 100.0),), ignore_eos=ignore)
        engine.submit(Request(expert, [3, 4, 5], params, c))
        assert c.done.wait(30)
        results.append((c.finish, c.tokens))
    assert results[0] == ("stop", [])  # the end token, forced first, ends the answer
    assert results[1] == ("length", [eos] * 6)  # ignored: an ordinary token, to max_tokens


def test_cancelled_requests_leave_the_batch(engine: Engine) -> None:
    c = Collector()
    req = Request(engine.experts[0], [1, 2, 3], SamplingParams(max_tokens=100000, temperature=0), c)
    engine.submit(req)
    deadline = time.monotonic() + 10
    while engine.active() == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    req.cancel()
    assert c.done.wait(10) and c.finish == "cancelled"
    deadline = time.monotonic() + 10
    while engine.active() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active() == 0


def test_prefetch_moves_the_next_expert_up_while_one_decodes(engine: Engine) -> None:
    a, b = engine.experts[2], engine.experts[3]
    long = run(engine, a, [1, 2, 3], 300)
    time.sleep(0.05)
    short = run(engine, b, [1, 2], 3)  # queued behind a: the engine prefetches b
    assert long.done.wait(60) and short.done.wait(60)
    s = engine.tiers.stats
    assert s.prefetch_loads >= 1
    assert s.hits["device"] >= 1  # b was already on the device when the engine switched to it


def test_kv_budget_holds_back_what_would_not_fit(synth_bundle_dir: Path) -> None:
    from wallbreak.coe.engine.runner import kv_bytes_per_row

    bundle = Bundle.open(synth_bundle_dir)
    from transformers import AutoConfig

    cfg = dict(bundle.expert(bundle.names[0]).config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    import torch

    one = kv_bytes_per_row(config, torch.float32, 3 + 20)
    eng, tiers = make_engine(synth_bundle_dir, kv_budget=2 * one + 1)  # room for two such rows
    sizes: list[int] = []

    class Sizes:
        def on_switch(self, expert: str, seconds: float, moved_bytes: int) -> None:
            pass

        def on_step(self, expert: str, batch_size: int) -> None:
            sizes.append(batch_size)

    eng.add_listener(Sizes())
    expert = eng.experts[0]
    cs = [run(eng, expert, [1, 2, 3], 20) for _ in range(5)]  # queued before the engine starts
    eng.start()
    try:
        assert all(c.done.wait(60) and c.finish == "length" for c in cs)
    finally:
        eng.stop(timeout=5)
        tiers.close()
    assert max(sizes) == 2  # never more rows than the budget allows, and it did batch


def make_req(expert: str, arrived: float) -> Request:
    return Request(expert, [1], SamplingParams(), lambda ev: None, arrived=arrived)


def test_fairness_bound_drains_then_preempts_a_busy_expert() -> None:
    now = [0.0]
    sch = Scheduler(POLICIES["ours"], max_batch=4, max_wait_s=2.0, clock=lambda: now[0])
    for _ in range(3):
        sch.submit(make_req("a", now[0]))
    sch.submit(make_req("b", now[0]))
    assert sch.choose(None, {}) == "a"  # as old as b, and more work
    assert len(sch.take("a", 0)) == 3
    for t in (0.5, 1.0, 1.9):  # new a-requests keep arriving and join the running batch
        now[0] = t
        sch.submit(make_req("a", t))
        assert sch.choose("a", {"a": 3}) == "a"
        assert len(sch.take("a", 3)) == 1
    now[0] = 2.01  # b is overdue: a's batch takes nobody new, so it drains
    sch.submit(make_req("a", now[0]))
    assert sch.choose("a", {"a": 3}) == "a"
    assert sch.take("a", 3) == []
    assert sch.choose("a", {}) == "b"  # drained: b runs, although a has more waiting
    assert [r.expert for r in sch.take("b", 0)] == ["b"]
    # A batch that does not drain is preempted once someone has waited 3 x max_wait.
    now[0] = 10.0
    sch.submit(make_req("b", now[0]))
    assert sch.choose("a", {"a": 4}) == "a"
    now[0] = 16.01
    assert sch.choose("a", {"a": 4}) == "b"
    sch.set_paused("a", True)
    assert sch.upcoming(exclude="b")[0] == "a"  # the paused batch is next in line for prefetch


def test_ours_charges_each_candidate_its_switch() -> None:
    now = [10.0]
    sch = Scheduler(POLICIES["ours"], max_batch=4, max_wait_s=5.0, clock=lambda: now[0])
    sch.submit(make_req("cold", 8.0))  # older by a second, but still on disk: 2 s to load
    sch.submit(make_req("warm", 9.0))  # resident
    costs = {"cold": 2.0, "warm": 0.0}
    assert sch.choose(None, {}, costs.__getitem__) == "warm"
    costs["cold"] = 0.5  # prefetch brought it most of the way up: now the older request goes first
    assert sch.choose(None, {}, costs.__getitem__) == "cold"
    now[0] = 13.5  # overdue beats any switch cost
    costs["cold"] = 100.0
    assert sch.choose(None, {}, costs.__getitem__) == "cold"


def test_ours_ranks_a_request_that_arrived_at_time_zero_as_the_oldest() -> None:
    """A clock may read 0.0 (a simulated one does): that is a time, not a missing one."""
    now = [0.0]
    sch = Scheduler(POLICIES["ours"], max_batch=4, max_wait_s=5.0, clock=lambda: now[0])
    sch.submit(make_req("first", 0.0))
    now[0] = 1.0
    sch.submit(make_req("second", 1.0))
    now[0] = 2.0  # neither is overdue yet
    assert sch.choose(None, {}) == "first"


def test_fcfs_lru_runs_one_request_at_a_time_in_arrival_order() -> None:
    sch = Scheduler(POLICIES["fcfs-lru"], max_batch=16, max_wait_s=2.0)
    for i, e in enumerate("abab"):
        sch.submit(make_req(e, float(i)))
    assert sch.choose(None, {}) == "a"
    assert len(sch.take("a", 0)) == 1
    assert sch.choose("a", {"a": 1}) == "a"  # runs to completion
    assert sch.choose("a", {}) == "b"  # then strictly the oldest, even if a switch is needed


def test_per_expert_lru_runs_the_oldest_requests_expert_and_batches_it() -> None:
    now = [0.0]
    sch = Scheduler(POLICIES["per-expert-lru"], max_batch=16, max_wait_s=2.0, clock=lambda: now[0])
    for i, e in enumerate("baaba"):
        sch.submit(make_req(e, float(i)))
    now[0] = 4.5
    assert sch.choose(None, {}) == "b"  # the oldest request's expert, though a has more work
    assert [r.arrived for r in sch.take("b", 0)] == [0.0, 3.0]  # all of b's waiting requests
    now[0] = 4.6
    sch.submit(make_req("b", now[0]))
    assert sch.take("b", 2) == []  # a has waited past max_wait: b's batch takes nobody new
    assert sch.choose("b", {"b": 2}) == "b"  # ... and is never preempted: it drains
    assert sch.choose("b", {}) == "a"
    assert len(sch.take("a", 0)) == 3
    sch.submit(make_req("a", now[0]))
    assert len(sch.take("a", 3)) == 1  # nobody else overdue: newcomers join the running batch


def test_requeue_puts_requests_back_in_order() -> None:
    sch = Scheduler(POLICIES["ours"])
    for i in range(4):
        sch.submit(make_req("a", float(i)))
    taken = sch.take("a", 0)
    sch.requeue("a", taken[2:])
    assert [r.arrived for r in sch.take("a", 0)] == [2.0, 3.0]


def test_sampling_greedy_seeded_and_nucleus() -> None:
    import torch

    from wallbreak.coe.engine.sampling import sample

    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    assert sample(logits, SamplingParams(temperature=0), None) == 1
    draws = {
        sample(logits, SamplingParams(temperature=1.0, seed=1), torch.Generator().manual_seed(s))
        for s in range(50)
    }
    assert draws <= {0, 1, 2, 3} and len(draws) > 1
    # top_p keeps the smallest set of tokens whose mass reaches p: here only tokens 1 and 2.
    nucleus = {sample(logits, SamplingParams(top_p=0.8), torch.Generator().manual_seed(s)) for s in range(50)}
    assert nucleus == {1, 2}
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [sample(logits, SamplingParams(), g1) for _ in range(10)] == [
        sample(logits, SamplingParams(), g2) for _ in range(10)
    ]


def test_logprobs_are_the_models_log_softmax() -> None:
    import torch

    from wallbreak.coe.engine.sampling import logprob_of

    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    lp = logprob_of(logits, 2, 2)
    ref = torch.log_softmax(logits, -1)
    assert lp.token == 2 and lp.logprob == pytest.approx(float(ref[2]))
    assert [t for t, _ in lp.top] == [1, 2] and lp.top[0][1] == pytest.approx(float(ref[1]))


def test_ours_preempts_only_an_expert_that_held_the_engine_a_whole_slice() -> None:
    now = [0.0]
    sch = Scheduler(POLICIES["ours"], max_batch=4, max_wait_s=1.0, clock=lambda: now[0])
    sch.submit(make_req("a", 0.0))
    assert sch.choose(None, {}) == "a"
    sch.take("a", 0)
    sch.submit(make_req("b", 0.5))
    now[0] = 2.0  # a has held the engine 2 s, b waited 1.5 s: a's batch drains, no preemption yet
    assert sch.choose("a", {"a": 1}) == "a"
    now[0] = 3.6  # b waited 3.1 s > 3 x max_wait, and a has held the engine 3.6 s: preempt
    assert sch.choose("a", {"a": 1}) == "b"
    sch.take("b", 0)
    sch.set_paused("a", True)
    sch.submit(make_req("c", 3.6))
    now[0] = 6.5  # a and c have waited about 3 s, but b has held the engine only 2.9 s: no preemption
    assert sch.choose("b", {"b": 1, "a": 1}) == "b"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_columns_puts_each_rows_columns_at_its_own_positions(dtype: torch.dtype) -> None:
    block = torch.randn(3, 2, 16, 4).to(dtype)
    before = block.clone()
    new = torch.randn(3, 2, 2, 4).to(dtype).transpose(1, 2)  # as attention hands it over: strided
    starts = [0, 5, 13]
    index = (torch.tensor(starts)[:, None] + torch.arange(2))[:, None, :, None]
    write_columns(block, index, new)
    expected = before.clone()
    for b, s in enumerate(starts):
        expected[b, :, s : s + 2] = new[b]
    assert torch.equal(block, expected)  # byte-exact, and nothing else in the block moved


def test_decode_attention_folds_grouped_heads_and_matches_sdpa_on_all_heads() -> None:
    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    rows, kv_heads, width, dim = 2, 2, 9, 8
    key, value = torch.randn(rows, kv_heads, width, dim), torch.randn(rows, kv_heads, width, dim)
    mask = torch.ones(rows, 1, 1, width, dtype=torch.bool)
    mask[0, ..., 5:] = False  # row 0 is shorter
    query = torch.randn(rows, kv_heads * 3, 1, dim)
    out, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
    every_head = F.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask, scale=0.3
    )
    assert out.shape == (rows, 1, kv_heads * 3, dim)
    torch.testing.assert_close(out, every_head.transpose(1, 2))
    # a prefill chunk (several query columns) goes through transformers' own path, unchanged
    query4 = torch.randn(rows, kv_heads * 3, 4, dim)
    mask4 = torch.ones(rows, 1, 4, width, dtype=torch.bool)
    out4, _ = decode_attention(module, query4, key, value, mask4, scaling=0.3)
    ref4 = F.scaled_dot_product_attention(
        query4, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask4, scale=0.3
    )
    torch.testing.assert_close(out4, ref4.transpose(1, 2))
