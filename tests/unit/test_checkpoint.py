"""Checkpoints hold no pickle: tensors in safetensors, the rest in JSON; a pickled one is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from wallbreak.errors import ConfigError
from wallbreak.holmes.runtime import checkpoint


def trained_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.0)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_a_stage_round_trips_and_training_goes_on_identically(tmp_path: Path) -> None:
    model, opt = trained_state()
    state = {
        "step": 3,
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
    }
    checkpoint.write_stage(tmp_path, 0, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage-0.json", "stage-0.safetensors"]
    back = checkpoint.read_stage(tmp_path, 0)
    assert back["step"] == 3
    model2, opt2 = trained_state()  # same shapes; its state is overwritten by the checkpoint's
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optimizer"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_pickled_checkpoint_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    d = tmp_path / "step-00000001"
    d.mkdir()
    (d / "stage-0.pt").write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(ConfigError, match="old pickled form"):
        checkpoint.read_stage(d, 0)
    assert not marker.exists()


def test_a_damaged_shard_is_one_clear_error(tmp_path: Path) -> None:
    model, opt = trained_state()
    checkpoint.write_stage(
        tmp_path, 0, {"step": 1, "model": model.state_dict(), "optimizer": opt.state_dict()}
    )
    (tmp_path / "stage-0.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ConfigError, match="damaged"):
        checkpoint.read_stage(tmp_path, 0)
