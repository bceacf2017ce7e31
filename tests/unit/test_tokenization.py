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
