"""Reading a JSON or JSON-lines file a user named: one clear error for a missing file or bad JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wallbreak.errors import ConfigError


def read_json(path: Path, what: str) -> Any:
    """The parsed file; `what` names it in the error ("plan", "results", ...)."""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path}: not JSON (line {e.lineno}: {e.msg})") from None


def iter_jsonl(path: Path, shape: str) -> Iterator[tuple[int, str, Any]]:
    """(line number, line, parsed value) for each non-blank line of a UTF-8 JSON-lines file; a line
    that is not JSON is one error naming the file, the line and `shape` (what a line should be)."""
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            yield n, text, json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg}); {shape}") from None
