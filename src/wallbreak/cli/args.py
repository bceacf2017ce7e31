"""What every verb's parser shares: the parser that exits 2 with one line, the value types, and
defaults read from the typed configs (so a default is written once, in its dataclass)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def ints(text: str) -> list[int]:
    try:
        out = [int(n) for n in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give whole numbers, comma-separated (e.g. 16,64)"
        ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of at least 1, comma-separated")
    return out


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: give on or off")
    return text == "on"


def fill(config: Any, args: argparse.Namespace, **given: Any) -> Any:
    """An instance of the dataclass `config`: each field from `given`, else from the flag of the same
    name, else the field's own default."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    return config(**(kw | given))


def default_of(config: Any, name: str) -> Any:
    """The default of field `name` of the dataclass `config`: the CLI shows and uses exactly it."""
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{config.__name__}.{name} has no default")
    raise KeyError(f"{config.__name__} has no field {name!r}")


def default_arg(p: argparse.ArgumentParser, config: Any, flag: str, kind: Any, help: str = "") -> None:
    """A flag whose default is the field of the same name in `config`, and says so in its help."""
    value = default_of(config, flag.removeprefix("--").replace("-", "_"))
    p.add_argument(flag, type=kind, default=value, help=f"{help} (default {value})".strip())
