"""The OpenAI-compatible HTTP API in front of the engine."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from wallbreak.coe import defaults
from wallbreak.coe.engine import Engine
from wallbreak.coe.router import Router
from wallbreak.coe.server import openapi
from wallbreak.coe.server.completions import VIRTUAL_MODEL, ApiError, Completions
from wallbreak.coe.server.metrics import Metrics
from wallbreak.coe.server.protocol import ChatRequest, CompletionRequest, ModelList, error_body
from wallbreak.coe.tokenization import ExpertTokenizer


def _err(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class BearerAuth:
    """Plain ASGI (not BaseHTTPMiddleware, which hides a client's disconnect from the endpoint):
    every /v1/ route needs 'Authorization: Bearer KEY'."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                answer = _err(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    engine: Engine,
    router: Router | None,
    tokenizers: dict[str, ExpertTokenizer],
    *,
    api_key: str | None = None,
    extra_health: Any = None,
    max_body: int = defaults.MAX_BODY,
) -> FastAPI:
    """`extra_health`: an object with `async refresh()` and `health() -> dict` whose answer /health
    adds (the Ray ingress: its replicas)."""
    app = FastAPI(title="wallbreak", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    app.state.engine, app.state.metrics, app.state.router = engine, metrics, router
    app.state.tokenizers = tokenizers
    created = int(time.time())
    handler = Completions(engine, router, tokenizers, metrics, max_body)

    if api_key:
        app.add_middleware(BearerAuth, key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _err(e.status, e.message, e.param, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:  # 404, 405: OpenAI's shape too
        return _err(e.status_code, str(e.detail), headers=dict(e.headers or {}))

    @app.get("/health", responses={200: {"description": "engine, tiers, compile and retry state"}})
    async def health() -> dict[str, Any]:
        if extra_health is not None:
            await extra_health.refresh()
        extra = extra_health.health() if extra_health is not None else {}
        return extra | {
            "status": "ok",
            "experts": engine.experts,
            "unavailable": engine.broken,
            "retrying": engine.retry_summary(),
            "queue": engine.queue_depth(),
            "active": engine.active(),
            "kv_bytes": engine.kv_bytes(),
            "engine": dict(engine.stats.__dict__),
            "compile": engine.compile_summary(),
            "tiers": engine.tiers.stats.summary(),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        if extra_health is not None:
            await extra_health.refresh()
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=openapi.errors(401))
    async def models() -> dict[str, Any]:
        names = [VIRTUAL_MODEL, *engine.experts]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": created, "owned_by": "wallbreak"} for n in names
            ],
        }

    @app.post("/v1/chat/completions", response_model=None, responses=openapi.CHAT_RESPONSES)
    async def chat(request: Request) -> Response:
        return await handler.generate(await handler.parse(request, ChatRequest), "chat", request)

    @app.post("/v1/completions", response_model=None, responses=openapi.COMPLETION_RESPONSES)
    async def completions(request: Request) -> Response:
        return await handler.generate(await handler.parse(request, CompletionRequest), "completions", request)

    openapi.install(app, [VIRTUAL_MODEL, *engine.experts])
    return app
