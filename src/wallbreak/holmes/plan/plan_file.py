"""The plan file: one module owns its format, version, model shape and checks, for every consumer.

`wallbreak plan --emit-launch` writes it (through `write_plan`), the runtime and the emulator read it
(through `load_plan`). Every rank loads and checks the same file before any collective, so a bad
plan is one clear error on every rank, never a hang.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wallbreak.common.atomic import atomic_open
from wallbreak.common.jsonfile import read_json
from wallbreak.errors import ConfigError
from wallbreak.holmes.plan.layout import GROUP_KINDS, ParallelLayout
from wallbreak.holmes.plan.spec import ModelSpec, TrainingSpec

PLAN_FORMAT = "wallbreak-plan"
PLAN_NAME = "plan.json"  # the plan's file name in a launch folder
PLAN_VERSION = 2  # bump when a reader of version N could misread the new file
OLDEST_VERSION = 2  # version 1 described a GPT-2-style model the runtime no longer builds
TRAINING_FIELDS = ("global_batch", "micro_batch", "recompute", "dtype", "schedule", "virtual_stages")


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
    layout: ParallelLayout
    model: ModelSpec
    training: TrainingSpec
    stage_layers: tuple[int, ...]
    groups: tuple[Group, ...]
    raw: dict[str, Any]

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def global_batch(self) -> int:
        return self.training.global_batch

    @property
    def micro_batch(self) -> int:
        return self.training.micro_batch

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def stage_of(self, rank: int) -> int:
        return self.layout.stage_of(rank)

    def dp_index(self, rank: int) -> int:
        return self.layout.dp_index(rank)

    def layer_range(self, stage: int) -> range:
        start = sum(self.stage_layers[:stage])
        return range(start, start + self.stage_layers[stage])

    def group_of(self, kind: str, rank: int) -> Group:
        for g in self.groups:
            if g.kind == kind and rank in g.ranks:
                return g
        raise ConfigError(f"{self.path}: rank {rank} has no {kind} group")

    def fingerprint(self) -> str:
        """Degrees, split and model: what a run's layout is (checkpoints record it, and reshard)."""
        key = json.dumps(
            {
                **self.layout.to_json(),
                "layers": self.stage_layers,
                "model": {"config": self.model.config, "seq_len": self.model.seq_len},
            },
            sort_keys=True,
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def model_json(m: ModelSpec) -> dict[str, Any]:
    """The planner's model as the plan file stores it: name, sequence length, the Hugging Face config
    the runtime builds, and where its weights and tokenizer come from (none: seeded initialisation)."""
    return {"name": m.name, "seq_len": m.seq_len, "config": m.config, "source": m.source}


def training_json(t: TrainingSpec) -> dict[str, Any]:
    return {f: getattr(t, f) for f in TRAINING_FIELDS}


def model_spec(d: dict[str, Any], where: str = "plan") -> ModelSpec:
    """`model_json` read back; every problem is one ConfigError naming `where`."""
    name = _need(d, "name", str, f"{where}: model")
    seq_len = _need(d, "seq_len", int, f"{where}: model")
    config = _need(d, "config", dict, f"{where}: model")
    source = d.get("source") or {}
    if not isinstance(source, dict) or not all(isinstance(v, str) for v in source.values()):
        raise ConfigError(f"{where}: model.source must map names to strings")
    return ModelSpec(name, config, seq_len, source)


def training_spec(d: dict[str, Any]) -> TrainingSpec:
    return TrainingSpec(**{f: d[f] for f in TRAINING_FIELDS})


def write_plan(path: Path, body: dict[str, Any]) -> None:
    """Write a plan file: the body, stamped with this module's format and version."""
    with atomic_open(path, "w") as f:
        json.dump({"format": PLAN_FORMAT, "version": PLAN_VERSION} | body, f, indent=1)
        f.write("\n")


def _need(d: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise ConfigError(f"{where}: {key!r} must be {kind.__name__}, got {v!r}")
    return v


def _header(raw: Any, where: str) -> None:
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise ConfigError(
            f"{where}: not a wallbreak plan (write one with `wallbreak plan --emit-launch DIR`)"
        )
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{where}: 'version' must be an integer >= 1, got {version!r}; re-plan it")
    if version < OLDEST_VERSION:
        raise ConfigError(
            f"{where}: plan version {version} is older than this wallbreak reads (version "
            f"{OLDEST_VERSION} and newer: it names a Hugging Face config); re-plan it with "
            "`wallbreak plan CLUSTER --model SRC --emit-launch DIR`"
        )
    if version > PLAN_VERSION:
        raise ConfigError(
            f"{where}: plan version {version} was written by a newer wallbreak; this one reads "
            f"version {PLAN_VERSION} and older: upgrade wallbreak, or re-plan with this one"
        )


def _layout(raw: dict[str, Any], where: str, world_size: int | None) -> ParallelLayout:
    tp, pp, dp = (_need(raw, k, int, where) for k in ("tp", "pp", "dp"))
    if min(tp, pp, dp) < 1:
        raise ConfigError(f"{where}: tp, pp and dp must be >= 1, got {tp}, {pp}, {dp}")
    lay = ParallelLayout(tp, dp, pp)
    ws = _need(raw, "world_size", int, where)
    if ws != lay.world_size:
        raise ConfigError(f"{where}: world_size {ws} is not tp x pp x dp = {lay.world_size}")
    if world_size is not None and world_size != ws:
        raise ConfigError(
            f"{where}: the plan is for {ws} processes but torchrun started {world_size}; "
            f"launch with --nproc-per-node/--nnodes that give {ws}"
        )
    return lay


def _model(raw: dict[str, Any], where: str, lay: ParallelLayout) -> ModelSpec:
    model = model_spec(_need(raw, "model", dict, where), where)
    if model.kv_heads % lay.tp:
        raise ConfigError(
            f"{where}: tp={lay.tp} must divide the model's {model.kv_heads} key/value heads "
            f"(and so its {model.heads} attention heads)"
        )
    return model


def _training(raw: dict[str, Any], where: str, lay: ParallelLayout) -> TrainingSpec:
    t = _need(raw, "training", dict, where)
    gb = _need(t, "global_batch", int, f"{where}: training")
    mb = _need(t, "micro_batch", int, f"{where}: training")
    if gb % (mb * lay.dp):
        raise ConfigError(f"{where}: global batch {gb} is not a multiple of micro-batch {mb} x dp {lay.dp}")
    try:
        return training_spec(t)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{where}: training needs {', '.join(TRAINING_FIELDS)} ({e})") from None


def _stages(raw: dict[str, Any], where: str, lay: ParallelLayout, model: ModelSpec) -> tuple[int, ...]:
    stages = _need(raw, "stages", list, where)
    if len(stages) != lay.pp:
        raise ConfigError(f"{where}: {len(stages)} stage(s) listed but pp is {lay.pp}")
    layers = tuple(_need(s, "layers", int, f"{where}: stage {i}") for i, s in enumerate(stages))
    if any(n < 1 for n in layers):
        raise ConfigError(f"{where}: every stage needs at least one layer, got {list(layers)}")
    if sum(layers) != model.layers:
        raise ConfigError(
            f"{where}: stage layers {list(layers)} sum to {sum(layers)}, but the model has {model.layers}"
        )
    for i, s in enumerate(stages):
        want = lay.stage_ranks(i)
        got = list(_need(s, "ranks", list, f"{where}: stage {i}"))
        if got != want:
            raise ConfigError(f"{where}: stage {i} holds ranks {got}; the layout gives it {want}, in order")
    return layers


def _groups(raw: dict[str, Any], where: str, lay: ParallelLayout) -> tuple[Group, ...]:
    out: list[Group] = []
    listed = _need(raw, "groups", dict, where)
    for kind in GROUP_KINDS:
        gs = _need(listed, kind, list, f"{where}: groups")
        want = lay.groups(kind)
        if len(gs) != len(want):
            raise ConfigError(f"{where}: {len(gs)} {kind} group(s) listed; the layout has {len(want)}")
        for j, (g, ranks) in enumerate(zip(gs, want, strict=True)):
            got = list(_need(g, "ranks", list, f"{where}: groups.{kind}[{j}]"))
            if got != ranks:
                raise ConfigError(
                    f"{where}: groups.{kind}[{j}] is {got}; the rank order "
                    f"(tp, then dp, then pp) makes it {ranks}"
                )
            env = g.get("env") or {}
            if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
                raise ConfigError(f"{where}: groups.{kind}[{j}].env must map names to strings")
            out.append(Group(kind, tuple(ranks), str(g.get("transport", "")), dict(env), g.get("ifname")))
    return tuple(out)


def load_plan(path: str | Path, world_size: int | None = None) -> RunPlan:
    """Read and check a plan file; every problem is one ConfigError naming the file and the field."""
    p = Path(path)
    raw = read_json(p, "plan")
    where = str(p)
    _header(raw, where)
    lay = _layout(raw, where, world_size)
    model = _model(raw, where, lay)
    training = _training(raw, where, lay)
    layers = _stages(raw, where, lay, model)
    return RunPlan(p, lay, model, training, layers, _groups(raw, where, lay), raw)
