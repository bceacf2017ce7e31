"""Which path runs a batch of several rows: its compiled step or eager, by what each has cost here.

A compiled package for a fixed number of rows (`serve --compile-rows`) is checked for its answers
when it loads, not for its speed, and its speed depends on the size, the CPU and what else runs:
on SmolLM2 int8 a package won 1.35x eager at 2 rows and lost (0.87x) at 16, on one machine
(docs/benchmarks.md). So the engine measures both paths while it serves, per architecture and
batch size, and runs the cheaper:
- the first `warm` steps of a size run compiled, the next `warm` eager, each timed;
- then the path with the lower running mean (an exponentially weighted one, so a drifting machine
  is followed) runs, and one step in `explore_every` runs the other, so its figure stays current.
Exploring costs one step in `explore_every` at the other path's price: with the default 64 and an
eager step at 1.35x, about 0.5% of the row steps' time where the package wins.

The single row is not chosen here: its compiled step won 1.45-2.03x in every form measured, and
it is most of the steps serving many experts, where exploring would cost the most.
"""

from __future__ import annotations

PATHS = ("compiled", "eager")
EXPLORE_EVERY = 64  # steps of one size between two runs of the path not chosen
WARM = 4  # steps of each path timed before the two are compared
WEIGHT = 0.2  # of a new step's seconds in the running mean


class PathCosts:
    def __init__(self, explore_every: int = EXPLORE_EVERY, warm: int = WARM, weight: float = WEIGHT) -> None:
        self.explore_every, self.warm, self.weight = explore_every, warm, weight
        # (architecture key, rows) -> path -> [steps timed, running mean seconds]
        self._cells: dict[tuple[str, int], dict[str, list[float]]] = {}
        self._turns: dict[tuple[str, int], int] = {}  # steps chosen by comparing, per cell

    def choose(self, key: str, rows: int) -> str:
        """The path the next step of `rows` rows of architecture `key` runs."""
        cell = self._cells.get((key, rows), {})
        for path in PATHS:  # warming up: time each path first
            if cell.get(path, [0])[0] < self.warm:
                return path
        best = self.cheaper(key, rows)
        turn = self._turns[(key, rows)] = self._turns.get((key, rows), 0) + 1
        if turn % self.explore_every == 0:
            return PATHS[1 - PATHS.index(best)]
        return best

    def cheaper(self, key: str, rows: int) -> str:
        """The path with the lower running mean (compiled until eager has been timed)."""
        cell = self._cells.get((key, rows), {})
        if "eager" not in cell or "compiled" not in cell:
            return "compiled"
        return "eager" if cell["eager"][1] < cell["compiled"][1] else "compiled"

    def record(self, key: str, rows: int, path: str, seconds: float) -> None:
        mine = self._cells.setdefault((key, rows), {}).setdefault(path, [0, seconds])
        mine[0] += 1
        mine[1] += self.weight * (seconds - mine[1])

    def forget(self, key: str, rows: int) -> None:
        """The size's package is gone (it raised): its figures go with it."""
        self._cells.pop((key, rows), None)
        self._turns.pop((key, rows), None)

    def summary(self) -> dict[str, dict[str, dict[str, object]]]:
        """For /health: per architecture and size, each path's running mean (ms) and the choice."""
        out: dict[str, dict[str, dict[str, object]]] = {}
        for (key, rows), cell in list(self._cells.items()):
            cell = dict(cell)  # one C-level copy: the engine thread may add a path meanwhile
            row: dict[str, object] = {f"{p}_ms": round(v[1] * 1e3, 2) for p, v in cell.items()}
            out.setdefault(key, {})[str(rows)] = row | {"runs": self.cheaper(key, rows)}
        return out
