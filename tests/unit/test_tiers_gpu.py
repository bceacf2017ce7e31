"""The CUDA path: a pinned, exact-size arena and stream copies into device slots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.tiers import TierConfig, TierManager

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_slots_are_bit_exact_and_arena_pinned(synth_bundle_dir: Path) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    size = max(e.total_bytes for e in bundle.experts.values())
    cfg = TierConfig(host_budget=2 * size + 4096, device_budget=2 * size, device="cuda")
    with TierManager(bundle, cfg) as mgr:
        assert mgr.arena.pinned and mgr.arena.buffer.is_pinned()
        assert mgr.arena.budget == (2 * size + 4096) // 4096 * 4096, "pinned at its exact size"
        assert not mgr.alias
        for name in bundle.names:
            raw = torch.from_numpy(np.fromfile(bundle.blob_path(name), dtype=np.uint8))
            with mgr.acquire(name) as lease:
                assert lease.model.device.type == "cuda"
                params = dict(lease.model.named_parameters())
                for t in bundle.expert(name).tensors:
                    got = params[t.name].detach().reshape(-1).view(torch.uint8).cpu()
                    assert torch.equal(got, raw[t.offset : t.offset + t.nbytes]), (name, t.name)
        assert mgr.stats.summary()["host_to_device_gbps"] is not None
