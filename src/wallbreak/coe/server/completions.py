"""The OpenAI completion endpoints' work: parse and check the body, route, encode through the
expert's tokenizer facts, submit token ids to the engine, and shape the answer (whole or SSE)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from wallbreak.coe.catalog import Catalog
from wallbreak.coe.engine import Engine, Event, ExpertUnavailable, QueueFull, SamplingParams
from wallbreak.coe.engine import Request as EngineRequest
from wallbreak.coe.grammar import Grammar, GrammarError, Grammars
from wallbreak.coe.server.errors import ApiError
from wallbreak.coe.server.metrics import Metrics
from wallbreak.coe.server.protocol import (
    MAX_CHARS_PER_TOKEN,
    ChatRequest,
    CompletionRequest,
    unsupported_field,
)
from wallbreak.coe.server.reply import Reply
from wallbreak.coe.server.tools import chat_messages, functions_for
from wallbreak.coe.tokenization import ExpertTokenizer, TemplateError
from wallbreak.errors import ConfigError

VIRTUAL_MODEL = "coe"
# A surrogate in raw JSON: escaped (\uD800-\uDFFF), or as UTF-8 bytes, which json.loads passes through.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


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


class Completions:
    """/v1/chat/completions and /v1/completions over one engine, router and set of tokenizers."""

    def __init__(
        self,
        engine: Engine,
        catalog: Catalog,
        metrics: Metrics,
        max_body: int,
        grammars: Grammars | None = None,
    ) -> None:
        self.engine, self.catalog, self.metrics = engine, catalog, metrics
        self.max_body = max_body
        self.grammars = grammars or Grammars()

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

    async def parse(self, request: Request, kind: type[BaseModel]) -> Any:
        raw = await self.read_body(request)
        return await run_in_threadpool(self.validate, raw, kind)  # a big body parses off the event loop

    @staticmethod
    def validate(raw: bytes, kind: type[BaseModel]) -> Any:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:  # JSON may escape a lone UTF-16 surrogate (\ud800), which no tokenizer can take
            if _SURROGATE.search(raw):  # only then re-encode the body to find a lone one
                json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ApiError(
                400, "a string holds a lone UTF-16 surrogate; strings must be valid Unicode"
            ) from None
        endpoint = {ChatRequest: "chat", CompletionRequest: "completions"}.get(kind)
        field = unsupported_field(body, endpoint) if endpoint else None
        if field is not None:
            raise ApiError(
                400,
                f"{field}: this server does not implement it; leave {field!r} out or at its default",
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
        names = self.catalog.names
        if model != VIRTUAL_MODEL:
            if model not in names:
                raise ApiError(
                    404,
                    f"model {model!r} does not exist; models: {', '.join([VIRTUAL_MODEL, *names])}",
                    "model",
                )
            return model, (model,)
        router = self.catalog.router
        if router is None or len(names) < 2:
            return names[0], (names[0],)
        try:
            d = (await run_in_threadpool(router.route, [text]))[0]
        except ConfigError as e:
            raise ApiError(400, str(e), "messages") from None
        self.metrics.routing.labels(d.expert, str(d.fallback).lower()).inc()
        return d.expert, tuple(e for e, _ in d.top_k)

    def encode(self, tok: ExpertTokenizer, body: Any) -> list[list[int]]:
        """Each prompt's token ids (run in a worker thread: templates and tokenizers take time)."""
        field = "messages" if isinstance(body, ChatRequest) else "prompt"
        if isinstance(body, ChatRequest):
            chars = sum(len(m.text()) for m in body.messages)
        else:
            chars = sum(len(x) for x in body.prompts() if isinstance(x, str))
        if chars > tok.context * MAX_CHARS_PER_TOKEN:
            raise ApiError(
                400,
                f"the prompt has {chars} characters; expert {tok.name!r} takes at most {tok.context} tokens, "
                f"so at most {tok.context * MAX_CHARS_PER_TOKEN} characters are accepted",
                field,
            )
        try:
            if isinstance(body, ChatRequest):
                msgs, tools = chat_messages(body, tok)
                prompts = [tok.encode_chat(msgs, tools)]
            else:
                prompts = [p if isinstance(p, list) else tok.encode_text(p) for p in body.prompts()]
        except TemplateError as e:
            raise ApiError(400, str(e), field) from None
        for ids in prompts:
            check_prompt(tok, ids, field)
        return prompts

    def constraint(self, tok: ExpertTokenizer, body: Any) -> Grammar | None:
        """The grammar the reply must follow: response_format's, the tool-call grammar, or none."""
        try:
            if isinstance(body, ChatRequest) and body.tool_mode() != "none":
                mode = body.tool_mode()
                # A named function is called once (vLLM's reading); auto and required may call
                # several when parallel_tool_calls allows.
                required = mode != "auto"
                parallel = body.parallel_tool_calls and mode in ("auto", "required")
                return self.grammars.tools(tok, functions_for(body), required=required, parallel=parallel)
            rf = body.response_format
            if rf is None or rf.type == "text":
                return None
            if rf.type == "json_object":
                return self.grammars.json_schema(tok, {"type": "object"}, "response_format")
            assert rf.json_schema is not None
            return self.grammars.json_schema(
                tok, rf.json_schema.schema_, "response_format.json_schema.schema"
            )
        except GrammarError as e:
            raise ApiError(400, str(e), e.part.split(".")[0] or "response_format") from None

    async def generate(self, body: Any, endpoint: str, http: Request) -> Response:
        is_chat = isinstance(body, ChatRequest)
        if not is_chat and body.model == VIRTUAL_MODEL and not isinstance(body.prompts()[0], str):
            raise ApiError(
                400,
                f"a prompt of token ids needs a named expert (ids belong to one expert's tokenizer), "
                f"not {VIRTUAL_MODEL!r}; models: {', '.join(self.catalog.names)}",
                "model",
            )
        expert, alternatives = await self.choose(body.model, routing_text(body))
        try:  # the request keeps this version of the expert to its end (coe/catalog.py)
            key, tok = self.catalog.bind(expert)
        except KeyError:
            raise ApiError(404, f"model {expert!r} was just removed", "model") from None
        if tok is None:  # its tokenizer is damaged: the engine lists it as unavailable
            why = self.engine.broken.get(key, "its tokenizer cannot be loaded")
            raise ApiError(503, f"expert {expert!r} is unavailable: {why}", "model", {"Retry-After": "1"})
        if body.keep_alive is not None:
            try:
                self.engine.tiers.set_keep_alive(key, body.keep_alive)
            except ConfigError as e:
                raise ApiError(400, f"keep_alive: {e}", "keep_alive") from None
        alternatives = tuple(k for a in alternatives if (k := self.catalog.key(a)) is not None)
        prompts = await run_in_threadpool(self.encode, tok, body)
        grammar = await run_in_threadpool(self.constraint, tok, body)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        reqs = []
        for p, ids in enumerate(prompts):

            def emit(ev: Event, p: int = p) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (p, ev))

            params = sampling_params(body, tok, tok.context - len(ids))
            reqs.append(
                EngineRequest(key, ids, params, emit, tok.stream(body.stops()), grammar, alternatives)
            )
        self.submit(reqs, expert, endpoint)
        echo = None
        if not is_chat and body.echo:
            echo = [x if isinstance(x, str) else tok.decode_all(x) for x in body.prompts()]
        reply = Reply(
            metrics=self.metrics,
            endpoint=endpoint,
            expert=expert,
            tok=tok,
            reqs=reqs,
            queue=queue,
            n=body.n,
            tools=is_chat and body.tool_mode() != "none",
            echo=echo,
        )
        if not body.stream:
            return await reply.full(http)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            reply.chunks(include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def submit(self, reqs: list[EngineRequest], expert: str, endpoint: str) -> None:
        """Hand every prompt's request to the engine, or none: one refused cancels those before it."""
        for i, req in enumerate(reqs):
            try:
                self.engine.submit(req)
            except (QueueFull, ExpertUnavailable, ConfigError) as e:
                for done in reqs[:i]:
                    done.cancel()
                status, param, headers = (
                    (429, None, {"Retry-After": "1"})
                    if isinstance(e, QueueFull)
                    else (503, "model", None)
                    if isinstance(e, ExpertUnavailable)
                    else (400, None, None)
                )
                self.metrics.requests.labels(expert, endpoint, str(status)).inc()
                msg = f"{e}; retry shortly" if status == 429 else str(e)
                raise ApiError(status, msg, param, headers) from None


def routing_text(body: Any) -> str:
    """What the router reads: the last user message, or the first prompt (token ids: none)."""
    if isinstance(body, ChatRequest):
        return next((m.text() for m in reversed(body.messages) if m.role == "user"), body.messages[-1].text())
    first = body.prompts()[0]
    return first if isinstance(first, str) else ""


def check_prompt(tok: ExpertTokenizer, ids: list[int], field: str) -> None:
    if not ids:
        raise ApiError(400, "the prompt is empty", field)
    if len(ids) >= tok.context:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; expert {tok.name!r} takes at most {tok.context - 1} "
            f"(context {tok.context}, with room for one generated token)",
            field,
        )
    if max(ids) >= tok.vocab_size:
        raise ApiError(
            400, f"token id {max(ids)} is past expert {tok.name!r}'s vocabulary ({tok.vocab_size} ids)", field
        )


def sampling_params(body: Any, tok: ExpertTokenizer, room: int) -> SamplingParams:
    """The engine's sampling values for one prompt: the request's, else the expert's
    generation_config (vLLM's rule), else OpenAI's defaults."""
    d = tok.defaults

    def pick(name: str, fallback: float) -> float:
        v = getattr(body, name)
        return float(v) if v is not None else float(d.get(name, fallback))

    limit = body.limit()
    bias = body.bias()
    if bias and max(t for t, _ in bias) >= tok.vocab_size:
        bad = max(t for t, _ in bias)
        raise ApiError(
            400,
            f"logit_bias: token id {bad} is past the expert's vocabulary ({tok.vocab_size})",
            "logit_bias",
        )
    echo_k = body.logprobs_k() if isinstance(body, CompletionRequest) and body.echo else None
    return SamplingParams(
        max_tokens=min(limit, room) if limit is not None else room,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=max(int(pick("top_k", 0)), 0),
        min_p=pick("min_p", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=bias,
        seed=body.seed,
        logprobs=body.logprobs_k(),
        prompt_logprobs=echo_k,
        n=body.n,
        ignore_eos=body.ignore_eos,
    )
