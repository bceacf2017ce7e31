"""The CLI end to end: one clear line and exit 2 for user errors, JSON for benchmarks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from wallbreak.cli import main
from wallbreak.coe.bundle.manifest import Bundle


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_verify_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "b")
    code, text, _ = run(
        capsys, "bundle", "synth", "--out", out, "--experts", "2", "--params", "200k", "--names", "m,c"
    )
    assert code == 0 and "2 synthetic" in text
    code, text, _ = run(
        capsys, "bundle", "synth", "--out", out, "--experts", "2", "--params", "200k", "--if-missing"
    )
    assert code == 0 and "left as is" in text
    code, text, _ = run(capsys, "bundle", "verify", out)
    assert code == 0 and "every checksum matches" in text
    code, text, _ = run(capsys, "bundle", "show", out, "--json")
    assert [e["name"] for e in json.loads(text)["experts"]] == ["m", "c"]


def test_verify_corrupt_is_one_line(
    tmp_path: Path, synth_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = tmp_path / "b"
    shutil.copytree(synth_bundle_dir, b)
    bundle = Bundle.open(b)
    e = bundle.expert(bundle.names[0])
    with open(bundle.blob_path(e.name), "r+b") as f:
        f.seek(e.tensors[0].offset)
        f.write(b"\x13\x37")
    code, _, err = run(capsys, "bundle", "verify", str(b))
    assert code == 2
    assert err.count("\n") == 1 and e.name in err and e.tensors[0].name in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bundle", "synth", "--out", "{t}/x", "--experts", "2", "--params", "lots"], "--params"),
        (["bundle", "verify", "{t}/missing"], "does not exist"),
        (["bundle", "import", "{t}/missing", "--name", "a", "--out", "{t}/o"], "does not exist"),
        (["bench", "switch", "--bundle", "{t}/missing"], "does not exist"),
    ],
)
def test_user_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, _, err = run(capsys, *[a.format(t=tmp_path) for a in argv])
    assert code == 2 and needle in err and err.count("\n") == 1


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["bundle", "synth", "--out", "x"])
    assert ex.value.code == 2
    assert "required" in capsys.readouterr().err


def test_bench_switch_json(synth_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text, _ = run(
        capsys,
        "bench",
        "switch",
        "--bundle",
        str(synth_bundle_dir),
        "--cache",
        "warm",
        "--repeats",
        "1",
        "--json",
    )
    assert code == 0
    out = json.loads(text)
    assert set(out["ceilings"]) >= {"disk_read_gbps", "disk_read_cold", "memcpy_gbps", "h2d_pinned_gbps"}
    assert out["ceilings"]["memcpy_gbps"] > 0
    assert len(out["results"]) == 2
    for r in out["results"]:
        assert r["cache"] == "warm" and r["bytes"] > 0
        assert set(r["ours"]) == {"disk_to_host_s", "host_to_device_s", "disk_to_ready_s", "host_to_ready_s"}
        assert all(isinstance(r[k], float) for k in ("forward_s", "load_state_dict_s", "from_pretrained_s"))


def test_bench_serve_runs_every_policy_and_prints_the_documented_json(
    tmp_path: Path, synth_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = max(e.total_bytes for e in Bundle.open(synth_bundle_dir).experts.values())
    plot = tmp_path / "bench.png"
    code, text, _ = run(
        capsys, "bench", "serve", "--bundle", str(synth_bundle_dir), "--device-budget", str(2 * size + 4096),
        "--requests", "6", "--concurrency", "3", "--max-tokens", "4", "--no-alone", "--compile", "off",
        "--experts-subset", "2,3", "--plot", str(plot), "--json", "--huge-pages", "off",
    )  # fmt: skip
    assert code == 0
    out = json.loads(text)
    # one cell per subset size and concurrency, each a server per policy
    assert [(r["experts"], r["concurrency"]) for r in out["runs"]] == [(2, 3), (3, 3)]
    assert out["o_direct_ceiling_gbps"] > 0
    for r in out["runs"]:
        assert list(r["policies"]) == ["ours", "per-expert-lru", "fcfs-lru"]
        for p in r["policies"].values():
            keys = {"req_per_s", "tokens_per_s", "p50_s", "p99_s", "ttft_p50_s", "ttft_p99_s", "switches",
                    "failed", "disk_read_bytes", "disk_read_gbps", "disk_read_vs_ceiling",
                    "compile"}  # fmt: skip
            assert keys <= set(p) and p["failed"] == 0
            assert p["compile"]["policy"] == "off"
            assert p["tiers"]["host_memory"]["huge_pages"] is False  # the servers got --huge-pages off
    assert plot.stat().st_size > 0
    code, _, err = run(
        capsys, "bench", "serve", "--bundle", str(synth_bundle_dir), "--experts-subset", "2,99"
    )
    assert code == 2 and "--experts-subset 99: the bundle has" in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["bench", "serve", "--bundle", "B", "--policy", "ours,nope"], "unknown serving policy 'nope'"),
        (["bench", "serve", "--bundle", "B", "--concurrency", "16,x"], "give whole numbers"),
        (["serve", "--policy", "nope"], "invalid choice: 'nope'"),
        (["serve", "--prefetch", "maybe"], "give on or off"),
        (["serve", "--compile-rows", "1,2"], "1: give batch sizes from 2 to 16 (comma-separated), built or"),
        (["serve", "--compile-rows", "some"], "'some': give batch sizes from 2 to 16"),
        (["serve", "--replica-cpus", "2"], "--replica-cpus sizes Ray replicas; use it with --ray"),
        (["serve", "--ray", "--replica-cpus", "0"], "'0': give a whole number of CPUs, at least 1"),
    ],
)
def test_bad_serving_arguments_are_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and "Traceback" not in err


def test_the_default_bundle_has_one_form_for_serve_and_bundle_default() -> None:
    from wallbreak.cli import build_parser
    from wallbreak.coe import defaults

    args = build_parser().parse_args(["bundle", "default", "--out", "x"])
    assert args.dtype == defaults.BUNDLE_FORM == "int8"
    assert defaults.default_bundle_dir().name == "default-bundle-int8"  # a change of form builds anew
