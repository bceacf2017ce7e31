"""Tool calling for experts whatever their chat template: the messages and tools as the template
takes them, and a reply's text turned back into OpenAI's `tool_calls`, whole or as stream deltas.

An expert whose template renders `tools` itself gets them through it, with earlier tool calls and
results in the template's own message forms. Elsewhere we render a short generic tool prompt (the
approach of llama.cpp's generic handler) in a system message, earlier calls as assistant text and
results as user turns. Either way the reply is decoded under `grammar.tool_lark`, so a call is
always `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` with arguments that match the
function's schema.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from wallbreak.coe.grammar import TOOL_CLOSE, TOOL_OPEN
from wallbreak.coe.server.protocol import ChatMessage, ChatRequest
from wallbreak.coe.tokenization import ExpertTokenizer

_DECODER = json.JSONDecoder()
CALL_HEAD = f'{TOOL_OPEN}{{"name":'


def tool_prompt(tools: Sequence[dict[str, Any]], mode: str, parallel: bool) -> str:
    """The generic tool prompt: the functions, and how a call is written."""
    lines = [
        "You can call these functions. To call one, write exactly:",
        f'{TOOL_OPEN}{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}{TOOL_CLOSE}',
    ]
    if parallel:
        lines.append("To call several, write one call per line.")
    if mode == "auto":
        lines.append("If no function is needed, answer in plain text instead.")
    elif mode not in ("required", "none"):
        lines.append(f"Call the function {mode}.")
    lines.append("Functions:")
    lines += [json.dumps(t["function"]) for t in tools]
    return "\n".join(lines)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _generic_call(m: ChatMessage) -> str:
    calls = [
        f"{TOOL_OPEN}{json.dumps({'name': c.function.name, 'arguments': _arguments(c.function.arguments)})}"
        f"{TOOL_CLOSE}"
        for c in m.tool_calls or []
    ]
    return "\n".join([m.text(), *calls] if m.text() else calls)


def _native(m: ChatMessage, role: str) -> dict[str, Any]:
    out: dict[str, Any] = {"role": role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None and role == "tool":
        out["name"] = m.name
    return out


def chat_messages(
    body: ChatRequest, tok: ExpertTokenizer
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages as `tok`'s template takes them, and the tools to hand the template (None when
    they are in our generic prompt, or there are none)."""
    mode = body.tool_mode()
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if mode != "none" else []
    native = tok.takes_tools
    msgs: list[dict[str, Any]] = []
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        if native:
            msgs.append(_native(m, role))
        elif role == "assistant" and m.tool_calls:
            msgs.append({"role": "assistant", "content": _generic_call(m)})
        elif role == "tool":  # a result: a user turn, merged with the results just before it
            text = f"<tool_response>\n{m.text()}\n</tool_response>"
            if msgs and msgs[-1].get("tool_result"):
                msgs[-1]["content"] += "\n" + text
            else:
                msgs.append({"role": "user", "content": text, "tool_result": True})
        else:
            msgs.append({"role": role, "content": m.text()})
    for m2 in msgs:
        m2.pop("tool_result", None)
    if tools and not native:
        prompt = tool_prompt(tools, mode, body.parallel_tool_calls)
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] = f"{msgs[0]['content']}\n\n{prompt}"
        else:
            msgs.insert(0, {"role": "system", "content": prompt})
    return msgs, (tools if tools and native else None)


def functions_for(body: ChatRequest) -> list[dict[str, Any]]:
    """The functions the reply's grammar allows: all, or the one tool_choice names."""
    mode = body.tool_mode()
    fns = [t.function.model_dump(exclude_none=True) for t in body.tools or []]
    return fns if mode in ("auto", "required") else [f for f in fns if f["name"] == mode]


class ToolStream:
    """One choice's text, as it arrives, turned into deltas: `{"content": ...}` for plain text, or
    `{"tool_calls": [...]}` as OpenAI streams them (a call's id, type and name first, then pieces
    of its arguments). The grammar guarantees the call format; JSON decoding finds where the
    arguments end (a '</tool_call>' inside a string argument is still an argument)."""

    def __init__(self) -> None:
        self.buf = ""
        self.mode: str | None = None  # None until the first character: "text" or "calls"
        self.pos = 0  # where unparsed call text starts
        self.in_args = False
        self.sent = 0  # characters of the current call's arguments already sent
        self.calls: list[dict[str, Any]] = []  # whole calls, in OpenAI's shape
        self.content = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buf += text
        if self.mode is None:
            if not self.buf:
                return []
            if not self.buf.startswith("<"):
                self.mode = "text"
            elif len(self.buf) < len(TOOL_OPEN) and TOOL_OPEN.startswith(self.buf):
                return []
            else:
                self.mode = "calls" if self.buf.startswith(TOOL_OPEN) else "text"
            if self.mode == "text":
                text = self.buf
        if self.mode == "text":
            self.content += text
            return [{"content": text}] if text else []
        return self._calls()

    def _calls(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            if not self.in_args:
                rest = self.buf[self.pos :].lstrip()
                if not rest.startswith(CALL_HEAD):
                    return out
                start = len(self.buf) - len(rest) + len(CALL_HEAD)
                try:
                    name, end = _DECODER.raw_decode(self.buf, start)
                except ValueError:
                    return out
                if not self.buf.startswith(',"arguments":', end):
                    return out
                call_id = f"call_{uuid.uuid4().hex[:24]}"
                self.calls.append(
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
                )
                head = {"index": len(self.calls) - 1, "id": call_id, "type": "function"}
                out.append({"tool_calls": [head | {"function": {"name": name, "arguments": ""}}]})
                self.pos, self.in_args, self.sent = end + len(',"arguments":'), True, 0
            try:
                _, end = _DECODER.raw_decode(self.buf, self.pos)
                done = self.buf.startswith("}" + TOOL_CLOSE, end)
            except ValueError:
                end, done = len(self.buf), False
            piece = self.buf[self.pos + self.sent : end]
            if piece:
                self.sent += len(piece)
                self.calls[-1]["function"]["arguments"] += piece
                out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]})
            if not done:
                return out
            self.pos, self.in_args = end + 1 + len(TOOL_CLOSE), False

    def message(self) -> dict[str, Any]:
        """The whole reply as an assistant message."""
        if self.calls:
            return {"role": "assistant", "content": None, "tool_calls": self.calls}
        return {"role": "assistant", "content": self.content if self.mode == "text" else self.buf}
