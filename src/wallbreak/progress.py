"""Progress for long work, readable wherever it goes: a tqdm bar on a terminal; in a log (stderr not
a TTY) one plain line per tenth of the work, with no carriage returns."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
STEPS = 10  # lines a log gets per stage: one per tenth


def on_terminal() -> bool:
    return sys.stderr.isatty()


def say(message: str) -> None:
    """One line to stderr that does not tear a bar drawn on the terminal."""
    if on_terminal():
        from tqdm import tqdm  # deferred: loads tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


class LogProgress:
    """The log's form of a bar: `desc: 30% (3/10 expert)` at each tenth, then `desc: done`."""

    def __init__(self, total: float, desc: str, unit: str = "it", unit_scale: bool = False) -> None:
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = 0.0
        self.shown = 0  # tenths already printed

    def _amount(self, x: float) -> str:
        if not self.unit_scale:
            return f"{x:g}"
        for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if x >= scale:
                return f"{x / scale:.1f}{prefix}"
        return f"{x:.0f}"

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.total <= 0:
            return
        tenth = min(int(self.n * STEPS / self.total), STEPS)
        if tenth > self.shown and tenth < STEPS:
            self.shown = tenth
            done, total = self._amount(self.n), self._amount(self.total)
            print(
                f"{self.desc}: {tenth * 100 // STEPS}% ({done}/{total} {self.unit})",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.shown < STEPS:
            self.shown = STEPS
            print(f"{self.desc}: done ({self._amount(self.n)} {self.unit})", file=sys.stderr, flush=True)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    total: float,
    desc: str,
    unit: str = "it",
    unit_scale: bool = False,
    leave: bool = True,
    enabled: bool = True,
) -> Any:
    """A bar with `update(n)`, `close()` and a context manager: tqdm on a terminal, else LogProgress
    (`enabled=False`: one that shows nothing)."""
    if on_terminal() or not enabled:
        from tqdm import tqdm  # deferred: loads tqdm

        return tqdm(
            total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave, disable=not enabled
        )
    return LogProgress(total, desc, unit, unit_scale)


def each(items: Iterable[T], desc: str, unit: str = "it") -> Iterator[T]:
    """`items`, counted as they are consumed."""
    listed = list(items)
    with progress(len(listed), desc, unit) as bar:
        for item in listed:
            yield item
            bar.update(1)


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """Off a terminal, while a library works: its own tqdm bars (transformers' "Loading weights",
    its GGUF converter's) would write carriage returns into the log, so they are turned off; ours
    say a plain line per tenth. On a terminal they draw as usual. tqdm reads its `TQDM_DISABLE`
    default once, at import, and the GGUF converter calls tqdm directly, so the one switch that
    reaches every bar is tqdm's own `disable`, set for bars made inside this block."""
    if on_terminal():
        yield
        return
    from tqdm import std  # deferred: loads tqdm

    own = std.tqdm.__dict__["__init__"]  # put back as it was (a partialmethod of tqdm's defaults)
    made = std.tqdm.__init__

    def quiet(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        made(self, *args, **kwargs)

    std.tqdm.__init__ = quiet  # type: ignore[method-assign]
    try:
        yield
    finally:
        std.tqdm.__init__ = own  # type: ignore[method-assign]
