"""Reading a JSON file a user named: one clear error for a missing file or bad JSON."""

from __future__ import annotations

import json
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
