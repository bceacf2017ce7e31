"""The OpenAI-compatible HTTP API in front of the engine."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from wallbreak.coe import defaults
from wallbreak.coe.catalog import Catalog
from wallbreak.coe.engine import Engine
from wallbreak.coe.grammar import Grammars
from wallbreak.coe.server import openapi
from wallbreak.coe.server.completions import VIRTUAL_MODEL, Completions
from wallbreak.coe.server.errors import ApiError
from wallbreak.coe.server.extras import Extras
from wallbreak.coe.server.metrics import Metrics
from wallbreak.coe.server.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelList,
    TokenizeRequest,
    error_body,
)


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
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] == "/models"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                answer = _err(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    engine: Engine,
    catalog: Catalog,
    *,
    api_key: str | None = None,
    extra_health: Any = None,
    max_body: int = defaults.MAX_BODY,
    describe: Callable[[str], dict[str, Any]] | None = None,
) -> FastAPI:
    """`extra_health`: an object with `async refresh()` and `health() -> dict` whose answer /health
    adds (the Ray ingress: its replicas). `describe(name)`: an expert's state for /v1/models (where
    it is, pins, form; coe/live.py)."""
    app = FastAPI(title="wallbreak", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    app.state.engine, app.state.metrics, app.state.catalog = engine, metrics, catalog
    created = int(time.time())
    grammars = Grammars()
    app.state.grammars = grammars
    handler = Completions(engine, catalog, metrics, max_body, grammars)
    extras = Extras(catalog)

    if api_key:
        app.add_middleware(BearerAuth, key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _err(e.status, e.message, e.param, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:  # 404, 405: OpenAI's shape too
        return _err(e.status_code, str(e.detail), headers=dict(e.headers or {}))

    add_status_routes(app, engine, catalog, metrics, extra_health)

    @app.get(
        "/v1/models",
        response_model=ModelList,
        response_model_exclude_none=True,
        responses=openapi.errors(401),
    )
    async def models() -> dict[str, Any]:
        def card(name: str, **extra: Any) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": created, "owned_by": "wallbreak", **extra}

        data = [card(VIRTUAL_MODEL)]
        for n in catalog.names:
            tok = extras.tokenizers.get(n)
            facts = {"max_model_len": tok.context, "generation_defaults": dict(tok.defaults)} if tok else {}
            if describe is not None:
                facts["state"] = describe(n)
            data.append(card(n, **facts))
        if extras.embedding_model is not None:
            data.append(card(extras.embedding_model, kind="embedding"))
        return {"object": "list", "data": data}

    add_tokenizer_and_embedding_routes(app, handler, extras)

    @app.post("/v1/chat/completions", response_model=None, responses=openapi.CHAT_RESPONSES)
    async def chat(request: Request) -> Response:
        return await handler.generate(await handler.parse(request, ChatRequest), "chat", request)

    @app.post("/v1/completions", response_model=None, responses=openapi.COMPLETION_RESPONSES)
    async def completions(request: Request) -> Response:
        return await handler.generate(await handler.parse(request, CompletionRequest), "completions", request)

    embedder = extras.embedding_model
    openapi.install(
        app,
        lambda: {
            "completions": [VIRTUAL_MODEL, *catalog.names],
            "experts": list(extras.tokenizers),
            "embedding": [embedder] if embedder else [],
        },
    )
    return app


def add_tokenizer_and_embedding_routes(app: FastAPI, handler: Completions, extras: Extras) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info, and /v1/embeddings: bodies read and
    checked as the completions' are (`handler.parse`), answered by `extras`."""

    @app.post("/tokenize", responses=openapi.errors(400, 404, 413, 415))
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await handler.parse(request, TokenizeRequest)
        return await run_in_threadpool(extras.tokenize, body)

    @app.post("/detokenize", responses=openapi.errors(400, 404, 413, 415))
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await handler.parse(request, DetokenizeRequest)
        return await run_in_threadpool(extras.detokenize, body)

    @app.get("/tokenizer_info", responses=openapi.errors(400, 404))
    async def tokenizer_info(model: str | None = None) -> dict[str, Any]:
        return extras.tokenizer_info(model)  # no model: the only expert; several: say which

    @app.post("/v1/embeddings", responses=openapi.errors(400, 401, 404, 413, 415))
    async def embeddings(request: Request) -> dict[str, Any]:
        body = await handler.parse(request, EmbeddingRequest)
        return await run_in_threadpool(extras.embeddings, body)


def add_status_routes(
    app: FastAPI, engine: Engine, catalog: Catalog, metrics: Metrics, extra_health: Any
) -> None:
    """/health (the engine's, tiers' and compile state, and `extra_health`'s) and /metrics."""

    @app.get("/health", responses={200: {"description": "engine, tiers, compile and retry state"}})
    async def health() -> dict[str, Any]:
        if extra_health is not None:
            await extra_health.refresh()
        extra = extra_health.health() if extra_health is not None else {}
        return extra | {
            "status": "ok",
            "experts": catalog.names,
            "unavailable": engine.broken,
            "retrying": engine.retry_summary(),
            "queue": engine.queue_depth(),
            "active": engine.active(),
            "kv_bytes": engine.kv_bytes(),
            "engine": engine.stats.public(),
            "compile": engine.compile_summary(),
            "tiers": engine.tiers.stats.summary() | {"host_memory": engine.tiers.host_memory()},
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        if extra_health is not None:
            await extra_health.refresh()
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)
