"""The three tiers: bit-exact weights, logits equal to transformers, coalescing, budgets, policies."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wallbreak.coe.bundle.importers import import_expert
from wallbreak.coe.bundle.manifest import Bundle
from wallbreak.coe.tiers import TierConfig, TierManager
from wallbreak.coe.tiers.disk import DiskReader
from wallbreak.coe.tiers.host import HostArena, huge_bytes_in
from wallbreak.coe.tiers.policy import LRU, CostAware, make_policy
from wallbreak.errors import CapacityError, ConfigError


def _size(bundle: Bundle) -> int:
    return max(e.total_bytes for e in bundle.experts.values())


def _manager(bundle: Bundle, host: int, device: int, **kw) -> TierManager:
    s = _size(bundle)
    return TierManager(bundle, TierConfig(host_budget=host * s, device_budget=device * s, **kw))


@pytest.fixture(params=[True, False], ids=["alias", "copy"])
def alias(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_weights_are_bit_exact(synth_bundle_dir: Path, alias: bool) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    with _manager(bundle, 2, 1, alias_slots=alias) as mgr:
        for name in bundle.names:
            raw = torch.from_numpy(np.fromfile(bundle.blob_path(name), dtype=np.uint8))
            with mgr.acquire(name) as lease:
                params = dict(lease.model.named_parameters())
                for t in bundle.expert(name).tensors:
                    want = raw[t.offset : t.offset + t.nbytes]
                    got = params[t.name].detach().reshape(-1).view(torch.uint8)
                    assert torch.equal(got, want), (name, t.name)


def test_logits_match_transformers(tmp_path: Path, tiny_llama: Path, alias: bool) -> None:
    from transformers import AutoModelForCausalLM

    import_expert(tiny_llama, "tiny", tmp_path / "b")
    bundle = Bundle.open(tmp_path / "b")
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    ids = torch.tensor([[5, 17, 99, 200, 3, 42]])
    with _manager(bundle, 1, 1, alias_slots=alias) as mgr, mgr.acquire("tiny") as lease, torch.no_grad():
        got = lease.model(ids).logits
        want = ref(ids).logits
    # Not bit-equal: a slot's fp32 linears at a few rows split across cores (coe/tiers/cpu_linear.py), which
    # sums in another order; the bytes themselves are checked bit for bit above.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from helpers import make_tiny_llama_folder

    src = make_tiny_llama_folder(tmp_path / "tied", seed=1, tie=True)
    import_expert(src, "tied", tmp_path / "b")
    bundle = Bundle.open(tmp_path / "b")
    assert "lm_head.weight" not in {t.name for t in bundle.expert("tied").tensors}
    ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids = torch.tensor([[1, 2, 3]])
    with _manager(bundle, 1, 1) as mgr, mgr.acquire("tied") as lease, torch.no_grad():
        torch.testing.assert_close(lease.model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_concurrent_acquires_coalesce(synth_bundle_dir: Path, alias: bool) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    name = bundle.names[0]
    with _manager(bundle, 2, 2, alias_slots=alias) as mgr:
        start = threading.Barrier(8)
        leases, errors = [], []

        def worker() -> None:
            try:
                start.wait()
                leases.append(mgr.acquire(name))
            except Exception as e:  # pragma: no cover - surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert mgr.stats.switches == 1, "eight acquires, one load"
        assert mgr.stats.bytes_disk_to_host == bundle.expert(name).total_bytes
        assert mgr.stats.misses["device"] == 1 and mgr.stats.hits["device"] + mgr.stats.misses["device"] == 8
        assert len({id(lease.slot) for lease in leases}) == 1
        for lease in leases:
            lease.release()
        assert all(s["refs"] == 0 for s in mgr.snapshot()["slots"])


def test_in_use_expert_is_never_evicted_and_full_is_an_error(synth_bundle_dir: Path) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    a, b, c = bundle.names[:3]
    with _manager(bundle, 2, 2, on_full="error") as mgr:
        la, lb = mgr.acquire(a), mgr.acquire(b)
        with pytest.raises(CapacityError, match="in use"):
            mgr.acquire(c)
        assert mgr.where(a)["device"] and mgr.where(b)["device"]
        lb.release()
        with mgr.acquire(c):
            assert not mgr.where(b)["device"] and mgr.where(a)["device"]
        la.release()


def test_full_waits_then_proceeds_or_times_out(synth_bundle_dir: Path) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    a, b = bundle.names[:2]
    with _manager(bundle, 2, 1, on_full="wait", wait_timeout_s=0.2) as mgr:
        la = mgr.acquire(a)
        with pytest.raises(CapacityError, match="timed out"):
            mgr.acquire(b)
        got = []
        t = threading.Thread(target=lambda: got.append(mgr.acquire(b, timeout=10)))
        t.start()
        la.release()
        t.join(10)
        assert got and got[0].expert == b
        got[0].release()


def test_prefetch_turns_a_miss_into_a_hit(synth_bundle_dir: Path) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    name = bundle.names[1]
    with _manager(bundle, 2, 2) as mgr:
        assert mgr.prefetch(name).result(10) is True
        with mgr.acquire(name):
            pass
        s = mgr.stats.summary()
        assert s["hits"]["device"] == 1 and s["misses"]["device"] == 0 and s["prefetch_loads"] == 1
        assert mgr.prefetch(bundle.names[2], tier="host").result(10) is True
        assert mgr.where(bundle.names[2]) == {"host": True, "device": False}


def test_prefetch_never_waits_for_space(synth_bundle_dir: Path) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    with _manager(bundle, 2, 1, wait_timeout_s=30) as mgr, mgr.acquire(bundle.names[0]):
        assert mgr.prefetch(bundle.names[1]).result(5) is False


def test_budgets_too_small_are_clear_errors(synth_bundle_dir: Path) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    s = _size(bundle)
    with pytest.raises(CapacityError, match="--host-budget"):
        TierManager(bundle, TierConfig(host_budget=s // 2, device_budget=4 * s))
    with pytest.raises(CapacityError, match="--device-budget"):
        TierManager(bundle, TierConfig(host_budget=4 * s, device_budget=s // 2))
    with pytest.raises(ConfigError, match="policy"):
        TierConfig(host_budget=s, device_budget=s, policy="random")
    with pytest.raises(ConfigError, match="CUDA"):
        TierConfig(host_budget=s, device_budget=s, device="cuda") if not torch.cuda.is_available() else None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["acquire", "release", "prefetch", "prefetch_host", "evict"]), st.integers(0, 3)
        ),
        min_size=1,
        max_size=40,
    ),
    host=st.integers(1, 4),
    device=st.integers(1, 3),
    alias=st.booleans(),
    policy=st.sampled_from(["lru", "cost"]),
)
def test_budget_invariants_hold(
    synth_bundle_dir: Path, ops, host: int, device: int, alias: bool, policy: str
) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    names = bundle.names
    held = []
    with _manager(bundle, host, device, on_full="error", alias_slots=alias, policy=policy) as mgr:
        for op, i in ops:
            name = names[i]
            if op == "acquire":
                try:
                    held.append(mgr.acquire(name))
                except CapacityError:
                    assert mgr.config.on_full == "error"
            elif op == "release" and held:
                held.pop(i % len(held)).release()
            elif op == "prefetch":
                mgr.prefetch(name).result(10)
            elif op == "prefetch_host":
                mgr.prefetch(name, "host").result(10)
            elif op == "evict":
                mgr.evict(name)
            snap = mgr.snapshot()
            assert snap["host_used"] <= snap["host_budget"]
            assert snap["device_bytes"] <= snap["device_budget"]
            for lease in held:  # a held expert is still on the device, still its weights
                assert lease.slot.expert == lease.expert
            on_device = [s["expert"] for s in snap["slots"] if s["expert"]]
            assert len(on_device) == len(set(on_device))
            if alias:
                for s in snap["slots"]:
                    if s["expert"] and not s["loading"]:
                        assert snap["host"][s["expert"]]["pins"] >= 1, "alias slots keep their host extent"
        for lease in held:
            lease.release()


def test_policies() -> None:
    lru = LRU()
    for e in ["a", "b", "c", "a"]:
        lru.on_access(e)
    assert lru.victim(["a", "b", "c"]) == "b"
    cost = CostAware()
    cost.on_insert("cheap", 0.01, 100)
    cost.on_insert("dear", 1.0, 100)
    assert cost.victim(["cheap", "dear"]) == "cheap"
    for _ in range(200):
        cost.on_access("cheap")
    assert cost.victim(["cheap", "dear"]) == "dear", "frequency outweighs cost in the long run"
    assert cost.victim(["cheap", "dear"], upcoming=["dear"]) == "cheap", "known future uses are kept"
    assert cost.victim(["cheap", "dear"], upcoming=["cheap", "x", "dear"]) == "dear", "farthest next use goes"
    with pytest.raises(ConfigError):
        make_policy("nope")


@pytest.mark.parametrize("direct", ["auto", "on", "off"])
def test_disk_reader_modes_read_the_same(tmp_path: Path, direct: str) -> None:
    data = np.random.default_rng(0).integers(0, 255, size=3 * (1 << 20) + 4096 * 3, dtype=np.uint8)
    path = tmp_path / "blob"
    data.tofile(path)
    arena = HostArena(len(data))
    reader = DiskReader(threads=3, chunk_bytes=1 << 20, direct=direct)  # type: ignore[arg-type]
    try:
        ext = arena.alloc(len(data))
        assert ext is not None
        reader.read(path, arena.memoryview(ext)[: len(data)])
        assert np.array_equal(arena.view(ext)[: len(data)].numpy(), data)
        part = arena.memoryview(ext)[:8192]
        reader.read(path, part, offset=4096)
        assert np.array_equal(arena.view(ext)[:8192].numpy(), data[4096 : 4096 + 8192])
    finally:
        reader.close()


def test_disk_reader_falls_back_where_direct_io_is_refused(tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    from wallbreak.coe.tiers import disk

    path = tmp_path / "blob"
    data = np.arange(8192, dtype=np.uint8)
    data.tofile(path)
    real_open = os.open

    def refusing_open(p, flags, *a):  # a filesystem without O_DIRECT (older tmpfs, some overlays)
        if flags & disk._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(disk.os, "open", refusing_open)
    arena = HostArena(8192)
    reader = DiskReader(direct="on")
    try:
        res = reader.read(path, arena.memoryview(arena.alloc(8192)))  # type: ignore[arg-type]
    finally:
        reader.close()
    assert not res.direct
    assert np.array_equal(arena.buffer.numpy(), data)


def test_host_arena_allocates_merges_and_never_overcommits() -> None:
    arena = HostArena(10 * 4096)
    a, b, c = (arena.alloc(3 * 4096) for _ in range(3))
    assert a and b and c and arena.used == 9 * 4096
    assert arena.alloc(2 * 4096) is None
    arena.free(a)
    arena.free(b)
    big = arena.alloc(6 * 4096)
    assert big is not None and big.offset == 0, "freed neighbours merge into one run"
    arena.free(c)
    arena.free(big)
    assert arena.used == 0 and arena.largest_free() == 10 * 4096


def test_huge_bytes_counts_only_the_mappings_the_range_overlaps(tmp_path: Path) -> None:
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "00400000-00600000 r-xp 00000000 08:01 1 /bin/x\nAnonHugePages:      2048 kB\n"
        "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nSize:  4096 kB\nAnonHugePages:      4096 kB\n"
        "7f0000400000-7f0000800000 rw-p 00000000 00:00 0\nAnonHugePages:      2048 kB\n"
        "7f0000800000-7f0000a00000 rw-p 00000000 00:00 0\nAnonHugePages:      2048 kB\n"
    )
    start = 0x7F0000000000
    assert huge_bytes_in(start, 0x800000, str(smaps)) == 6 << 20  # the two mappings it covers
    assert huge_bytes_in(start + 0x3FF000, 0x2000, str(smaps)) == 6 << 20  # straddles both
    assert huge_bytes_in(0x1000, 0x1000, str(smaps)) == 0
    assert huge_bytes_in(start, 1, str(tmp_path / "absent")) is None


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[", 1)[1].split("]", 1)[0]


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="the kernel gives no huge pages")
def test_host_arena_asks_for_huge_pages_only_when_told() -> None:
    """Experts decode straight from the arena on the CPU; on 2 MiB pages that step ran faster."""
    huge = HostArena(16 << 20, huge_pages=True)
    try:
        assert huge.huge_pages
        got = huge.huge_bytes()
        assert got is not None and got > 0, "pre-touched after the advice: backed by huge pages"
    finally:
        huge.close()
    if _thp_mode() == "madvise":  # without the advice the kernel keeps small pages
        small = HostArena(16 << 20, huge_pages=False)
        assert not small.huge_pages and small.huge_bytes() == 0
        small.close()


def test_manager_serves_only_its_experts(synth_bundle_dir: Path) -> None:
    bundle = Bundle.open(synth_bundle_dir)
    a, b = bundle.names[:2]
    s = _size(bundle)
    with TierManager(bundle, TierConfig(host_budget=s, device_budget=s), [a]) as mgr:
        with mgr.acquire(a):
            pass
        with pytest.raises(ConfigError, match="not served"):
            mgr.acquire(b)
