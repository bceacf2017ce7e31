"""Prompt -> expert: sentence embeddings, a classifier chosen by cross-validation, calibrated
confidence and a generalist fallback. `Router.load(bundle).route(prompts)` is the engine's API."""

from wallbreak.coe.router.fit import Example, FitOptions, FitReport, fit_router, read_examples
from wallbreak.coe.router.router import Decision, Router

__all__ = ["Decision", "Example", "FitOptions", "FitReport", "Router", "fit_router", "read_examples"]
