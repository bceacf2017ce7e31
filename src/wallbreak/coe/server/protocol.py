"""OpenAI request bodies (the subset we honour), validated with pydantic, and error bodies."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from wallbreak.coe.engine.request import MAX_CHOICES, SEED_RANGE

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 1024  # all stop strings together: the detokenizer holds back up to the longest
# Characters of prompt per token of an expert's context that a request may send before it is
# tokenized (a prompt longer than this could not fit; refusing it early keeps a 200 MB prompt from
# tying up a tokenizer thread). Real text runs 3-5 characters a token.
MAX_CHARS_PER_TOKEN = 32
# The shapes the validators below enforce, in the types too, so the OpenAPI schema states them.
StopList = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOPS)]
MAX_PROMPTS = 64  # prompts one completions request may batch
MAX_TOOLS = 128  # as OpenAI
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompts = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
IdPrompts = Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    name: FunctionName
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCallIn(BaseModel):
    """An assistant's earlier tool call, sent back in a later turn."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text` (none), `json_object` (any JSON object), or `json_schema` (JSON matching a schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object (name, schema)")
        return self


class FunctionDef(BaseModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_KEEP_ALIVE_S = 7 * 24 * 3600.0


def parse_duration(v: float | str) -> float:
    """Seconds from a number or a duration ('90', '30s', '5m', '1h'); -1 (or any negative) means
    always, returned as -1. ValueError names what is allowed."""
    if isinstance(v, bool):
        raise ValueError("give seconds, a duration such as '5m', or -1 for always")
    if isinstance(v, int | float):
        seconds = float(v)
    else:
        text = v.strip()
        if text.startswith("-") and text[1:].isdigit():
            return -1.0
        m = _DURATION.match(text)
        if m is None:
            raise ValueError(f"{v[:20]!r} is not a duration: give seconds, '30s', '5m', '1h' or -1 (always)")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds != seconds or seconds > MAX_KEEP_ALIVE_S:
        raise ValueError(f"at most {MAX_KEEP_ALIVE_S:g} seconds (a week); -1 keeps it always")
    return -1.0 if seconds < 0 else seconds


# An idle expert's residency: seconds, from a number or a duration; -1 always; None the policy's.
KeepAlive = Annotated[float | str | None, AfterValidator(lambda v: None if v is None else parse_duration(v))]


class _Common(BaseModel):
    # Unknown parameters are ignored, as many OpenAI-compatible servers do, so clients that send
    # extra fields (user, metadata, ...) keep working.
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    # Sampling fields left out (None) take the expert's generation_config, then OpenAI's defaults.
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="extension: -1 or 0 is off")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="extension")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, description="extension")
    ignore_eos: bool = Field(
        default=False,
        description="extension (vLLM's): the model's end token does not end the answer, so it runs to "
        "max_tokens or a stop string (load tests)",
    )
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias"
    )
    stop: Annotated[str, Field(min_length=1)] | StopList | None = None
    seed: int | None = Field(
        default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="a signed 64-bit integer"
    )
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    keep_alive: KeepAlive = Field(
        default=None,
        description="extension (Ollama's): how long the expert stays resident once idle: seconds, "
        "a duration such as '5m', or -1 for always",
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        # The count and emptiness are in the type (StopList); the total is not expressible there.
        items = [v] if isinstance(v, str) else (v or [])
        if sum(len(s) for s in items) > MAX_STOP_CHARS:
            raise ValueError(f"stop sequences may hold at most {MAX_STOP_CHARS} characters in all")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k in v or {}:
            if not k.isdigit() or len(k) > 9:
                raise ValueError(f"keys are token ids as strings of digits, got {k[:20]!r}")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(
                f"tool_choice names function {self.tool_choice.function.name!r}, which tools does not define"
            )
        if self.tool_choice in ("required",) and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if self.tool_mode() != "none" and self.response_format and self.response_format.type != "text":
            raise ValueError("use tools or response_format, not both in one request")
        return self

    def tool_mode(self) -> str:
        """none | auto | required | the named function's name."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        """None: no log-probabilities; k: the chosen token's and the top k."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | Prompts | TokenIds | IdPrompts
    max_tokens: int | None = Field(default=16, ge=0, description="0 only with echo")
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @model_validator(mode="after")
    def _zero_needs_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo: true")
        return self

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str] | list[list[int]]:
        """Each prompt, as text or as token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return p  # type: ignore[return-value]

    def limit(self) -> int | None:
        return self.max_tokens


def _absent(*harmless: Any) -> Any:
    return lambda v: v is None or any(v == h for h in harmless)


# Features a client may send that we do not implement. Ignoring them would break the client later
# and far from the cause (audio that never comes), so a request that *uses* one gets a 400 naming
# it; values that change nothing (functions: [], best_of: 1) pass.
UNSUPPORTED = {
    "chat": {
        "functions": _absent([]),
        "function_call": _absent("none"),
        "audio": _absent(),
        "modalities": _absent(["text"]),
        "prediction": _absent(),
        "web_search_options": _absent(),
    },
    "completions": {"suffix": _absent(""), "best_of": _absent(1)},
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


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


FinishReasonOut = Literal["stop", "length", "tool_calls"]


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
    token_logprobs: list[float | None]  # None: the first prompt token, with echo
    top_logprobs: list[dict[str, float] | None]
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


class ExpertState(BaseModel):
    """An expert's state on /v1/models (fields that are null are left out, as on every card)."""

    tier: Literal["disk", "host", "device"]
    loading: bool
    pinned: Literal["host", "device"] | None = None
    keep_alive_s: float | None = Field(default=None, description="idle seconds it stays resident; -1: always")
    loaded_at: int | None = Field(default=None, description="unix time it reached its tier")
    busy: bool = Field(description="it has running, paused or queued requests")
    bytes: int
    form: str = Field(description="float32, bfloat16, float16, int8 or int4")
    version: str = Field(description="the version serving the name (name@N after a replace)")
    unavailable: str | None = None
    replicas: dict[str, Literal["disk", "host", "device"]] | None = Field(
        default=None, description="with Ray replicas: the tier on each replica, by index"
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None  # an expert's context
    # The sampling values its generation_config sets, used when a request leaves them out.
    generation_defaults: dict[str, float] | None = None
    kind: Literal["embedding"] | None = None  # the router's encoder (/v1/embeddings)
    state: ExpertState | None = None  # where an expert's weights are now, and what holds them


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the expert's template."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(
        default=None, min_length=1, description="the expert; optional when there is one"
    )
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(
        default=None, min_length=1, description="the expert; optional when there is one"
    )
    tokens: list[Annotated[int, Field(ge=0)]]


MAX_EMBED_INPUTS = 2048  # as OpenAI
EmbedText = Annotated[str, Field(min_length=1)]
EmbedInputs = Annotated[list[EmbedText], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    input: EmbedText | EmbedInputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
