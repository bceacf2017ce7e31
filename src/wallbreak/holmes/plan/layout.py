"""The one owner of the rank layout: rank <-> (stage, data-parallel index, tensor index), and the groups.

Megatron's order: tensor-parallel fastest, then data-parallel, then pipeline stages outermost,

    rank = stage * dp * tp + d * tp + k

so a stage is dp * tp consecutive ranks. The planner, the cost model, the plan file and the trainer all
ask this class; none of them re-derives the rule (the way torchtitan's `ParallelDims` owns its mesh).
"""

from __future__ import annotations

from dataclasses import dataclass

from wallbreak.errors import ConfigError

GROUP_KINDS = ("tp", "dp", "pp")


@dataclass(frozen=True)
class ParallelLayout:
    tp: int
    dp: int
    pp: int

    def __post_init__(self) -> None:
        for name in GROUP_KINDS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")

    def to_json(self) -> dict[str, int]:
        """The degrees as every JSON record writes them (plan, launch file, job record, emulated run):
        top-level `tp`, `pp`, `dp` keys."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}

    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def stage_size(self) -> int:
        return self.tp * self.dp

    def rank(self, stage: int, d: int, k: int) -> int:
        if not (0 <= stage < self.pp and 0 <= d < self.dp and 0 <= k < self.tp):
            raise ValueError(f"(stage {stage}, dp {d}, tp {k}) is outside {self}")
        return stage * self.stage_size + d * self.tp + k

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(stage, data-parallel index, tensor index) of a rank."""
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} is outside the world of {self.world_size}")
        stage, rest = divmod(rank, self.stage_size)
        d, k = divmod(rest, self.tp)
        return stage, d, k

    def stage_of(self, rank: int) -> int:
        return self.coords(rank)[0]

    def dp_index(self, rank: int) -> int:
        return self.coords(rank)[1]

    def tp_index(self, rank: int) -> int:
        return self.coords(rank)[2]

    def stage_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.stage_size, (stage + 1) * self.stage_size))

    def group(self, kind: str, rank: int) -> list[int]:
        """The members of `rank`'s group of this kind, in group-rank order."""
        s, d, k = self.coords(rank)
        if kind == "tp":
            return [self.rank(s, d, j) for j in range(self.tp)]
        if kind == "dp":
            return [self.rank(s, j, k) for j in range(self.dp)]
        if kind == "pp":
            return [self.rank(j, d, k) for j in range(self.pp)]
        raise ValueError(f"unknown group kind {kind!r}; kinds: {', '.join(GROUP_KINDS)}")

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of this kind, in the order every rank creates them: by stage, then index."""
        if kind == "tp":
            return [self.group("tp", self.rank(s, d, 0)) for s in range(self.pp) for d in range(self.dp)]
        if kind == "dp":
            return [self.group("dp", self.rank(s, 0, k)) for s in range(self.pp) for k in range(self.tp)]
        if kind == "pp":
            return [self.group("pp", self.rank(0, d, k)) for d in range(self.dp) for k in range(self.tp)]
        raise ValueError(f"unknown group kind {kind!r}; kinds: {', '.join(GROUP_KINDS)}")
