"""The serving engine: per-expert continuous batching, a switch-aware scheduler, prefetch."""

from wallbreak.coe.engine.engine import Engine, EngineConfig, EngineListener, ExpertUnavailable, QueueFull
from wallbreak.coe.engine.request import Event, Request, SamplingParams, TokenLogprob
from wallbreak.coe.policy import POLICIES, ServingPolicy, serving_policy

__all__ = [
    "POLICIES",
    "Engine",
    "EngineConfig",
    "EngineListener",
    "Event",
    "ExpertUnavailable",
    "QueueFull",
    "Request",
    "SamplingParams",
    "ServingPolicy",
    "TokenLogprob",
    "serving_policy",
]
