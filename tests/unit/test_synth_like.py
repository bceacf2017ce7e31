"""`bundle synth --like SRC`: experts of a real architecture, SRC's weights plus seeded noise, each
distinct in bytes, verifiable, with a topic's description and examples, written one at a time."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_llama_folder
from wallbreak.coe.bundle import topics
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.bundle.synth_like import perturbed, synth_like_bundle


@pytest.fixture(scope="module")
def tied_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_folder(tmp_path_factory.mktemp("like") / "src", seed=7, tie=True)


def test_noise_is_relative_seeded_and_keeps_ties_and_the_source() -> None:
    emb = torch.randn(50, 16)
    tensors = [("embed.weight", emb), ("norm.weight", torch.ones(16)), ("head.weight", emb)]
    before = emb.clone()
    a = dict(perturbed(tensors, seed=1, perturb=0.01))
    b = dict(perturbed(tensors, seed=1, perturb=0.01))
    c = dict(perturbed(tensors, seed=2, perturb=0.01))
    assert torch.equal(emb, before)  # the source is never written to
    assert a["head.weight"] is a["embed.weight"]  # tied stays tied
    assert torch.equal(a["norm.weight"], torch.ones(16))  # norms are kept
    rel = float((a["embed.weight"] - emb).pow(2).mean().sqrt() / emb.pow(2).mean().sqrt())
    assert 0.007 < rel < 0.013
    assert torch.equal(a["embed.weight"], b["embed.weight"])  # seeded
    assert not torch.equal(a["embed.weight"], c["embed.weight"])


def test_synth_like_experts_are_distinct_verify_and_carry_topics(tied_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    names = synth_like_bundle(out, tied_src, experts=3, dtype="int8", prefix="ft", commit_every=2)
    assert names == ["ft-000", "ft-001", "ft-002"]
    b = Bundle.open(out)
    b.verify()
    blobs = {hashlib.sha256(b.blob_path(n).read_bytes()).hexdigest() for n in names}
    assert len(blobs) == 3  # distinct in bytes
    src_cfg = json.loads((tied_src / "config.json").read_text())
    for i, n in enumerate(names):
        e = b.expert(n)
        assert e.dtype == "int8" and e.config["hidden_size"] == src_cfg["hidden_size"]
        assert e.description == topics.description(i) and list(e.examples) == topics.examples(i)
        assert sum(t.name.startswith("lm_head") for t in e.tensors) == 0  # tied: the table is stored once
    from wallbreak.coe.tokenization import load_tokenizers

    toks = load_tokenizers(b, [b.expert(n) for n in names])
    assert toks["ft-000"].tokenizer is toks["ft-002"].tokenizer  # the same files: loaded once
    generation = b.generation
    again = synth_like_bundle(out, tied_src, experts=4, dtype="int8", prefix="ft")
    b2 = Bundle.open(out)
    assert again[-1] == "ft-003" and b2.names == [*names, "ft-003"]  # the three were kept, one added
    assert b2.expert("ft-000").blob == b.expert("ft-000").blob and b2.generation == generation + 1


def test_synth_like_answers_much_as_the_source_does(tied_src: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tied_src))
    ids = torch.tensor([[5, 77, 120, 33, 9, 200]])
    with torch.no_grad():
        want = base(ids).logits
        state = dict(perturbed(list(base.state_dict().items()), seed=3, perturb=0.01))
        base.load_state_dict(state)
        got = base(ids).logits
    assert float((got - want).norm() / want.norm()) < 0.1


CHILD = """
import resource, sys
from wallbreak.coe.bundle.synth_like import synth_like_bundle
synth_like_bundle(sys.argv[1], sys.argv[2], experts=int(sys.argv[3]), commit_every=4)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_writing_many_experts_is_streamed(tmp_path: Path) -> None:
    """Peak memory does not grow with the number of experts: 8 experts of ~40 MB each take at most
    two experts' bytes more than 1 does (built in memory, they would take 7 more)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from wallbreak.coe.bundle.importers import byte_tokenizer_dir

    src = tmp_path / "src"
    cfg = LlamaConfig(vocab_size=320, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(str(src))
    byte_tokenizer_dir(src)
    expert_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert expert_bytes > 30e6

    def peak(n: int) -> int:
        run = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path / f"b{n}"), str(src), str(n)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(run.stdout.split()[-1])

    one, eight = peak(1), peak(8)
    assert len(Bundle.open(tmp_path / "b8").names) == 8
    assert eight - one < 2 * expert_bytes, (one, eight, expert_bytes)


def test_the_unnamed_held_out_questions_never_name_their_topic() -> None:
    """One per topic, distinct, and sharing no word stem (5 letters) of 4+ letters with the topic's
    name: a router scored on them cannot route by matching the name."""
    assert len(topics.UNNAMED_HELDOUT) == len(topics.TOPICS)
    assert len(set(topics.UNNAMED_HELDOUT)) == len(topics.TOPICS)
    for i, name in enumerate(topics.TOPICS):
        (question,) = topics.heldout_unnamed(i)
        stems = [w[:5] for w in re.findall(r"[a-z]+", name) if len(w) >= 4]
        assert not [s for s in stems if s in question.lower()], (name, question)
    assert topics.heldout_unnamed(len(topics.TOPICS)) == topics.heldout_unnamed(0)  # numbered repeats
