"""Human units for byte budgets and parameter counts ("8GiB", "512MB", "135M")."""

from __future__ import annotations

import re

from wallbreak.errors import ConfigError

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_COUNT_UNITS = {"": 1, "k": 1000, "m": 1000**2, "b": 1000**3, "g": 1000**3, "t": 1000**4}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from '8GiB', '512MB', '1.5G' or a plain integer."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{what} must not be negative, got {text}")
        return text
    m = _NUMBER.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _BYTE_UNITS:
        raise ConfigError(
            f"{what}: cannot read {text!r} as a size; use a number with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 8GiB"
        )
    return int(float(m.group(1)) * _BYTE_UNITS[unit])


def parse_count(text: str | int, what: str = "count") -> int:
    """Counts such as parameters: '135M', '1.7B', '500k' or a plain integer."""
    if isinstance(text, int):
        if text <= 0:
            raise ConfigError(f"{what} must be positive, got {text}")
        return text
    m = _NUMBER.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _COUNT_UNITS:
        raise ConfigError(f"{what}: cannot read {text!r}; use a number with an optional k, M, B suffix")
    value = int(float(m.group(1)) * _COUNT_UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """'1.50 GiB' style, for messages and progress lines."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
