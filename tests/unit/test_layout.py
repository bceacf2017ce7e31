"""The rank layout's one owner, and the plan file's one owner (format, version, layout checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.launch import emit_launch
from wallbreak.holmes.plan.layout import GROUP_KINDS, ParallelLayout
from wallbreak.holmes.plan.plan_file import PLAN_VERSION, load_plan
from wallbreak.holmes.plan.report import make_report
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import parse_topology

CLUSTER = """
name: local
gpu: {name: cpu, peak_tflops: 0.05, memory_gib: 8}
clusters:
  - name: a
    nodes: 2
    gpus_per_node: 4
    nic: {kind: infiniband, gbps: 100}
    intra_node: {kind: pcie, gbps: 100}
"""


def test_megatron_documented_example() -> None:
    # Megatron-LM's own example: 16 GPUs, tp=2, pp=4 (so dp=2).
    lay = ParallelLayout(tp=2, dp=2, pp=4)
    assert lay.groups("tp")[:3] == [[0, 1], [2, 3], [4, 5]]
    assert lay.groups("dp")[:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.groups("pp")[0] == [0, 4, 8, 12] and lay.groups("pp")[3] == [3, 7, 11, 15]


@pytest.mark.parametrize(("tp", "dp", "pp"), [(1, 1, 1), (2, 3, 2), (4, 1, 3), (1, 5, 1), (2, 2, 2)])
def test_coords_round_trip_and_groups_partition_the_world(tp: int, dp: int, pp: int) -> None:
    lay = ParallelLayout(tp, dp, pp)
    for r in range(lay.world_size):
        assert lay.rank(*lay.coords(r)) == r
        assert r in lay.stage_ranks(lay.stage_of(r))
    for kind in GROUP_KINDS:
        flat = sorted(r for g in lay.groups(kind) for r in g)
        assert flat == list(range(lay.world_size)), kind
        for g in lay.groups(kind):
            assert all(lay.group(kind, r) == g for r in g)
    # tp groups are consecutive ranks; a stage is dp * tp consecutive ranks
    assert all(g == list(range(g[0], g[0] + tp)) for g in lay.groups("tp"))


def test_bad_degrees_and_ranks_are_clear() -> None:
    with pytest.raises(ConfigError, match="tp must be an integer >= 1"):
        ParallelLayout(0, 1, 1)
    with pytest.raises(ConfigError, match="rank 8 is outside the world of 8"):
        ParallelLayout(2, 2, 2).coords(8)


def _plan(tmp: Path) -> Path:
    m = ModelSpec.llama("tiny", 4, 32, 4, 16, 256)
    report = make_report(
        parse_topology(CLUSTER, "c.yaml"),
        m,
        TrainingSpec(8, 1, "none", "fp32"),
        placement="holmes",
        tp=2,
        pp=2,
        dp=2,
    )
    emit_launch(report, tmp)
    return tmp / "plan.json"


def _edit(path: Path, **changes: object) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_plan_file_round_trip_and_version_check(tmp_path: Path) -> None:
    path = _plan(tmp_path)
    raw = json.loads(path.read_text())
    assert raw["format"] == "wallbreak-plan" and raw["version"] == PLAN_VERSION
    # The model is its Hugging Face config, and where its weights come from (none: seeded).
    assert raw["model"]["name"] == "tiny" and raw["model"]["seq_len"] == 16 and raw["model"]["source"] == {}
    config = raw["model"]["config"]
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 4
    assert (config["hidden_size"], config["num_attention_heads"], config["vocab_size"]) == (32, 4, 256)
    plan = load_plan(path, 8)
    assert plan.model.config == config and plan.model.tied is False
    assert plan.layout == ParallelLayout(2, 2, 2)
    assert [g.ranks for g in plan.groups if g.kind == "pp"] == [tuple(g) for g in plan.layout.groups("pp")]
    _edit(path, version=PLAN_VERSION + 1)
    with pytest.raises(
        ConfigError, match=f"plan version {PLAN_VERSION + 1} was written by a newer wallbreak"
    ):
        load_plan(path)
    # A version-1 plan (a GPT-2-style shape, no config) gets the one message that says what to do.
    _edit(path, version=1, model={"name": "tiny", "vocab": 256, "layers": 4, "hidden": 32, "heads": 4,
                                  "seq_len": 16})  # fmt: skip
    with pytest.raises(ConfigError, match=r"plan version 1 is older than this wallbreak reads.*re-plan it"):
        load_plan(path)
    _edit(path, version=None)
    with pytest.raises(ConfigError, match="'version' must be an integer"):
        load_plan(path)


def test_plan_file_groups_must_follow_the_layout(tmp_path: Path) -> None:
    path = _plan(tmp_path)
    raw = json.loads(path.read_text())
    raw["groups"]["dp"][0]["ranks"], raw["groups"]["dp"][1]["ranks"] = [0, 2], [1, 4]
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"groups.dp\[1\] is \[1, 4\]; the rank order .* makes it \[1, 3\]"):
        load_plan(path)


def test_plan_file_stages_and_world_size_are_checked(tmp_path: Path) -> None:
    path = _plan(tmp_path)
    with pytest.raises(ConfigError, match="the plan is for 8 processes but torchrun started 2"):
        load_plan(path, 2)
    raw = json.loads(path.read_text())
    raw["stages"][0]["layers"] = 3
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="sum to 5, but the model has 4"):
        load_plan(path)
    raw["stages"][0]["layers"], raw["stages"][1]["ranks"] = 2, [4, 5, 6]
    path.write_text(json.dumps(raw))
    with pytest.raises(
        ConfigError, match=r"stage 1 holds ranks \[4, 5, 6\]; the layout gives it \[4, 5, 6, 7\]"
    ):
        load_plan(path)
