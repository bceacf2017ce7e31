"""Checkpoints hold no pickle: DCP's safetensors storage and JSON; a pickle planted in one runs
nothing; old and damaged checkpoints get one clear message. (Resharding across plans is tested
under torchrun in tests/integration/test_holmes_runtime.py.)"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.launch import emit_launch
from wallbreak.holmes.plan.plan_file import RunPlan, load_plan
from wallbreak.holmes.plan.report import make_report
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec
from wallbreak.holmes.plan.topology import parse_topology
from wallbreak.holmes.runtime import checkpoint
from wallbreak.holmes.runtime.model import Stage, build_stage, lm_loss
from wallbreak.holmes.runtime.optim import OptimSpec, adamw

ONE_GPU = """
name: one
gpu: {name: cpu, peak_tflops: 0.05, memory_gib: 8}
clusters:
  - {name: local, nodes: 1, gpus_per_node: 1, nic: {kind: ethernet, gbps: 10}}
"""


@pytest.fixture()
def plan(tmp_path: Path) -> Iterator[RunPlan]:
    """A one-process plan of a tied tiny Llama, and a one-rank gloo group for DCP."""
    spec = ModelSpec.llama("tiny", 2, 32, 4, 16, 96, kv_heads=2, tied=True)
    emit_launch(make_report(parse_topology(ONE_GPU, "one"), spec, TrainingSpec(2, 1)), tmp_path / "launch")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield load_plan(tmp_path / "launch" / "plan.json")
    finally:
        dist.destroy_process_group()


def trained(plan: RunPlan, steps: int) -> tuple[Stage, torch.optim.Optimizer]:
    model = build_stage(plan.model, range(2), True, True, seed=1)
    opt = adamw(model.parameters(), OptimSpec(lr=1e-2))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 96, (2, 17), generator=g)
        lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_and_training_goes_on_identically(tmp_path: Path, plan: RunPlan) -> None:
    model, opt = trained(plan, 3)
    checkpoint.save(tmp_path / "ck", 3, modules=[model], opt=opt, plan=plan, rank=0, extra={})
    assert checkpoint.latest(tmp_path / "ck") == 3
    files = sorted(p.name for p in (tmp_path / "ck" / "step-00000003" / "shards").iterdir())
    assert files and all(f.endswith(".safetensors") for f in files)  # no .metadata pickle
    fresh, opt2 = trained(plan, 0)
    meta = checkpoint.load(tmp_path / "ck", 3, modules=[fresh], opt=opt2, plan_config=plan.model.config,
                           tied=True)  # fmt: skip
    assert meta["step"] == 3 and meta["layout"]["pp"] == 1
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(9))
    for m, o in ((model, opt), (fresh, opt2)):
        lm_loss(m(ids[:, :-1]), ids[:, 1:]).backward()
        o.step()
    for (n, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), n


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_planted_pickles_run_nothing_and_old_forms_are_refused(tmp_path: Path, plan: RunPlan) -> None:
    model, opt = trained(plan, 1)
    ck = tmp_path / "ck"
    checkpoint.save(ck, 1, modules=[model], opt=opt, plan=plan, rank=0, extra={})
    marker = tmp_path / "PWNED"
    # DCP's FileSystemReader would unpickle a .metadata file; the safetensors reader never opens one.
    (ck / "step-00000001" / "shards" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    checkpoint.load(ck, 1, modules=[model], opt=opt, plan_config=plan.model.config, tied=True)
    assert not marker.exists()
    old = ck / "step-00000002"
    old.mkdir()
    (old / "stage-0.pt").write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(ConfigError, match="old form"):
        checkpoint.read_meta(old)
    assert not marker.exists()


def test_a_damaged_shard_or_another_model_is_one_clear_error(tmp_path: Path, plan: RunPlan) -> None:
    model, opt = trained(plan, 1)
    ck = tmp_path / "ck"
    checkpoint.save(ck, 1, modules=[model], opt=opt, plan=plan, rank=0, extra={})
    other = dict(plan.model.config, hidden_size=64)
    with pytest.raises(ConfigError, match="holds another model"):
        checkpoint.load(ck, 1, modules=[model], opt=opt, plan_config=other, tied=True)
    for f in (ck / "step-00000001" / "shards").iterdir():
        f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ConfigError, match="cannot fill this stage"):
        checkpoint.load(ck, 1, modules=[model], opt=opt, plan_config=plan.model.config, tied=True)
