"""What a tier manager is given (TierConfig) and what it counts (TierStats, one SwitchRecord per
switch): the plain records around `manager.TierManager`."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from wallbreak.coe.tiers.disk import CHUNK_BYTES, READER_THREADS, DirectMode
from wallbreak.coe.tiers.policy import POLICIES
from wallbreak.errors import ConfigError


@dataclass
class TierConfig:
    host_budget: int
    device_budget: int
    device: str = "cpu"
    policy: str = "cost"
    on_full: Literal["wait", "error"] = "wait"
    wait_timeout_s: float = 60.0
    reader_threads: int = READER_THREADS
    chunk_bytes: int = CHUNK_BYTES
    direct: DirectMode = "auto"
    max_slots: int | None = None
    prefetch_workers: int = 2
    # None: alias slots on CPU (a switch re-points views into the host arena), copies on CUDA.
    alias_slots: bool | None = None
    huge_pages: bool = True  # ask the kernel for 2 MiB pages under the host arena (tiers/host.py)

    def __post_init__(self) -> None:
        if self.host_budget <= 0:
            raise ConfigError(f"host budget must be positive, got {self.host_budget}")
        if self.device_budget <= 0:
            raise ConfigError(f"device budget must be positive, got {self.device_budget}")
        if self.policy not in POLICIES:
            raise ConfigError(
                f"unknown eviction policy {self.policy!r}; choose one of: {', '.join(POLICIES)}"
            )
        if self.on_full not in ("wait", "error"):
            raise ConfigError(f"on_full must be 'wait' or 'error', got {self.on_full!r}")
        if self.wait_timeout_s <= 0:
            raise ConfigError(f"wait timeout must be positive, got {self.wait_timeout_s}")
        if self.max_slots is not None and self.max_slots < 1:
            raise ConfigError(f"max slots must be >= 1, got {self.max_slots}")
        if self.prefetch_workers < 1:
            raise ConfigError(f"prefetch workers must be >= 1, got {self.prefetch_workers}")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but no CUDA device is available")
        if self.alias_slots and dev.type != "cpu":
            raise ConfigError("alias slots need the device to be host memory (device cpu)")

    @property
    def alias(self) -> bool:
        return torch.device(self.device).type == "cpu" if self.alias_slots is None else self.alias_slots


@dataclass
class SwitchRecord:
    expert: str
    nbytes: int
    disk_to_host_s: float | None  # None: the expert was already in the host arena
    host_to_device_s: float
    prefetch: bool


@dataclass
class TierStats:
    hits: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    evictions: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    bytes_disk_to_host: int = 0
    bytes_disk_to_host_prefetch: int = 0  # of those, read ahead of need by prefetch
    bytes_host_to_device: int = 0
    disk_to_host_s: float = 0.0
    host_to_device_s: float = 0.0
    switches: int = 0
    alias_binds: int = 0  # switches that re-pointed views instead of copying (CPU)
    prefetch_loads: int = 0
    recent: deque[SwitchRecord] = field(default_factory=lambda: deque(maxlen=1024))

    def summary(self) -> dict[str, Any]:
        def gbps(b: int, s: float) -> float | None:
            return round(b / s / 1e9, 3) if s > 0 else None

        return {
            "hits": dict(self.hits),
            "misses": dict(self.misses),
            "evictions": dict(self.evictions),
            "switches": self.switches,
            "alias_binds": self.alias_binds,
            "prefetch_loads": self.prefetch_loads,
            "bytes_disk_to_host": self.bytes_disk_to_host,
            "bytes_disk_to_host_prefetch": self.bytes_disk_to_host_prefetch,
            "bytes_host_to_device": self.bytes_host_to_device,
            "disk_to_host_gbps": gbps(self.bytes_disk_to_host, self.disk_to_host_s),
            "disk_to_host_s": round(self.disk_to_host_s, 4),
            "host_to_device_gbps": gbps(self.bytes_host_to_device, self.host_to_device_s),
        }
