"""Progress off a terminal (a log, CI, a pipe): one plain line per tenth of the work, no carriage
returns; on a terminal, tqdm's bar."""

from __future__ import annotations

from pathlib import Path

import pytest

from wallbreak import progress


def test_a_log_gets_a_line_per_tenth_and_no_carriage_returns(capsys: pytest.CaptureFixture[str]) -> None:
    with progress.progress(1000, "writing x", "B", unit_scale=True) as bar:
        for _ in range(1000):
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0] == "writing x: 10% (100/1.0k B)" and lines[-1] == "writing x: done (1.0k B)"
    assert len(lines) == 10  # 10% ... 90%, then done


def test_a_real_long_job_writes_a_readable_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wallbreak.coe.bundle.importers import synth_bundle

    synth_bundle(tmp_path / "b", experts=3, params=200_000, seed=1)
    err = capsys.readouterr().err
    assert "\r" not in err and "synth experts: done" in err and len(err.splitlines()) <= 11


def test_on_a_terminal_it_is_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm import tqdm

    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    bar = progress.progress(10, "x", enabled=False)
    assert isinstance(bar, tqdm)
    bar.close()
    assert list(progress.each([1, 2, 3], "items")) == [1, 2, 3]


def test_a_library_import_writes_no_bars_into_a_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Importing a model through transformers (its own "Loading weights" tqdm bar) into a bundle,
    with stderr a log: plain lines only. tqdm is itself again afterwards."""
    from tqdm import std, tqdm

    from helpers import make_tiny_llama_folder
    from wallbreak.coe.bundle.importers import import_expert

    src = make_tiny_llama_folder(tmp_path / "hf")
    capsys.readouterr()
    own = std.tqdm.__dict__["__init__"]
    import_expert(src, "m", tmp_path / "b")
    err = capsys.readouterr().err
    assert "\r" not in err and "writing m: done" in err, err
    assert std.tqdm.__dict__["__init__"] is own
    with progress.library_bars_off():
        tqdm(range(3), desc="a library's bar").close()
    assert capsys.readouterr().err == ""
    tqdm(range(3), desc="after").close()
    assert "after" in capsys.readouterr().err
