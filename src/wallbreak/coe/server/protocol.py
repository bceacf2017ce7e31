"""OpenAI request bodies (the subset we honour), validated with pydantic, and error bodies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wallbreak.coe.engine.request import SEED_RANGE

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 1024  # all stop strings together: the detokenizer holds back up to the longest
# Characters of prompt per token of an expert's context that a request may send before it is
# tokenized (a prompt longer than this could not fit; refusing it early keeps a 200 MB prompt from
# tying up a tokenizer thread). Real text runs 3-5 characters a token.
MAX_CHARS_PER_TOKEN = 32
# The shapes the validators below enforce, in the types too, so the OpenAPI schema states them.
StopList = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOPS)]
OnePrompt = Annotated[list[str], Field(min_length=1, max_length=1)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # Unknown parameters are ignored, as many OpenAI-compatible servers do, so clients that send
    # extra fields (user, logit_bias=None, ...) keep working.
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Annotated[str, Field(min_length=1)] | StopList | None = None
    seed: int | None = Field(
        default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="a signed 64-bit integer"
    )
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        # The count and emptiness are in the type (StopList); the total is not expressible there.
        items = [v] if isinstance(v, str) else (v or [])
        if sum(len(s) for s in items) > MAX_STOP_CHARS:
            raise ValueError(f"stop sequences may hold at most {MAX_STOP_CHARS} characters in all")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        """None: no log-probabilities; k: the chosen token's and the top k."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | OnePrompt
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def limit(self) -> int | None:
        return self.max_tokens


def _absent(*harmless: Any) -> Any:
    return lambda v: v is None or any(v == h for h in harmless)


# Features a client may send that we do not implement. Ignoring them would break the client later
# and far from the cause (a JSON parser fed free text, a tool call that never comes), so a request
# that *uses* one gets a 400 naming it; values that change nothing (tools: [], n: 1) pass.
_UNSUPPORTED_COMMON = {
    "logit_bias": _absent({}),
    "presence_penalty": _absent(0),
    "frequency_penalty": _absent(0),
}
UNSUPPORTED = {
    "chat": _UNSUPPORTED_COMMON
    | {
        "tools": _absent([]),
        "tool_choice": _absent("none"),
        "functions": _absent([]),
        "function_call": _absent("none"),
        "parallel_tool_calls": lambda v: True,  # means nothing without tools
        "response_format": _absent({"type": "text"}),
        "audio": _absent(),
        "modalities": _absent(["text"]),
        "prediction": _absent(),
        "web_search_options": _absent(),
    },
    "completions": _UNSUPPORTED_COMMON
    | {"echo": _absent(False), "suffix": _absent(""), "best_of": _absent(1)},
}


def unsupported_field(body: dict[str, Any], endpoint: str) -> str | None:
    """The first field of `body` that asks for a feature this server does not implement."""
    for name, harmless in UNSUPPORTED[endpoint].items():
        if name in body and not harmless(body[name]):
            return name
    return None


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: what every 4xx and 5xx of this server carries."""

    error: ErrorDetail


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


# -- answers, as the OpenAPI schema documents them (the handlers build these shapes as dicts) ------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut]
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


FinishReasonOut = Literal["stop", "length"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReasonOut
    logprobs: ChatLogprobs | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReasonOut
    logprobs: CompletionLogprobs | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
