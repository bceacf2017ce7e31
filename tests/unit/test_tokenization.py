"""The incremental detokenizer: the same text as decoding everything at once, and stop strings cut
where the streaming rule says, whatever the split of characters across tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wallbreak.coe.tokenization import ExpertTokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> ExpertTokenizer:
    from transformers import AutoTokenizer

    from wallbreak.coe.bundle.importers import byte_tokenizer_dir

    d = byte_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    return ExpertTokenizer("bytes", AutoTokenizer.from_pretrained(str(d)), 128, frozenset({258}))


# Text with multi-byte characters, so byte-level ids split characters across tokens.
texts = st.text(alphabet=st.sampled_from([*"ab c.\n", "é", "€", "😀", "ß"]), min_size=0, max_size=40)


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_deltas_add_up_to_the_full_decode(tok: ExpertTokenizer, text: str) -> None:
    ids = tok.encode_text(text)
    stream = tok.stream()
    deltas = [stream.push(i) for i in ids]
    out = "".join(deltas) + stream.finish()
    assert out == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)  # never half a character


@settings(max_examples=150, deadline=None)
@given(
    text=texts,
    stops=st.lists(
        st.text(alphabet=st.sampled_from([*"ab c", "é", "😀"]), min_size=1, max_size=3), max_size=3
    ),
)
def test_stop_strings_cut_where_the_streaming_rule_says(
    tok: ExpertTokenizer, text: str, stops: list[str]
) -> None:
    stream = tok.stream(tuple(stops))
    out = ""
    for i in tok.encode_text(text):
        out += stream.push(i)
        if stream.stopped:
            break
    out += stream.finish()
    # The streaming rule (OpenAI's, vLLM's): stop as soon as any stop string has appeared, cut at
    # its start; a longer stop string that would have begun earlier is not waited for.
    want, hit = text, False
    for k in range(1, len(text) + 1):
        found = [text[:k].find(s) for s in stops if s in text[:k]]
        if found:
            want, hit = text[: min(found)], True
            break
    assert out == want and stream.stopped == hit


def test_context_and_end_ids_come_from_the_bundle(arch_bundle_dir: Path) -> None:
    from wallbreak.coe.bundle.manifest import Bundle
    from wallbreak.coe.tokenization import load_tokenizers

    b = Bundle.open(arch_bundle_dir)
    toks = load_tokenizers(b, list(b.experts.values()))
    assert toks["gemma"].context == 4096 and toks["llama"].context == 128
    assert 258 in toks["gemma"].eos_ids  # <|im_end|>, the chat turn end, although the config names 258 too
    ids = toks["llama"].encode_chat([{"role": "user", "content": "hi"}])
    assert toks["llama"].decode(ids).endswith("assistant\n")


# A Hermes-style template that renders `tools` itself, and tool calls and results in its own forms.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:"
    "{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
    "{{ c.function.arguments.city }}{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_go_through_a_template_that_takes_them_and_a_generic_prompt_elsewhere(
    tok: ExpertTokenizer,
) -> None:
    import copy
    from dataclasses import replace

    from wallbreak.coe.server.protocol import ChatRequest
    from wallbreak.coe.server.tools import chat_messages

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = ChatRequest.model_validate(
        {
            "model": "bytes",
            "tools": [tool],
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
        }
    )
    native_tok = copy.deepcopy(tok.tokenizer)
    native_tok.chat_template = TOOLS_TEMPLATE
    native = replace(tok, tokenizer=native_tok)
    assert native.takes_tools and not tok.takes_tools
    msgs, tools = chat_messages(body, native)
    assert tools is not None and [m["role"] for m in msgs] == ["user", "assistant", "tool"]
    text = native.decode_all(native.encode_chat(msgs, tools))
    assert "TOOLS: get_weather" in text and "CALL get_weather Oslo" in text and "tool\nsunny" in text
    msgs, tools = chat_messages(body, tok)  # ChatML without tools: our generic prompt
    assert tools is None and [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    text = tok.decode_all(tok.encode_chat(msgs))
    assert '"name": "get_weather"' in text and "<tool_response>\nsunny\n</tool_response>" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text
