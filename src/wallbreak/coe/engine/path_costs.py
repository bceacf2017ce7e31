"""Which path runs a batch of several rows: its compiled step or eager, by what each has cost here.

A compiled package for a fixed number of rows (`serve --compile-rows`) is checked for its answers
when it loads, not for its speed, and its speed depends on the size, the CPU and what else runs:
on SmolLM2 int8 a package won 1.35x eager at 2 rows and lost (0.87x) at 16, on one machine
(docs/benchmarks.md). So the engine measures both paths while it serves, per architecture and
batch size, and runs the cheaper:
- the first `warm` steps of a size run compiled, the next `warm` eager, each timed;
- then the path with the lower median over its last `window` timed steps runs, and one step in
  `explore_every` runs the other, so its figure stays current.
A median, not a mean: the first call of a package in a process can take several times a step
(serving 150 experts, one 3-row package's slow first steps kept a running mean above eager's
for a whole run, and 181 of 186 steps of that size ran eagerly at 1.3x the cost). Exploring costs
one step in `explore_every` at the other path's price: with the default 64, 0.4% of the decode
time where the packages win (measured serving 150 experts).

The single row is not chosen here: its compiled step won 1.45-2.03x in every form measured, and
it is most of the steps serving many experts, where exploring would cost the most.
"""

from __future__ import annotations

import statistics
from collections import deque

PATHS = ("compiled", "eager")
EXPLORE_EVERY = 64  # steps of one size between two runs of the path not chosen
WARM = 4  # steps of each path timed before the two are compared
WINDOW = 9  # a path's last timed steps, whose median is its cost


class PathCosts:
    def __init__(self, explore_every: int = EXPLORE_EVERY, warm: int = WARM, window: int = WINDOW) -> None:
        if not 1 <= warm <= window:
            raise ValueError(f"warm ({warm}) must be 1 to window ({window})")
        self.explore_every, self.warm, self.window = explore_every, warm, window
        # (architecture key, rows) -> path -> its last `window` step seconds
        self._cells: dict[tuple[str, int], dict[str, deque[float]]] = {}
        self._turns: dict[tuple[str, int], int] = {}  # steps chosen by comparing, per cell

    def choose(self, key: str, rows: int) -> str:
        """The path the next step of `rows` rows of architecture `key` runs."""
        cell = self._cells.get((key, rows), {})
        for path in PATHS:  # warming up: time each path first
            if len(cell.get(path, ())) < self.warm:
                return path
        best = self.cheaper(key, rows)
        turn = self._turns[(key, rows)] = self._turns.get((key, rows), 0) + 1
        if turn % self.explore_every == 0:
            return PATHS[1 - PATHS.index(best)]
        return best

    def cheaper(self, key: str, rows: int) -> str:
        """The path with the lower median (compiled until eager has been timed)."""
        costs = self.costs(key, rows)
        if len(costs) < 2:
            return "compiled"
        return "eager" if costs["eager"] < costs["compiled"] else "compiled"

    def costs(self, key: str, rows: int) -> dict[str, float]:
        """Each timed path's median seconds per step."""
        cell = dict(self._cells.get((key, rows), {}))  # one C-level copy: /health reads it too
        return {p: statistics.median(list(v)) for p, v in cell.items() if v}

    def record(self, key: str, rows: int, path: str, seconds: float) -> None:
        self._cells.setdefault((key, rows), {}).setdefault(path, deque(maxlen=self.window)).append(seconds)

    def forget(self, key: str, rows: int) -> None:
        """The size's package is gone or new: its figures go with it."""
        self._cells.pop((key, rows), None)
        self._turns.pop((key, rows), None)

    def summary(self) -> dict[str, dict[str, dict[str, object]]]:
        """For /health: per architecture and size, each path's median ms per step and the choice."""
        out: dict[str, dict[str, dict[str, object]]] = {}
        for key, rows in list(self._cells):
            row: dict[str, object] = {f"{p}_ms": round(c * 1e3, 2) for p, c in self.costs(key, rows).items()}
            out.setdefault(key, {})[str(rows)] = row | {"runs": self.cheaper(key, rows)}
        return out
