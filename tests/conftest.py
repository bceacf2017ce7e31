"""Fixtures: tiny models and bundles built by the tests themselves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from helpers import make_tiny_llama_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# What the code builds once and caches (compiled steps, the default bundle) goes to a directory of
# this run's own, never the user's cache.
os.environ["WALLBREAK_CACHE"] = tempfile.mkdtemp(prefix="wallbreak-test-cache-")

# The files that take minutes (compiler builds, torchrun, Ray, namespaces, real models), longest first
# as measured in `make test` on the 2-core CPU machine (353 s for the AOT file down to 32 s). The
# Makefile turns off xdist's own order (by test count, which handed these out last), so files go to
# the two workers in this order and neither ends running a long file alone.
LONGEST_FIRST = (
    "test_engine_aot.py",
    "test_holmes_runtime.py",
    "test_ray_serve.py",
    "test_emulate_netns.py",
    "test_default_models.py",
    "test_live_admin.py",
    "test_engine_compiled.py",
    "test_bench_fuse.py",
    "test_cli.py",
    "test_hostile.py",
    "test_schemathesis.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every file keeps its own order


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_folder(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="session")
def synth_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four identical-shape synthetic experts of ~0.3M parameters."""
    from wallbreak.coe.bundle.importers import synth_bundle

    out = tmp_path_factory.mktemp("bundles") / "synth4"
    synth_bundle(out, experts=4, params=300_000, seed=7)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import make_tiny_bert_folder

    return make_tiny_bert_folder(tmp_path_factory.mktemp("hf") / "tiny-bert")


@pytest.fixture()
def router_bundle(tmp_path: Path) -> Path:
    """Three tiny experts named after the router test topics, no router yet."""
    from helpers import ROUTER_TOPICS
    from wallbreak.coe.bundle.importers import synth_bundle

    out = tmp_path / "rb"
    synth_bundle(out, experts=3, params=50_000, names=list(ROUTER_TOPICS), seed=1)
    return out


@pytest.fixture(scope="session")
def arch_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One expert of each architecture the importers accept: llama-like and gemma3-like (sliding
    windows of 8 tokens, so short tests already cross the window)."""
    from helpers import make_tiny_gemma3_folder
    from wallbreak.coe.bundle.importers import import_expert

    root = tmp_path_factory.mktemp("arch")
    out = root / "bundle"
    import_expert(make_tiny_llama_folder(root / "llama", seed=5), "llama", out)
    import_expert(make_tiny_gemma3_folder(root / "gemma"), "gemma", out)
    return out
