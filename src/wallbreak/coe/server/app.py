"""The OpenAI-compatible HTTP API in front of the engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from wallbreak.coe.engine import Engine, Event, ExpertUnavailable, QueueFull, SamplingParams
from wallbreak.coe.engine import Request as EngineRequest
from wallbreak.coe.router import Router
from wallbreak.coe.server.metrics import Metrics
from wallbreak.coe.server.protocol import ChatRequest, CompletionRequest, error_body
from wallbreak.errors import ConfigError

VIRTUAL_MODEL = "coe"


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def _err(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def create_app(engine: Engine, router: Router | None, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="wallbreak", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    app.state.engine, app.state.metrics, app.state.router = engine, metrics, router
    created = int(time.time())

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Response:
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _err(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        response: Response = await call_next(request)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _err(e.status, e.message, e.param, e.headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "experts": engine.experts,
            "unavailable": engine.broken,
            "queue": engine.queue_depth(),
            "active": engine.active(),
            "engine": dict(engine.stats.__dict__),
            "tiers": engine.tiers.stats.summary(),
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [VIRTUAL_MODEL, *engine.experts]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": created, "owned_by": "wallbreak"} for n in names
            ],
        }

    async def parse(request: Request, kind: type[ChatRequest] | type[CompletionRequest]) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return kind.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first["loc"]) or None
            msg = first["msg"]
            raise ApiError(400, f"{param}: {msg}" if param else msg, param) from None

    async def choose(model: str, text: str) -> tuple[str, list[str]]:
        if model != VIRTUAL_MODEL:
            if model not in engine.experts:
                raise ApiError(
                    404,
                    f"model {model!r} does not exist; models: {', '.join([VIRTUAL_MODEL, *engine.experts])}",
                    "model",
                )
            return model, [model]
        if router is None:
            return engine.experts[0], engine.experts[:1]
        try:
            d = (await run_in_threadpool(router.route, [text]))[0]
        except ConfigError as e:
            raise ApiError(400, str(e), "messages") from None
        metrics.routing.labels(d.expert, str(d.fallback).lower()).inc()
        return d.expert, [e for e, _ in d.top_k]

    async def generate(request: Request, body: Any, endpoint: str) -> Response:
        is_chat = isinstance(body, ChatRequest)
        text = (
            next((m.text() for m in reversed(body.messages) if m.role == "user"), body.messages[-1].text())
            if is_chat
            else body.text()
        )
        expert, top_k = await choose(body.model, text)
        tok = engine.tokenizers[expert]
        try:
            if is_chat:
                msgs = [
                    {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages
                ]
                ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
            else:
                ids = tok(text)["input_ids"]
        except Exception as e:  # a template that rejects these messages (e.g. a role order it forbids)
            raise ApiError(400, f"expert {expert!r} cannot format these messages: {e}", "messages") from None
        ids = [int(i) for i in ids]
        context = engine.contexts[expert]
        if not ids:
            raise ApiError(400, "the prompt is empty", "messages" if is_chat else "prompt")
        if len(ids) >= context:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; expert {expert!r} takes at most {context - 1} "
                f"(context {context}, with room for one generated token)",
                "messages" if is_chat else "prompt",
            )
        limit = body.limit()
        max_tokens = min(limit if limit is not None else context - len(ids), context - len(ids))
        params = SamplingParams(max_tokens, body.temperature, body.top_p, body.stops(), body.seed)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        req = EngineRequest(expert, ids, params, emit)
        req.meta["top_k"] = top_k
        try:
            engine.submit(req)
        except QueueFull as e:
            metrics.requests.labels(expert, endpoint, "429").inc()
            raise ApiError(429, f"{e}; retry shortly", headers={"Retry-After": "1"}) from None
        except ExpertUnavailable as e:
            metrics.requests.labels(expert, endpoint, "503").inc()
            raise ApiError(503, str(e), "model") from None
        rid = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if is_chat else "text_completion"

        def usage() -> dict[str, int]:
            return {
                "prompt_tokens": len(ids),
                "completion_tokens": req.completion_tokens,
                "total_tokens": len(ids) + req.completion_tokens,
            }

        def account(status: int) -> None:
            metrics.requests.labels(expert, endpoint, str(status)).inc()
            metrics.tokens.labels(expert, "prompt").inc(len(ids))
            metrics.tokens.labels(expert, "completion").inc(req.completion_tokens)

        if not body.stream:
            parts: list[str] = []
            try:
                while True:
                    ev = await queue.get()
                    if ev.error:
                        account(ev.status)
                        raise ApiError(ev.status, ev.error)
                    parts.append(ev.text)
                    if ev.finish_reason:
                        break
            finally:
                req.cancel()  # no-op when finished; frees the batch slot if the client went away
            account(200)
            out = "".join(parts)
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out},
                    "finish_reason": ev.finish_reason,
                }
                if is_chat
                else {"index": 0, "text": out, "logprobs": None, "finish_reason": ev.finish_reason}
            )
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": int(time.time()),
                    "model": expert,
                    "choices": [choice],
                    "usage": usage(),
                }
            )

        chunk_obj = "chat.completion.chunk" if is_chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
            if is_chat:
                d: dict[str, Any] = (
                    {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                )
                c: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            payload = {
                "id": rid,
                "object": chunk_obj,
                "created": int(time.time()),
                "model": expert,
                "choices": [c],
            }
            return f"data: {json.dumps(payload)}\n\n"

        async def events() -> AsyncIterator[str]:
            status = 200
            try:
                if is_chat:
                    yield chunk(None, None, role=True)
                while True:
                    ev = await queue.get()
                    if ev.error:
                        status = ev.status
                        yield f"data: {json.dumps(error_body(ev.status, ev.error))}\n\n"
                        break
                    if ev.text:
                        yield chunk(ev.text, None)
                    if ev.finish_reason:
                        yield chunk(None, ev.finish_reason)
                        break
                if include_usage:
                    u = {
                        "id": rid,
                        "object": chunk_obj,
                        "created": int(time.time()),
                        "model": expert,
                        "choices": [],
                        "usage": usage(),
                    }
                    yield f"data: {json.dumps(u)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()  # a client that left mid-stream frees its place in the batch
                account(status if req.meta.get("finish") != "cancelled" else 499)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, await parse(request, ChatRequest), "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, await parse(request, CompletionRequest), "completions")

    return app
