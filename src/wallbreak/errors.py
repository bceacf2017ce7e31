"""User-facing errors. The CLI prints these as one line and exits non-zero; anything else is a bug."""

from __future__ import annotations

import re


class WallbreakError(Exception):
    """A problem with the user's input, files or environment, stated so they can fix it."""


class ConfigError(WallbreakError):
    """A bad option, size, name or configuration value."""


class BundleError(WallbreakError):
    """A bundle that is missing, malformed, truncated or corrupt."""


class CapacityError(WallbreakError):
    """A request that cannot be met within the configured memory budgets."""


def first_line(e: BaseException) -> str:
    """An exception as one short line (a compiler's error can run to pages)."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


_ABS_PATH = re.compile(r"(?<![\w.])/(?:[^\s/'\":,()]+/)*([^\s/'\":,()]+)")


def without_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part: for what unauthenticated clients read
    (/health, /metrics, error bodies), where the full path tells more than they need."""
    return _ABS_PATH.sub(r"\1", text)
