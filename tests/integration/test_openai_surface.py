"""What client libraries send, through the official openai client (and instructor and
langchain-openai where installed): structured outputs, tools with a full agent loop, n > 1, echo with
prompt log-probabilities over token-id prompts, /tokenize, embeddings, generation_config defaults."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from helpers import ServerThread, fit_test_router, http, make_tiny_llama_folder
from wallbreak.coe.server.serve import ServeOptions

openai = pytest.importorskip("openai")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "now",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alpha's source: its generation_config asks for top_k 1 (greedy whatever the temperature)."""
    out = make_tiny_llama_folder(tmp_path_factory.mktemp("hf") / "alpha", seed=2, context=2048)
    cfg = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps(cfg | {"top_k": 1, "do_sample": True}))
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, folder: Path) -> Path:
    from wallbreak.coe.bundle.importers import import_expert

    out = tmp_path_factory.mktemp("surface") / "b"
    import_expert(folder, "alpha", out)
    for seed, name in ((3, "beta"), (4, "gamma")):
        import_expert(make_tiny_llama_folder(out.parent / name, seed=seed, context=2048), name, out)
    fit_test_router(out, tiny_bert)
    return out


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[ServerThread]:
    with ServerThread(ServeOptions(bundle=bundle)) as s:
        yield s


def client(s: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_json_schema_and_json_object_replies_always_parse(server: ServerThread) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "pet": {"enum": ["cat", "dog"]},
            "home": {
                "type": "object",
                "properties": {"rooms": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["rooms"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "pet", "home"],
        "additionalProperties": False,
    }
    c = client(server)
    for model in ("beta", "coe"):  # with the virtual model the router picks; the grammar still holds
        r = c.chat.completions.create(
            model=model,
            messages=user("apple banana"),
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
            temperature=1.0,
            n=3,
            max_tokens=300,
        )
        for ch in r.choices:
            assert ch.finish_reason == "stop"
            jsonschema.validate(json.loads(ch.message.content), schema)
    r2 = c.completions.create(
        model="gamma", prompt="x", max_tokens=200, extra_body={"response_format": {"type": "json_object"}}
    )
    assert r2.choices[0].finish_reason == "stop" and isinstance(json.loads(r2.choices[0].text), dict)


def test_a_schema_the_library_rejects_is_a_400_naming_the_part(server: ServerThread) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    body = {
        "model": "beta",
        "messages": user("x"),
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
    }
    got, _, text = http("POST", f"{server.url}/v1/chat/completions", body)
    err = json.loads(text)["error"]
    assert got == 400 and err["param"] == "response_format"
    assert err["message"].startswith("response_format.json_schema.schema.properties.a.type:")


def test_tool_calls_whole_streamed_and_the_agent_loop(server: ServerThread) -> None:
    c = client(server)
    r = c.chat.completions.create(
        model="alpha",
        messages=user("weather?"),
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        max_tokens=400,
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    call = msg.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "now")
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = c.chat.completions.create(
        model="beta",
        messages=user("weather?"),
        tools=[WEATHER, CLOCK],
        tool_choice=named,
        parallel_tool_calls=False,
        max_tokens=400,
        stream=True,
        temperature=1.0,
        seed=1,
    )
    parts: dict[int, dict[str, str]] = {}
    finish = None
    for ch in stream:
        for tc in ch.choices[0].delta.tool_calls or []:
            e = parts.setdefault(tc.index, {"name": "", "args": ""})
            e["name"] += (tc.function.name or "") if tc.function else ""
            e["args"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(parts) == [0] and parts[0]["name"] == "get_weather"
    args = json.loads(parts[0]["args"])
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    # The agent loop: the call and its result go back, and the next turn is answered.
    history = [
        *user("weather?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": parts[0]["args"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    again = c.chat.completions.create(model="beta", messages=history, tools=[WEATHER], max_tokens=20)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    rendered = http("POST", f"{server.url}/tokenize", {"model": "beta", "messages": history})
    text = http(
        "POST", f"{server.url}/detokenize", {"model": "beta", "tokens": json.loads(rendered[2])["tokens"]}
    )
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in json.loads(text[2])["prompt"]
    assert '"name": "get_weather"' in json.loads(text[2])["prompt"]


def test_tool_choice_without_tools_and_unknown_names_are_400s(server: ServerThread) -> None:
    for extra, says in (
        ({"tool_choice": "required"}, "needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "'nope', which tools does not define",
        ),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "not both"),
    ):
        got, _, text = http(
            "POST", f"{server.url}/v1/chat/completions", {"model": "beta", "messages": user("x")} | extra
        )
        assert got == 400 and says in json.loads(text)["error"]["message"], text


def test_n_choices_with_a_seed_reproduce(server: ServerThread) -> None:
    c = client(server)
    kw = {"model": "beta", "messages": user("hi"), "n": 3, "seed": 42, "temperature": 1.0, "max_tokens": 8}
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    assert len({x.message.content for x in a.choices}) > 1
    rendered = json.loads(
        http("POST", f"{server.url}/tokenize", {"model": "beta", "messages": user("hi")})[2]
    )
    assert a.usage.prompt_tokens == rendered["count"]  # the prompt counts once, whatever n
    assert a.usage.completion_tokens >= 3
    streamed: dict[int, str] = {}
    for ch in c.chat.completions.create(**kw, stream=True):
        for choice in ch.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == [x.message.content for x in a.choices]


def test_echo_with_logprobs_on_token_id_prompts_equals_transformers(
    server: ServerThread, folder: Path
) -> None:
    from transformers import AutoModelForCausalLM

    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]
    r = client(server).completions.create(
        model="alpha", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert [ch.index for ch in r.choices] == [0, 1]
    for ids, ch in zip(prompts, r.choices, strict=True):
        lp = ch.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for t in range(1, len(ids)):
            assert abs(lp.token_logprobs[t] - float(ref[t - 1, ids[t]])) < 1e-4
            assert max(lp.top_logprobs[t].values()) == pytest.approx(float(ref[t - 1].max()), abs=1e-4)
    zero = client(server).completions.create(model="alpha", prompt="abc", echo=True, max_tokens=0, logprobs=0)
    assert zero.choices[0].text == "abc" and zero.usage.completion_tokens == 0
    got, _, text = http(
        "POST", f"{server.url}/v1/completions", {"model": "alpha", "prompt": "abc", "max_tokens": 0}
    )
    assert got == 400 and "echo" in json.loads(text)["error"]["message"]
    got, _, text = http("POST", f"{server.url}/v1/completions", {"model": "coe", "prompt": [1, 2]})
    assert got == 400 and json.loads(text)["error"]["param"] == "model"
    got, _, text = http("POST", f"{server.url}/v1/completions", {"model": "alpha", "prompt": [99999]})
    assert got == 400 and "vocabulary" in json.loads(text)["error"]["message"]


def test_tokenize_detokenize_and_tokenizer_info(server: ServerThread) -> None:
    got, _, text = http(
        "POST", f"{server.url}/tokenize", {"model": "beta", "prompt": "hello", "return_token_strs": True}
    )
    out = json.loads(text)
    assert (
        got == 200
        and out["count"] == len(out["tokens"]) == len(out["token_strs"])
        and out["max_model_len"] == 2048
    )
    back = json.loads(http("POST", f"{server.url}/detokenize", {"model": "beta", "tokens": out["tokens"]})[2])
    assert back["prompt"] == "hello"
    info = json.loads(http("GET", f"{server.url}/tokenizer_info?model=beta")[2])
    assert info["eos_token"] and "chat_template" in info and info["vocab_size"] > 0
    assert http("GET", f"{server.url}/tokenizer_info")[0] == 400  # several experts: say which
    assert http("POST", f"{server.url}/tokenize", {"model": "coe", "prompt": "x"})[0] == 404


def test_embeddings_are_the_routers_vectors(server: ServerThread) -> None:
    router = server.app.state.catalog.router
    texts = ["apple banana pear", "car bus train"]
    r = client(server).embeddings.create(model=router.encoder.name, input=texts)
    want = router.encoder.encode(texts).vectors
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert np.allclose(got, want, atol=1e-6) and r.usage.prompt_tokens > 0
    b64 = client(server).embeddings.create(
        model=router.encoder.name, input=texts[0], encoding_format="base64"
    )
    assert np.allclose(np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype=np.float32), want[0])
    assert http("POST", f"{server.url}/v1/embeddings", {"model": "beta", "input": "x"})[0] == 404


def test_generation_config_defaults_apply_and_are_listed(server: ServerThread) -> None:
    cards = {m["id"]: m for m in json.loads(http("GET", f"{server.url}/v1/models")[2])["data"]}
    assert cards["alpha"]["generation_defaults"] == {"top_k": 1.0}
    c = client(server)
    # No temperature given: top_k 1 from alpha's generation_config makes it greedy.
    outs = {
        c.chat.completions.create(model="alpha", messages=user("hi"), max_tokens=8).choices[0].message.content
        for _ in range(3)
    }
    greedy = c.chat.completions.create(model="alpha", messages=user("hi"), max_tokens=8, temperature=0)
    assert outs == {greedy.choices[0].message.content}


def test_penalties_and_logit_bias_are_applied(server: ServerThread) -> None:
    c = client(server)
    tok = server.app.state.catalog.public_tokenizers()["gamma"]
    x = tok.encode_text("x", add_special_tokens=False)[0]
    kw = {
        "model": "gamma",
        "messages": user("hi"),
        "max_tokens": 5,
        "temperature": 0,
        "logit_bias": {str(x): 5},
    }
    assert c.chat.completions.create(**kw).choices[0].message.content == "xxxxx"
    # A penalty of 2 per use outweighs the bias of 5 from the third use on.
    damped = c.chat.completions.create(**kw, frequency_penalty=2.0).choices[0].message.content
    assert damped.startswith("xxx") and damped.count("x") == 3
    got, _, text = http(
        "POST",
        f"{server.url}/v1/chat/completions",
        {"model": "gamma", "messages": user("x"), "logit_bias": {"abc": 1}},
    )
    assert got == 400 and json.loads(text)["error"]["param"] == "logit_bias"


# -- referees: client libraries we did not write --------------------------------------------------


class Size(str, Enum):
    small = "small"
    large = "large"


def test_instructor_gets_a_valid_object_in_both_modes(server: ServerThread) -> None:
    instructor = pytest.importorskip("instructor")
    from pydantic import BaseModel, Field

    class Address(BaseModel):
        city: str = Field(max_length=6)
        number: int = Field(ge=1, le=99)

    class Shop(BaseModel):
        name: str = Field(max_length=6)
        size: Size
        address: Address

    for mode in (instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS):
        ic = instructor.from_openai(client(server), mode=mode)
        for i in range(3):
            shop = ic.chat.completions.create(
                model="beta",
                response_model=Shop,
                messages=user("a shop"),
                temperature=0.7,
                max_tokens=300,
                max_retries=0,
                seed=i,
            )
            assert isinstance(shop, Shop) and isinstance(shop.size, Size)


def test_langchain_structured_output_tools_and_a_tool_loop(server: ServerThread) -> None:
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from pydantic import BaseModel, Field

    class Pick(BaseModel):
        """A pick."""

        size: Size
        count: int = Field(ge=0, le=9)

    llm = lc.ChatOpenAI(
        model="beta", base_url=f"{server.url}/v1", api_key="unused", max_tokens=300, max_retries=0
    )
    for method in ("json_schema", "function_calling"):
        assert isinstance(llm.with_structured_output(Pick, method=method).invoke("pick one"), Pick)
    bound = llm.bind_tools([WEATHER], tool_choice="required")
    first = bound.invoke([HumanMessage("weather in Oslo?")])
    assert first.tool_calls and first.tool_calls[0]["name"] == "get_weather"
    loop = [
        HumanMessage("weather in Oslo?"),
        first,
        ToolMessage("sunny", tool_call_id=first.tool_calls[0]["id"]),
    ]
    second = llm.bind_tools([WEATHER]).invoke(loop)
    assert second.content is not None or second.tool_calls


def test_several_prompts_with_n_choices_come_back_in_order(server: ServerThread) -> None:
    r = client(server).completions.create(
        model="gamma", prompt=["ab", "cd", "ef"], n=2, max_tokens=3, temperature=1.0, seed=4
    )
    assert [c.index for c in r.choices] == list(range(6))
    alone = [
        client(server).completions.create(model="gamma", prompt=p, n=2, max_tokens=3, temperature=1.0, seed=4)
        for p in ("ab", "cd", "ef")
    ]
    assert [c.text for c in r.choices] == [c.text for a in alone for c in a.choices]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
