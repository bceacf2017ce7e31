"""Constrained decoding, one owner: what a request's output must match (a JSON Schema, any JSON
object, or a tool call), compiled for one expert's tokenizer, and each row's mask of the ids that may
come next.

The grammar library is llguidance (ARCHITECTURE.md, "Constrained decoding", says why it and not
xgrammar): it builds token masks from a Hugging Face tokenizer on the CPU, lazily, with no
precomputation per grammar beyond parsing it. Compiled grammars are cached by (expert, grammar
hash); each constrained row of a batch gets its own matcher, a copy of the cached one. The engine
sees only `RowGrammar` (`engine.request`): a bool mask per step, the ids taken, and whether the
grammar is complete (then the row ends with `stop`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import torch

from wallbreak.coe.tokenization import ExpertTokenizer
from wallbreak.errors import ConfigError

CACHED_GRAMMARS = 256  # compiled grammars kept (least recently used leave first)
MAX_SCHEMA_BYTES = 64 << 10  # a schema's JSON text; past this it is refused before compiling
# Compact JSON: no whitespace between tokens, so a small model at temperature 1 cannot wander into
# runs of blanks (llguidance's flexible whitespace allows any amount).
COMPACT = {"whitespace_flexible": False}
_BITS = torch.arange(32, dtype=torch.int32)


class GrammarError(ConfigError):
    """A schema or grammar that cannot be compiled; `part` names where (a JSON path)."""

    def __init__(self, message: str, part: str = "") -> None:
        super().__init__(f"{part}: {message}" if part else message)
        self.part = part


class RowState:
    """One row's matcher (implements `engine.request.RowGrammar`)."""

    def __init__(self, matcher: Any, words: int) -> None:
        self.matcher = matcher
        self.bitmask = torch.full((1, words), -1, dtype=torch.int32)

    def allowed(self, vocab: int) -> torch.Tensor:
        # Straight into the bitmask's memory (what llguidance.torch does; importing that module
        # would load torch's compiler for a helper we do not use).
        row = self.bitmask[0]
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        bits = ((self.bitmask[0, :, None] >> _BITS) & 1).view(-1).bool()
        if bits.shape[0] >= vocab:
            return bits[:vocab]
        return torch.cat([bits, torch.zeros(vocab - bits.shape[0], dtype=torch.bool)])

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self.matcher.is_accepting())


@dataclass(frozen=True)
class Grammar:
    """A grammar compiled for one expert's tokenizer (implements `engine.request.Constraint`)."""

    matcher: Any  # the cached llguidance LLMatcher, never advanced itself
    words: int  # int32 words of its mask

    def start(self) -> RowState:
        return RowState(self.matcher.deep_copy(), self.words)


def check_schema(schema: Any, part: str) -> None:
    """A JSON Schema that is itself valid (its metaschema), or a GrammarError naming the bad part."""
    if not isinstance(schema, dict):
        raise GrammarError("a JSON Schema must be an object", part)
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the schema is over {MAX_SCHEMA_BYTES} bytes", part)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = ".".join(str(x) for x in e.absolute_path)
        raise GrammarError(e.message, f"{part}.{where}" if where else part) from None


def _compact(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**COMPACT, **schema.get("x-guidance", {})}}


# Where a JSON Schema keyword holds subschemas: one, a list of them, or a map of names to them.
_ONE = (
    "items",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "additionalItems",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OPEN = ("additionalProperties", "patternProperties", "unevaluatedProperties")


# JSON integers that survive every JSON parser exactly (RFC 7493, I-JSON): 16 digits at most.
SAFE_INTEGER = (1 << 53) - 1
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def for_decoding(schema: Any) -> Any:
    """`schema` as we decode it, a subset of what it allows:

    - every object that lists its properties and says nothing of others is closed to them
      (additionalProperties: false), as xgrammar's strict mode and llama.cpp's converter read such
      schemas. To the letter of JSON Schema a model may add keys until max_tokens (pydantic's
      schemas, which instructor and LangChain send, never say); a schema that wants extra keys
      says additionalProperties: true;
    - an integer with no bounds is bounded to +-(2**53 - 1), the range every JSON parser reads
      exactly (llama.cpp bounds digits likewise). Unbounded, a small model may write digits until
      max_tokens (SmolLM2 did, in 4 of 20 instructor calls)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k, v in schema.items():
        if k in _ONE:
            out[k] = for_decoding(v)
        elif k in _LIST and isinstance(v, list):
            out[k] = [for_decoding(x) for x in v]
        elif k in _MAP and isinstance(v, dict):
            out[k] = {name: for_decoding(x) for name, x in v.items()}
    if "properties" in out and not any(k in out for k in _OPEN):
        out["additionalProperties"] = False
    kinds = out.get("type")
    if (kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds)) and not any(
        k in out for k in _BOUNDS
    ):
        out["minimum"], out["maximum"] = -SAFE_INTEGER, SAFE_INTEGER
    return out


def _hoisted(functions: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each function's parameters with its $defs (or definitions) moved to the root of the call
    schema, renamed `function.name`, and its $refs rewritten: refs resolve from the document root,
    which the parameters no longer are."""
    params, defs = [], {}
    for f in functions:
        p = dict(f.get("parameters") or {"type": "object"})
        moved = {(key, name): sub for key in ("$defs", "definitions") for name, sub in p.pop(key, {}).items()}
        text = json.dumps([p, list(moved.values())])
        for key, name in moved:
            new = f"{f['name']}.{name}"
            text = text.replace(f'"#/{key}/{name}"', f'"#/$defs/{new}"')
            text = text.replace(f'"#/{key}/{name}/', f'"#/$defs/{new}/')
        p, subs = json.loads(text)
        params.append(p)
        defs.update({f"{f['name']}.{name}": sub for (_, name), sub in zip(moved, subs, strict=True)})
    return params, defs


def tool_call_schema(functions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON of one call to any of `functions` (OpenAI's `function` objects): its name, and
    arguments that match that function's parameters."""
    params, defs = _hoisted(functions)
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": for_decoding(p)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f, p in zip(functions, params, strict=True)
    ]
    out = options[0] if len(options) == 1 else {"anyOf": options}
    return out | ({"$defs": {name: for_decoding(d) for name, d in defs.items()}} if defs else {})


TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


def tool_lark(functions: Sequence[Mapping[str, Any]], *, required: bool, parallel: bool) -> str:
    """The Lark grammar of a tool-calling reply: one call (or several, `parallel`) written as
    <tool_call>{"name": ..., "arguments": {...}}</tool_call>, and with `required` false, plain text
    instead (text that does not start with '<')."""
    schema = json.dumps(_compact(tool_call_schema(functions)))
    lines = [f"call: {json.dumps(TOOL_OPEN)} %json {schema} {json.dumps(TOOL_CLOSE)}"]
    lines.append('calls: call ("\\n" call)*' if parallel else "calls: call")
    if required:
        lines.insert(0, "start: calls")
    else:
        lines.insert(0, "start: TEXT | calls")
        lines.append("TEXT: /[^<](.|\\n)*/")
    return "\n".join(lines)


class Grammars:
    """Compiles and caches grammars per expert tokenizer; thread-safe (handlers call it from
    worker threads)."""

    def __init__(self, max_cached: int = CACHED_GRAMMARS) -> None:
        self.max_cached = max_cached
        self._tokenizers: dict[str, Any] = {}
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses)

    def _lltokenizer(self, tok: ExpertTokenizer) -> Any:
        import llguidance.hf  # deferred: loads llguidance

        with self._lock:
            lt = self._tokenizers.get(tok.name)
        if lt is None:
            try:
                lt = llguidance.hf.from_tokenizer(tok.tokenizer, eos_token=sorted(tok.eos_ids))
            except Exception as e:  # a slow (non-Rust) tokenizer, say
                raise GrammarError(
                    f"expert {tok.name!r}'s tokenizer cannot drive constrained decoding ({e})"
                ) from None
            with self._lock:
                self._tokenizers[tok.name] = lt
        return lt

    def json_schema(self, tok: ExpertTokenizer, schema: Mapping[str, Any], part: str) -> Grammar:
        from llguidance import LLMatcher  # deferred: loads llguidance

        check_schema(schema, part)
        try:
            text = LLMatcher.grammar_from_json_schema(_compact(for_decoding(schema)))
        except ValueError as e:
            raise GrammarError(str(e), part) from None
        return self._compiled(tok, text, part)

    def tools(
        self, tok: ExpertTokenizer, functions: Sequence[Mapping[str, Any]], *, required: bool, parallel: bool
    ) -> Grammar:
        """The grammar of a reply that calls `functions` (`tool_lark`), each one's parameters
        checked first so an error names the function."""
        for f in functions:
            if f.get("parameters") is not None:
                check_schema(f["parameters"], f"tools.{f['name']}.parameters")
        return self.lark(tok, tool_lark(functions, required=required, parallel=parallel), "tools")

    def lark(self, tok: ExpertTokenizer, lark: str, part: str) -> Grammar:
        from llguidance import LLMatcher  # deferred: loads llguidance

        return self._compiled(tok, LLMatcher.grammar_from_lark(lark), part)

    def _compiled(self, tok: ExpertTokenizer, text: str, part: str) -> Grammar:
        from llguidance import LLMatcher  # deferred: loads llguidance

        key = (tok.name, hashlib.sha256(text.encode()).hexdigest())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        lt = self._lltokenizer(tok)
        matcher = LLMatcher(lt, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(" ".join(matcher.get_error().split())[:300], part)
        grammar = Grammar(matcher, (lt.vocab_size + 31) // 32)
        with self._lock:
            self._cache[key] = grammar
            self.compiled += 1
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return grammar
