"""Constrained decoding and the sampling surface, in the engine over a tiny Llama: the grammar always
holds, constrained rows leave the others' tokens alone, n choices are reproducible, penalties and
logit_bias do what they say, prompt log-probabilities equal transformers' own."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import Collector, make_tiny_llama_folder, running_engine
from wallbreak.coe.engine import Engine, Event, Request, SamplingParams
from wallbreak.coe.engine.sampling import Penalties, shaped
from wallbreak.coe.grammar import GrammarError, Grammars, tool_lark
from wallbreak.coe.server.tools import ToolStream


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_folder(tmp_path_factory.mktemp("hf") / "llama", seed=11, context=1024)


@pytest.fixture(scope="module")
def engine(folder: Path) -> Iterator[Engine]:
    from wallbreak.coe.bundle.importers import import_expert

    out = folder.parent / "bundle"
    import_expert(folder, "llama", out)
    with running_engine(out, max_wait_s=0.05, prefill_chunk=128) as eng:
        yield eng


GRAMMARS = Grammars()


class Choices:
    """Every choice's ids, text and end, for a request with n choices."""

    def __init__(self, n: int) -> None:
        self.c = [Collector() for _ in range(n)]
        self.prompt_logprobs: Any = None
        self.error: str | None = None
        import threading

        self.done = threading.Event()
        self.ended = 0

    def __call__(self, ev: Event) -> None:
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if ev.error or ev.finish_reason == "cancelled":
            self.error = ev.error or "cancelled"
            self.done.set()
            return
        self.c[ev.index](ev)
        if ev.finish_reason:
            self.ended += 1
            if self.ended == len(self.c):
                self.done.set()


def submit(eng: Engine, prompt: list[int], params: SamplingParams, grammar: Any = None) -> Choices:
    out = Choices(params.n)
    tok = eng.tokenizers["llama"]
    eng.submit(Request("llama", prompt, params, out, tok.stream(), grammar))
    return out


# -- the grammar holds ------------------------------------------------------------------------

_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(-50, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 100}),
    st.integers(1, 5).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=3, unique=True).map(
        lambda v: {"enum": v}
    ),
)


def _object(props: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.sets(st.sampled_from(sorted(props))).map(
        lambda req: {
            "type": "object",
            "properties": props,
            "required": sorted(req),
            "additionalProperties": False,
        }
    )


_names = st.text("abcdefgh", min_size=1, max_size=4)
schemas = st.recursive(
    _leaf,
    lambda kids: st.one_of(
        st.dictionaries(_names, kids, min_size=1, max_size=3).flatmap(_object),
        kids.map(lambda k: {"type": "array", "items": k, "maxItems": 2}),
    ),
    max_leaves=5,
).flatmap(lambda s: st.dictionaries(_names, st.just(s), min_size=1, max_size=2).flatmap(_object))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=schemas, seed=st.integers(0, 2**31))
def test_random_schemas_at_temperature_one_always_give_valid_json(
    engine: Engine, schema: dict[str, Any], seed: int
) -> None:
    g = GRAMMARS.json_schema(engine.tokenizers["llama"], schema, "schema")
    got = submit(engine, [1, 2, 3], SamplingParams(max_tokens=700, temperature=1.0, seed=seed), g)
    assert got.done.wait(60) and got.error is None
    c = got.c[0]
    assert c.finish == "stop", (schema, "".join(c.text))
    jsonschema.validate(json.loads("".join(c.text)), schema)


def test_a_batch_of_constrained_and_free_rows_leaves_each_free_row_its_own_tokens(engine: Engine) -> None:
    prompts = [[5, 6, 7], [40, 41, 42, 43], [90, 91]]
    greedy = SamplingParams(max_tokens=20, temperature=0)
    alone = []
    for p in prompts:
        got = submit(engine, p, greedy)
        assert got.done.wait(30)
        alone.append(got.c[0].tokens)
    g = GRAMMARS.json_schema(engine.tokenizers["llama"], {"type": "object"}, "schema")
    mixed = []
    for i, p in enumerate(prompts):  # a constrained row before and between the free ones
        mixed.append(submit(engine, [3, 4], SamplingParams(max_tokens=30, temperature=1.0, seed=i), g))
        mixed.append(submit(engine, p, greedy))
    for m in mixed:
        assert m.done.wait(60) and m.error is None
    assert [m.c[0].tokens for m in mixed[1::2]] == alone
    assert all("".join(m.c[0].text).startswith("{") for m in mixed[::2])


def test_grammar_errors_name_the_part_and_compiled_grammars_are_cached(engine: Engine) -> None:
    tok = engine.tokenizers["llama"]
    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    with pytest.raises(GrammarError, match=r"^schema\.properties\.a\.type: "):
        GRAMMARS.json_schema(tok, bad, "schema")
    with pytest.raises(GrammarError, match="look-around"):
        GRAMMARS.json_schema(tok, {"type": "string", "pattern": "(?<=a)b"}, "schema")
    grammars = Grammars()
    s = {"type": "object", "properties": {"x": {"type": "integer"}}}
    first = grammars.json_schema(tok, s, "schema")
    assert grammars.json_schema(tok, dict(s), "schema") is first and grammars.compiled == 1


# -- n choices, seeds ---------------------------------------------------------------------------


def test_n_choices_with_a_seed_are_reproducible_and_differ(engine: Engine) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, n=3)
    runs = []
    for _ in range(2):
        got = submit(engine, [7, 8, 9], params)
        assert got.done.wait(30) and got.error is None
        runs.append([c.tokens for c in got.c])
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0]}) == 3  # each choice its own stream
    one = submit(engine, [7, 8, 9], SamplingParams(max_tokens=12, temperature=1.0, seed=1234))
    assert one.done.wait(30) and one.c[0].tokens == runs[0][0]  # choice 0 is the seed's own draw


def test_n_choices_under_a_grammar_each_follow_it(engine: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"k": {"enum": ["a", "b", "c"]}},
        "required": ["k"],
        "additionalProperties": False,
    }
    g = GRAMMARS.json_schema(engine.tokenizers["llama"], schema, "schema")
    got = submit(engine, [1], SamplingParams(max_tokens=60, temperature=1.0, seed=3, n=4), g)
    assert got.done.wait(60) and got.error is None
    for c in got.c:
        assert c.finish == "stop"
        jsonschema.validate(json.loads("".join(c.text)), schema)


# -- prompt log-probabilities -------------------------------------------------------------------


def test_prompt_logprobs_equal_transformers_log_softmax(engine: Engine, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = [random.Random(0).randrange(3, 250) for _ in range(300)]  # three 128-column chunks
    got = submit(engine, ids, SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=2, logprobs=2))
    assert got.done.wait(60) and got.error is None
    assert got.c[0].finish == "length" and got.c[0].tokens == []
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    lps = got.prompt_logprobs
    assert lps[0] is None and len(lps) == len(ids)
    for t in range(1, len(ids)):
        assert lps[t].token == ids[t]
        assert abs(lps[t].logprob - float(ref[t - 1, ids[t]])) < 1e-4
        top = ref[t - 1].topk(2)
        assert [i for i, _ in lps[t].top] == top.indices.tolist()


# -- the sampling surface -----------------------------------------------------------------------


def test_logit_bias_and_penalties_reshape_the_logits() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, -1.0])
    p = SamplingParams(logit_bias=((0, 10.0),))
    assert int(shaped(logits, p, None, None).argmax()) == 0
    pen = Penalties.start(4, [1])
    pen.add(2)
    pen.add(2)
    rp = shaped(logits, SamplingParams(repetition_penalty=2.0), pen, None)
    assert rp.tolist() == [1.0, 1.0, 1.5, -1.0]  # seen ids 1 (prompt) and 2 (output): divided if > 0
    fp = shaped(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), pen, None)
    assert fp.tolist() == [1.0, 2.0, 3.0 - 1.0 - 0.25, -1.0]  # output ids only
    masked = shaped(logits, SamplingParams(), None, torch.tensor([True, False, False, True]))
    assert int(masked.argmax()) == 0 and masked[2] == float("-inf")


def test_top_k_min_p_and_logit_bias_in_the_engine(engine: Engine) -> None:
    forced = submit(engine, [4, 5], SamplingParams(max_tokens=6, temperature=0, logit_bias=((77, 100.0),)))
    assert forced.done.wait(30) and forced.c[0].tokens == [77] * 6
    k1 = submit(engine, [4, 5], SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=9))
    greedy = submit(engine, [4, 5], SamplingParams(max_tokens=8, temperature=0))
    tiny_p = submit(engine, [4, 5], SamplingParams(max_tokens=8, temperature=1.0, min_p=1.0, seed=9))
    for x in (k1, greedy, tiny_p):
        assert x.done.wait(30) and x.error is None
    assert k1.c[0].tokens == greedy.c[0].tokens == tiny_p.c[0].tokens
    rep = submit(engine, [4, 5], SamplingParams(max_tokens=12, temperature=0, frequency_penalty=2.0))
    assert rep.done.wait(30)
    assert rep.c[0].tokens != greedy.c[0].tokens or len(set(rep.c[0].tokens)) == len(rep.c[0].tokens)


# -- tool calls --------------------------------------------------------------------------------


def _tool_text(calls: list[tuple[str, dict[str, Any]]]) -> str:
    return "\n".join(
        f"<tool_call>{json.dumps({'name': n, 'arguments': a}, separators=(',', ':'))}</tool_call>"
        for n, a in calls
    )


@settings(max_examples=60, deadline=None)
@given(
    args=st.lists(
        st.dictionaries(st.text(min_size=1, max_size=5), st.one_of(st.integers(), st.text(max_size=12))),
        min_size=1,
        max_size=3,
    ),
    cuts=st.lists(st.integers(0, 400), max_size=30),
)
def test_streamed_tool_calls_reassemble_to_the_whole_calls(
    args: list[dict[str, Any]], cuts: list[int]
) -> None:
    calls = [(f"fn_{i}", a) for i, a in enumerate(args)]
    calls.append(("tricky", {"s": "}</tool_call> inside a string"}))
    text = _tool_text(calls)
    stream = ToolStream()
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    deltas = [d for a, b in itertools.pairwise(bounds) for d in stream.feed(text[a:b])]
    assembled: dict[int, dict[str, str]] = {}
    for d in deltas:
        for tc in d["tool_calls"]:
            entry = assembled.setdefault(tc["index"], {"name": "", "arguments": ""})
            entry["name"] += tc.get("function", {}).get("name") or ""
            entry["arguments"] += tc["function"]["arguments"]
    got = [(assembled[i]["name"], json.loads(assembled[i]["arguments"])) for i in sorted(assembled)]
    assert got == calls
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in stream.calls] == calls


def test_plain_text_under_the_auto_tool_grammar_streams_as_content(engine: Engine) -> None:
    stream = ToolStream()
    parts = [d for piece in ["He", "llo <b> there"] for d in stream.feed(piece)]
    assert "".join(d["content"] for d in parts) == "Hello <b> there"
    assert stream.message() == {"role": "assistant", "content": "Hello <b> there"}
    fn = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}]
    tok = engine.tokenizers["llama"]
    g = GRAMMARS.lark(tok, tool_lark(fn, required=True, parallel=False), "tools")
    got = submit(engine, [1, 2], SamplingParams(max_tokens=200, temperature=1.0, seed=5), g)
    assert got.done.wait(60) and got.c[0].finish == "stop"
    call = ToolStream()
    call.feed("".join(got.c[0].text))
    assert [c["function"]["name"] for c in call.calls] == ["f"]
    assert isinstance(json.loads(call.calls[0]["function"]["arguments"]), dict)


def test_tool_parameters_with_defs_compile_and_closed_objects_stay_closed(engine: Engine) -> None:
    from wallbreak.coe.grammar import SAFE_INTEGER, for_decoding, tool_call_schema

    def fn(name: str) -> dict[str, Any]:
        inner = {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9}}}
        props = {"a": {"$ref": "#/$defs/Inner"}, "b": {"$ref": "#/$defs/Inner/properties/v"}}
        return {
            "name": name,
            "parameters": {"$defs": {"Inner": inner}, "type": "object", "properties": props},
        }

    fns = [fn("one"), fn("two")]  # the same $defs name in both: each keeps its own
    schema = tool_call_schema(fns)
    assert set(schema["$defs"]) == {"one.Inner", "two.Inner"}
    assert schema["anyOf"][1]["properties"]["arguments"]["properties"]["a"] == {"$ref": "#/$defs/two.Inner"}
    tok = engine.tokenizers["llama"]
    g = Grammars().tools(tok, fns, required=True, parallel=False)
    got = submit(engine, [1, 2], SamplingParams(max_tokens=300, temperature=1.0, seed=2), g)
    assert got.done.wait(60) and got.c[0].finish == "stop"
    stream = ToolStream()
    stream.feed("".join(got.c[0].text))
    call = stream.calls[0]["function"]
    jsonschema.validate(
        {"name": call["name"], "arguments": json.loads(call["arguments"])}, schema
    )  # extra keys would fail: the objects were closed
    assert for_decoding({"type": "object"}) == {"type": "object"}  # json_object stays any object
    open_ = {"type": "object", "properties": {}, "additionalProperties": True}
    assert for_decoding(open_) == open_
    named = {"type": "object", "properties": {"properties": {"type": "string"}}}
    assert for_decoding(named)["properties"] == {"properties": {"type": "string"}}  # a property named so
    ints = for_decoding({"type": "array", "items": {"type": ["integer", "null"]}})["items"]
    assert (ints["minimum"], ints["maximum"]) == (-SAFE_INTEGER, SAFE_INTEGER)
    assert for_decoding({"type": "integer", "minimum": 0}) == {"type": "integer", "minimum": 0}
