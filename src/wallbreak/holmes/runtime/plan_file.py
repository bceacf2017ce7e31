"""The plan file the runtime executes (written by `wallbreak plan --emit-launch`), checked hard.

Every rank loads and checks the same file before any collective, so a bad plan is one clear error
on every rank, never a hang.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wallbreak.common.gpt import GPTConfig
from wallbreak.errors import ConfigError

PLAN_FORMAT = "wallbreak-plan"


@dataclass(frozen=True)
class Group:
    kind: str  # dp | tp | pp
    ranks: tuple[int, ...]
    transport: str
    env: dict[str, str]
    ifname: str | None


@dataclass(frozen=True)
class RunPlan:
    path: Path
    tp: int
    pp: int
    dp: int
    world_size: int
    global_batch: int
    micro_batch: int
    model: GPTConfig
    stage_layers: tuple[int, ...]
    stage_ranks: tuple[tuple[int, ...], ...]
    groups: tuple[Group, ...]
    raw: dict[str, Any]

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def stage_of(self, rank: int) -> int:
        for i, ranks in enumerate(self.stage_ranks):
            if rank in ranks:
                return i
        raise ConfigError(f"{self.path}: rank {rank} is in no stage")

    def dp_index(self, rank: int) -> int:
        return (rank % (self.tp * self.dp)) // self.tp

    def layer_range(self, stage: int) -> range:
        start = sum(self.stage_layers[:stage])
        return range(start, start + self.stage_layers[stage])

    def group_of(self, kind: str, rank: int) -> Group:
        for g in self.groups:
            if g.kind == kind and rank in g.ranks:
                return g
        raise ConfigError(f"{self.path}: rank {rank} has no {kind} group")

    def fingerprint(self) -> str:
        """What a checkpoint must match: degrees, split and model shape."""
        key = json.dumps(
            {
                "tp": self.tp,
                "pp": self.pp,
                "dp": self.dp,
                "layers": self.stage_layers,
                "model": self.model.__dict__,
            },
            sort_keys=True,
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def _need(d: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise ConfigError(f"{where}: {key!r} must be {kind.__name__}, got {v!r}")
    return v


def load_plan(path: str | Path, world_size: int | None = None) -> RunPlan:
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read plan {p}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
    where = str(p)
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise ConfigError(
            f"{where}: not a wallbreak plan (write one with `wallbreak plan --emit-launch DIR`)"
        )
    tp, pp, dp = (_need(raw, k, int, where) for k in ("tp", "pp", "dp"))
    if min(tp, pp, dp) < 1:
        raise ConfigError(f"{where}: tp, pp and dp must be >= 1, got {tp}, {pp}, {dp}")
    ws = _need(raw, "world_size", int, where)
    if ws != tp * pp * dp:
        raise ConfigError(f"{where}: world_size {ws} is not tp x pp x dp = {tp * pp * dp}")
    if world_size is not None and world_size != ws:
        raise ConfigError(
            f"{where}: the plan is for {ws} processes but torchrun started {world_size}; "
            f"launch with --nproc-per-node/--nnodes that give {ws}"
        )
    m = _need(raw, "model", dict, where)
    t = _need(raw, "training", dict, where)
    model = GPTConfig(
        vocab=_need(m, "vocab", int, f"{where}: model"),
        layers=_need(m, "layers", int, f"{where}: model"),
        hidden=_need(m, "hidden", int, f"{where}: model"),
        heads=_need(m, "heads", int, f"{where}: model"),
        seq_len=_need(m, "seq_len", int, f"{where}: model"),
    )
    if model.heads % tp:
        raise ConfigError(f"{where}: tp={tp} must divide the model's {model.heads} attention heads")
    gb = _need(t, "global_batch", int, f"{where}: training")
    mb = _need(t, "micro_batch", int, f"{where}: training")
    if gb % (mb * dp):
        raise ConfigError(f"{where}: global batch {gb} is not a multiple of micro-batch {mb} x dp {dp}")
    stages = _need(raw, "stages", list, where)
    if len(stages) != pp:
        raise ConfigError(f"{where}: {len(stages)} stage(s) listed but pp is {pp}")
    layers = tuple(_need(s, "layers", int, f"{where}: stage {i}") for i, s in enumerate(stages))
    if any(n < 1 for n in layers):
        raise ConfigError(f"{where}: every stage needs at least one layer, got {list(layers)}")
    if sum(layers) != model.layers:
        raise ConfigError(
            f"{where}: stage layers {list(layers)} sum to {sum(layers)}, but the model has {model.layers}"
        )
    stage_ranks = tuple(tuple(_need(s, "ranks", list, f"{where}: stage {i}")) for i, s in enumerate(stages))
    flat = sorted(r for rs in stage_ranks for r in rs)
    if flat != list(range(ws)):
        missing = sorted(set(range(ws)) - set(flat))
        extra = sorted(set(flat) - set(range(ws)))
        raise ConfigError(
            f"{where}: stage ranks must cover 0..{ws - 1} once each (missing {missing}, "
            f"unexpected or repeated {extra or [r for r in flat if flat.count(r) > 1][:5]})"
        )
    for i, rs in enumerate(stage_ranks):
        if list(rs) != list(range(i * tp * dp, (i + 1) * tp * dp)):
            raise ConfigError(
                f"{where}: stage {i} must hold ranks {i * tp * dp}..{(i + 1) * tp * dp - 1} in order"
            )
    groups: list[Group] = []
    for kind, size in (("tp", tp), ("dp", dp), ("pp", pp)):
        gs = _need(_need(raw, "groups", dict, where), kind, list, f"{where}: groups")
        seen: list[int] = []
        for j, g in enumerate(gs):
            ranks = tuple(_need(g, "ranks", list, f"{where}: groups.{kind}[{j}]"))
            if len(ranks) != size:
                raise ConfigError(f"{where}: groups.{kind}[{j}] has {len(ranks)} ranks; {kind} is {size}")
            env = g.get("env") or {}
            if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
                raise ConfigError(f"{where}: groups.{kind}[{j}].env must map names to strings")
            groups.append(Group(kind, ranks, str(g.get("transport", "")), dict(env), g.get("ifname")))
            seen.extend(ranks)
        if sorted(seen) != list(range(ws)):
            raise ConfigError(f"{where}: the {kind} groups must cover every rank exactly once")
    return RunPlan(p, tp, pp, dp, ws, gb, mb, model, layers, stage_ranks, tuple(groups), raw)
