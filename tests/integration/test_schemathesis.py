"""schemathesis, a fuzzer we did not write, against the OpenAPI schema the server publishes, while a
stream runs on the same expert: no 5xx, answers that conform to the schema, only documented status
codes, and the stream untouched. A bounded run here; `benchmarks/fuzz_serve.py` runs the large one."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from helpers import make_tiny_llama_folder

ROOT = Path(__file__).parents[2]


def fuzz_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_serve", ROOT / "benchmarks" / "fuzz_serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schemathesis_finds_nothing_and_the_stream_is_untouched(tmp_path: Path) -> None:
    if shutil.which("st", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    from wallbreak.coe.bundle.importers import import_expert

    bundle = tmp_path / "bundle"
    for seed, name in enumerate(("alpha", "beta")):
        import_expert(make_tiny_llama_folder(tmp_path / name, seed=seed), name, bundle)
    res = fuzz_script().run(bundle, cases=15, streams=1, seed=1, tokens=100, work=tmp_path)
    fz = res["schemathesis"]
    assert fz["exit_code"] == 0 and not fz["failures"] and not fz["errors"], fz
    assert fz["cases"] >= 50 and fz["server_errors"] == 0
    assert fz["status_codes"].get(200) and fz["status_codes"].get(400)  # it got through, and was refused
    assert res["streams"]["rounds"] >= 1 and not res["streams"]["differed"]
    assert not res["unavailable_after"]
