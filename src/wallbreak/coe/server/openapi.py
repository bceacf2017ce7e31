"""The OpenAPI schema the server publishes at /openapi.json: every route's request body, answers and
OpenAI-style errors, so that a client generator or a fuzzer (schemathesis) can hold the server to it.

The completion handlers read and check their bodies themselves (size, content type, the fields we
refuse), so FastAPI does not see their models; the schema is completed here from the same pydantic
models (`protocol`), and `model` lists the names this server serves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from wallbreak.coe.server.protocol import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ErrorResponse,
    TokenizeRequest,
)

REF = "#/components/schemas/{model}"
ERROR = {"model": ErrorResponse}
# With stream: true, each server-sent event's data is one JSON chunk (chat.completion.chunk or
# text_completion), an OpenAI error object, or the closing [DONE].
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a JSON chunk, an error object, or [DONE]"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
SSE = {"text/event-stream": {"schema": SSE_EVENT}}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    why = {
        400: "a field is missing, malformed or not allowed; `param` names it",
        401: "missing or wrong API key (only when the server has one)",
        404: "no such model",
        413: "the body is over the server's --max-body",
        415: "the body is not application/json",
        429: "the queue is full; retry after Retry-After",
        499: "the client closed the connection first",
        503: "the expert cannot be served now; retry after Retry-After",
    }
    return {c: {**ERROR, "description": why[c]} for c in codes}


GENERATION_ERRORS = errors(400, 401, 404, 413, 415, 429, 499, 503)


def generation_responses(answer: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"model": answer, "content": SSE, "description": "the answer, or its events with stream"}
    } | (GENERATION_ERRORS)


CHAT_RESPONSES = generation_responses(ChatCompletion)
COMPLETION_RESPONSES = generation_responses(Completion)
# Each body, and which of the served names its `model` takes: completions (the experts and 'coe'),
# experts (their tokenizers), or embedding (the router's encoder).
BODIES: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/chat/completions": (ChatRequest, "completions"),
    "/v1/completions": (CompletionRequest, "completions"),
    "/tokenize": (TokenizeRequest, "experts"),
    "/detokenize": (DetokenizeRequest, "experts"),
    "/v1/embeddings": (EmbeddingRequest, "embedding"),
}


def install(app: FastAPI, names: Callable[[], dict[str, Sequence[str]]]) -> None:
    """Make `app.openapi()` the completed schema (built on first request, and again when the model
    names change). `names()`: the model names each kind of body takes (BODIES)."""
    built_for: list[Any] = [None]

    def schema() -> dict[str, Any]:
        now = {k: list(v) for k, v in names().items()}
        if app.openapi_schema is None or built_for[0] != now:
            built_for[0] = now
            names_now = now
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            comps = doc.setdefault("components", {}).setdefault("schemas", {})
            for path, (model, kind) in BODIES.items():
                body = model.model_json_schema(ref_template=REF)
                comps.update(body.pop("$defs", {}))
                body["properties"]["model"]["enum"] = names_now[kind] or ["none"]
                comps[model.__name__] = body
                doc["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
                }
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]
