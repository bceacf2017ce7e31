"""`wallbreak data prepare`: text and JSONL into a memory-mapped token file and its index, atomic;
samples drawn from it deterministically (a restart resumes at the exact sample); a model whose
tokenizer differs from the data's is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wallbreak.coe.bundle.importers import byte_tokenizer_dir
from wallbreak.errors import ConfigError
from wallbreak.holmes.runtime.data import Batches, load_tokenizer, prepare, training_tokens


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return byte_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def sources(tmp: Path) -> list[Path]:
    (tmp / "src").mkdir()
    (tmp / "src" / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": f"document {i}: " + "lorem ipsum " * i}) for i in range(1, 40)) + "\n"
    )
    (tmp / "src" / "b.txt").write_text("a plain text file is one document\n" * 30)
    return [tmp / "src" / "a.jsonl", tmp / "src" / "b.txt"]


def test_prepare_round_trip_and_resumable_samples(tmp_path: Path, tok_dir: Path) -> None:
    files = sources(tmp_path)
    index = prepare(files, tok_dir, tmp_path / "data")
    tok = load_tokenizer(tok_dir)
    want: list[int] = []
    docs = [json.loads(x)["text"] for x in files[0].read_text().splitlines()] + [files[1].read_text()]
    for d in docs:
        want += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert (index["tokens"], index["documents"], index["dtype"]) == (len(want), 40, "uint16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]  # no temporary left behind
    tokens = training_tokens(tmp_path / "data", None, 512, str(tok_dir))
    assert isinstance(tokens, np.memmap) and tokens.tolist() == want
    # The same samples for step k, whether a run got there itself or restarted there; and the
    # data-parallel ranks' slices together are the global batch.
    run, restarted = Batches(tokens, 16, 8, seed=3), Batches(tokens, 16, 8, seed=3)
    x5, y5 = run.batch(5)
    torch.testing.assert_close(restarted.batch(5)[0], x5)
    assert torch.equal(x5[:, 1:], y5[:, :-1])
    shards = [restarted.shard(5, d, 2, 2) for d in range(2)]
    assert torch.equal(torch.cat([x for s in shards for x, _ in s]), x5)
    with pytest.raises(ConfigError, match="exists"):
        prepare(files, tok_dir, tmp_path / "data")  # never overwritten


def test_a_model_with_another_tokenizer_is_refused(tmp_path: Path, tok_dir: Path) -> None:
    prepare(sources(tmp_path), tok_dir, tmp_path / "data")
    other = byte_tokenizer_dir(tmp_path / "other")
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(cfg | {"eos_token": "<|im_start|>"}))
    with pytest.raises(ConfigError, match="does not match the model's tokenizer"):
        training_tokens(tmp_path / "data", None, 512, str(other))
    with pytest.raises(ConfigError, match="needs a vocabulary of 259, but the model's is 256"):
        training_tokens(tmp_path / "data", None, 256, None)


def test_bad_sources_get_one_line_and_leave_nothing(tmp_path: Path, tok_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    cmd = [sys.executable, "-m", "wallbreak.cli", "data", "prepare", str(bad), "--tokenizer", str(tok_dir),
           "--out", str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert (
        r.stderr.strip().splitlines()[-1]
        == f"wallbreak: error: {bad}:2: each line needs a string field 'text'"
    )
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]
