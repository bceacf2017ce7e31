"""The serving engine: per-expert continuous batching, a switch-aware scheduler, prefetch."""

from wallbreak.coe.engine.engine import Engine, EngineConfig, ExpertUnavailable, QueueFull
from wallbreak.coe.engine.request import Event, Request, SamplingParams

__all__ = ["Engine", "EngineConfig", "Event", "ExpertUnavailable", "QueueFull", "Request", "SamplingParams"]
