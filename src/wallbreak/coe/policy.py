"""The named serving policies: each is a scheduler, an eviction rule and a prefetch choice.

What each scheduler does is written in `coe/engine/scheduler.py`; this module only names the
combinations, so the CLI can list them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wallbreak.errors import ConfigError

SchedulerKind = Literal["switch-aware", "oldest-first", "fcfs"]
SCHEDULERS: tuple[SchedulerKind, ...] = ("switch-aware", "oldest-first", "fcfs")
EVICTIONS = ("cost", "lru")


@dataclass(frozen=True)
class ServingPolicy:
    name: str
    scheduler: SchedulerKind
    eviction: str  # the tier manager's policy: cost or lru
    prefetch: bool

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if self.eviction not in EVICTIONS:
            raise ConfigError(f"unknown eviction {self.eviction!r}; choose one of: {', '.join(EVICTIONS)}")

    @property
    def batches(self) -> bool:
        return self.scheduler != "fcfs"


POLICIES: dict[str, ServingPolicy] = {
    p.name: p
    for p in (
        ServingPolicy("ours", "switch-aware", "cost", prefetch=True),
        ServingPolicy("per-expert-lru", "oldest-first", "lru", prefetch=False),
        ServingPolicy("fcfs-lru", "fcfs", "lru", prefetch=False),
    )
}


def serving_policy(
    name: str, scheduler: str | None = None, eviction: str | None = None, prefetch: bool | None = None
) -> ServingPolicy:
    """A named policy, with any of its three choices overridden (a new name says so)."""
    if name not in POLICIES:
        raise ConfigError(f"unknown serving policy {name!r}; choose one of: {', '.join(POLICIES)}")
    base = POLICIES[name]
    chosen = ServingPolicy(
        name,
        scheduler if scheduler is not None else base.scheduler,  # type: ignore[arg-type]
        eviction if eviction is not None else base.eviction,
        prefetch if prefetch is not None else base.prefetch,
    )
    if chosen != base:
        chosen = ServingPolicy(
            f"{name}[{chosen.scheduler},{chosen.eviction},{'' if chosen.prefetch else 'no-'}prefetch]",
            chosen.scheduler,
            chosen.eviction,
            chosen.prefetch,
        )
    return chosen
