"""The OpenAI completion endpoints' work: parse and check the body, route, encode through the
expert's tokenizer facts, submit token ids to the engine, and shape the answer (whole or SSE)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from wallbreak.coe.engine import Engine, Event, ExpertUnavailable, QueueFull, SamplingParams, TokenLogprob
from wallbreak.coe.engine import Request as EngineRequest
from wallbreak.coe.router import Router
from wallbreak.coe.server.metrics import Metrics
from wallbreak.coe.server.protocol import (
    MAX_CHARS_PER_TOKEN,
    ChatRequest,
    CompletionRequest,
    error_body,
    unsupported_field,
)
from wallbreak.coe.tokenization import ExpertTokenizer, TemplateError
from wallbreak.errors import ConfigError

VIRTUAL_MODEL = "coe"
DISCONNECT_POLL_S = 0.25  # how often a whole-answer request checks that its client is still there


# pydantic names the branch of a union it tried in the error's location ("str", "list[...]",
# "constrained-str"); a client wants the field's name alone.
_UNION_TAG = re.compile(r"[\[\]-]|^(str|int|float|bool|none|list|dict|constrained-str)$")


def telling_error(e: ValidationError) -> Any:
    """The error a client can act on. For a value of a union (`stop`: a string or a list), pydantic
    reports one error per branch, and the first is usually "not a string" for a list that is too
    long; prefer one about the value over one about its type."""
    errs = e.errors()
    about_value = [x for x in errs if not (x["type"].endswith("_type") or x["type"] == "none_required")]
    return (about_value or errs)[0]


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def chat_logprobs(tok: ExpertTokenizer, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, lp: float) -> dict[str, Any]:
        text = tok.token_text(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = [entry(x.token, x.logprob) | {"top_logprobs": [entry(t, v) for t, v in x.top]} for x in lps]
    return {"content": content, "refusal": None}


def completion_logprobs(tok: ExpertTokenizer, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens = [tok.token_text(x.token) for x in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [x.logprob for x in lps],
        "top_logprobs": [{tok.token_text(t): v for t, v in x.top} for x in lps],
        "text_offset": offsets,
    }


class Completions:
    """/v1/chat/completions and /v1/completions over one engine, router and set of tokenizers."""

    def __init__(
        self,
        engine: Engine,
        router: Router | None,
        tokenizers: dict[str, ExpertTokenizer],
        metrics: Metrics,
        max_body: int,
    ) -> None:
        self.engine, self.router, self.tokenizers, self.metrics = engine, router, tokenizers, metrics
        self.max_body = max_body

    async def read_body(self, request: Request) -> bytes:
        """The body as JSON bytes, at most `max_body` of them (415 for another content type, 413
        past the limit, counted as it arrives: a chunked body has no length to check first)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(
                415, f"Content-Type must be application/json, got {ctype or 'none'!r}", "Content-Type"
            )
        too_big = ApiError(413, f"the request body is over the server's limit of {self.max_body} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise too_big
        return bytes(body)

    async def parse(self, request: Request, kind: type[ChatRequest] | type[CompletionRequest]) -> Any:
        raw = await self.read_body(request)
        return await run_in_threadpool(self.validate, raw, kind)  # a big body parses off the event loop

    @staticmethod
    def validate(raw: bytes, kind: type[ChatRequest] | type[CompletionRequest]) -> Any:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        field = unsupported_field(body, "chat" if kind is ChatRequest else "completions")
        if field is not None:
            raise ApiError(
                400,
                f"{field}: this server does not implement it (plain text generation only); "
                f"leave {field!r} out or at its default",
                field,
            )
        try:
            return kind.model_validate(body)
        except ValidationError as e:
            first = telling_error(e)
            param = ".".join(str(x) for x in first["loc"] if not _UNION_TAG.search(str(x))) or None
            msg = first["msg"]
            raise ApiError(400, f"{param}: {msg}" if param else msg, param) from None

    async def choose(self, model: str, text: str) -> tuple[str, tuple[str, ...]]:
        if model != VIRTUAL_MODEL:
            if model not in self.engine.experts:
                raise ApiError(
                    404,
                    f"model {model!r} does not exist; "
                    f"models: {', '.join([VIRTUAL_MODEL, *self.engine.experts])}",
                    "model",
                )
            return model, (model,)
        if self.router is None:
            return self.engine.experts[0], (self.engine.experts[0],)
        try:
            d = (await run_in_threadpool(self.router.route, [text]))[0]
        except ConfigError as e:
            raise ApiError(400, str(e), "messages") from None
        self.metrics.routing.labels(d.expert, str(d.fallback).lower()).inc()
        return d.expert, tuple(e for e, _ in d.top_k)

    def encode(self, tok: ExpertTokenizer, body: Any) -> list[int]:
        """The prompt's token ids (run in a worker thread: templates and tokenizers take time)."""
        field = "messages" if isinstance(body, ChatRequest) else "prompt"
        chars = (
            sum(len(m.text()) for m in body.messages) if isinstance(body, ChatRequest) else len(body.text())
        )
        if chars > tok.context * MAX_CHARS_PER_TOKEN:
            raise ApiError(
                400,
                f"the prompt has {chars} characters; expert {tok.name!r} takes at most {tok.context} tokens, "
                f"so at most {tok.context * MAX_CHARS_PER_TOKEN} characters are accepted",
                field,
            )
        try:
            if isinstance(body, ChatRequest):
                msgs = [
                    {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages
                ]
                ids = tok.encode_chat(msgs)
            else:
                ids = tok.encode_text(body.text())
        except TemplateError as e:
            raise ApiError(400, str(e), field) from None
        if not ids:
            raise ApiError(400, "the prompt is empty", field)
        if len(ids) >= tok.context:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; expert {tok.name!r} takes at most {tok.context - 1} "
                f"(context {tok.context}, with room for one generated token)",
                field,
            )
        return ids

    async def generate(self, body: Any, endpoint: str, http: Request) -> Response:
        is_chat = isinstance(body, ChatRequest)
        text = (
            next((m.text() for m in reversed(body.messages) if m.role == "user"), body.messages[-1].text())
            if is_chat
            else body.text()
        )
        expert, alternatives = await self.choose(body.model, text)
        tok = self.tokenizers.get(expert)
        if tok is None:  # its tokenizer is damaged: the engine lists it as unavailable
            why = self.engine.broken.get(expert, "its tokenizer cannot be loaded")
            raise ApiError(503, f"expert {expert!r} is unavailable: {why}", "model", {"Retry-After": "1"})
        ids = await run_in_threadpool(self.encode, tok, body)
        room = tok.context - len(ids)
        limit = body.limit()
        params = SamplingParams(
            max_tokens=min(limit, room) if limit is not None else room,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            logprobs=body.logprobs_k(),
        )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        req = EngineRequest(expert, ids, params, emit, tok.stream(body.stops()), alternatives)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            self.metrics.requests.labels(expert, endpoint, "429").inc()
            raise ApiError(429, f"{e}; retry shortly", headers={"Retry-After": "1"}) from None
        except ExpertUnavailable as e:
            self.metrics.requests.labels(expert, endpoint, "503").inc()
            raise ApiError(503, str(e), "model") from None
        reply = Reply(self.metrics, endpoint, is_chat, expert, tok, req, queue)
        if not body.stream:
            return await reply.full(http)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            reply.chunks(include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


class Reply:
    """One accepted request's answer, whole or as server-sent events, in OpenAI's shapes."""

    def __init__(
        self,
        metrics: Metrics,
        endpoint: str,
        is_chat: bool,
        expert: str,
        tok: ExpertTokenizer,
        req: EngineRequest,
        queue: asyncio.Queue[Event],
    ) -> None:
        self.metrics, self.endpoint, self.is_chat = metrics, endpoint, is_chat
        self.expert, self.tok, self.req, self.queue = expert, tok, req, queue
        self.rid = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.want_logprobs = req.params.logprobs is not None
        self.text_offset = 0

    def usage(self) -> dict[str, int]:
        p, c = self.req.prompt_tokens, self.req.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def account(self, status: int) -> None:
        self.metrics.requests.labels(self.expert, self.endpoint, str(status)).inc()
        self.metrics.tokens.labels(self.expert, "prompt").inc(self.req.prompt_tokens)
        self.metrics.tokens.labels(self.expert, "completion").inc(self.req.completion_tokens)

    def logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        if self.is_chat:
            return chat_logprobs(self.tok, lps)
        out = completion_logprobs(self.tok, lps, self.text_offset)
        self.text_offset = out["text_offset"][-1] + len(out["tokens"][-1]) if lps else self.text_offset
        return out

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": obj,
            "created": int(time.time()),
            "model": self.expert,
            "choices": choices,
        }

    async def full(self, http: Request) -> JSONResponse:
        parts: list[str] = []
        lps: list[TokenLogprob] = []
        watch = asyncio.create_task(self._cancel_when_gone(http))
        try:
            while True:
                ev = await self.queue.get()
                if ev.error:
                    self.account(ev.status)
                    retry = {"Retry-After": "1"} if ev.status in (429, 503) else None
                    raise ApiError(ev.status, ev.error, headers=retry)
                parts.append(ev.text)
                lps.extend(ev.logprobs)
                if ev.finish_reason:
                    break
        finally:
            watch.cancel()
            self.req.cancel()  # no-op when finished; frees the batch slot if the client went away
        if ev.finish_reason == "cancelled":
            self.account(499)
            return JSONResponse(error_body(499, "the client closed the connection"), status_code=499)
        self.account(200)
        out = "".join(parts)
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": ev.finish_reason,
            "logprobs": self.logprobs(lps),
        }
        if self.is_chat:
            choice["message"] = {"role": "assistant", "content": out}
        else:
            choice["text"] = out
        obj = "chat.completion" if self.is_chat else "text_completion"
        return JSONResponse(self.envelope(obj, [choice]) | {"usage": self.usage()})

    async def _cancel_when_gone(self, http: Request) -> None:
        """A whole-answer request whose client left is cancelled: the engine drops its row at the
        next step (a stream notices by itself, when a write fails)."""
        while not self.req.cancelled.is_set():
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await http.is_disconnected():
                self.req.cancel()

    def chunk(self, ev: Event | None, role: bool = False) -> str:
        text = ev.text if ev else ""
        finish = ev.finish_reason if ev else None
        lp = self.logprobs(list(ev.logprobs)) if ev and ev.logprobs else None
        if self.is_chat:
            d: dict[str, Any] = (
                {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            )
            c: dict[str, Any] = {"index": 0, "delta": d, "logprobs": lp, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            c = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
            obj = "text_completion"
        return f"data: {json.dumps(self.envelope(obj, [c]))}\n\n"

    async def chunks(self, include_usage: bool) -> AsyncIterator[str]:
        status = 200
        try:
            if self.is_chat:
                yield self.chunk(None, role=True)
            while True:
                ev = await self.queue.get()
                if ev.error:
                    status = ev.status
                    yield f"data: {json.dumps(error_body(ev.status, ev.error))}\n\n"
                    break
                if ev.text or ev.logprobs or ev.finish_reason:
                    yield self.chunk(ev)
                if ev.finish_reason:
                    break
            if include_usage:
                obj = "chat.completion.chunk" if self.is_chat else "text_completion"
                yield f"data: {json.dumps(self.envelope(obj, []) | {'usage': self.usage()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.req.cancel()  # a client that left mid-stream frees its place in the batch
            self.account(status if self.req.finish_reason != "cancelled" else 499)
