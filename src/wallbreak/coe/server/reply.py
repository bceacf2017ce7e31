"""One accepted request's answer, whole or as server-sent events, in OpenAI's shapes: its choices
(n per prompt, prompts in order), their text or tool calls, log-probabilities (the prompt's too,
with echo), finish reasons and usage."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from wallbreak.coe.engine import Event, TokenLogprob
from wallbreak.coe.engine import Request as EngineRequest
from wallbreak.coe.server.errors import ApiError
from wallbreak.coe.server.metrics import Metrics
from wallbreak.coe.server.protocol import error_body
from wallbreak.coe.server.tools import ToolStream
from wallbreak.coe.tokenization import ExpertTokenizer

DISCONNECT_POLL_S = 0.25  # how often a whole-answer request checks that its client is still there


def chat_logprobs(tok: ExpertTokenizer, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, lp: float) -> dict[str, Any]:
        text = tok.token_text(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = [entry(x.token, x.logprob) | {"top_logprobs": [entry(t, v) for t, v in x.top]} for x in lps]
    return {"content": content, "refusal": None}


def completion_logprobs(
    tok: ExpertTokenizer, lps: Sequence[TokenLogprob | None], tokens: Sequence[int], offset: int
) -> dict[str, Any]:
    """The legacy shape; an entry of None (the first prompt token, with echo) has no log-probability."""
    texts = [tok.token_text(t) for t in tokens]
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": texts,
        "token_logprobs": [None if x is None else x.logprob for x in lps],
        "top_logprobs": [None if x is None else {tok.token_text(t): v for t, v in x.top} for x in lps],
        "text_offset": offsets,
    }


@dataclass
class Choice:
    index: int
    echo: str = ""  # the prompt's text, with echo
    prompt_ids: Sequence[int] = ()
    parts: list[str] = field(default_factory=list)
    lps: list[TokenLogprob] = field(default_factory=list)
    prompt_lps: tuple[TokenLogprob | None, ...] | None = None
    finish: str | None = None
    tools: ToolStream | None = None
    offset: int = 0  # characters of text sent so far (completions' text_offset)


class Reply:
    """The answer to one request: `reqs` (one per prompt) with `n` choices each, whose events
    arrive on `queue` as (prompt index, event)."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        endpoint: str,
        expert: str,
        tok: ExpertTokenizer,
        reqs: Sequence[EngineRequest],
        queue: asyncio.Queue[tuple[int, Event]],
        n: int,
        tools: bool = False,
        echo: Sequence[str] | None = None,
    ) -> None:
        self.metrics, self.endpoint, self.is_chat = metrics, endpoint, endpoint == "chat"
        self.expert, self.tok, self.reqs, self.queue, self.n = expert, tok, list(reqs), queue, n
        self.rid = f"{'chatcmpl' if self.is_chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.want_logprobs = reqs[0].params.logprobs is not None
        self.choices = [
            Choice(
                p * n + i,
                echo=echo[p] if echo else "",
                prompt_ids=r.prompt_ids if echo else (),
                tools=ToolStream() if tools else None,
            )
            for p, r in enumerate(reqs)
            for i in range(n)
        ]
        self.ended = [0] * len(reqs)  # choices of each request that ended
        self.over = [False] * len(reqs)  # the request is over (all choices, an error, cancelled)

    # -- bookkeeping ----------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        p = sum(r.prompt_tokens for r in self.reqs)
        c = sum(r.completion_tokens for r in self.reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def account(self, status: int) -> None:
        self.metrics.requests.labels(self.expert, self.endpoint, str(status)).inc()
        self.metrics.tokens.labels(self.expert, "prompt").inc(sum(r.prompt_tokens for r in self.reqs))
        self.metrics.tokens.labels(self.expert, "completion").inc(sum(r.completion_tokens for r in self.reqs))

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancel()  # no-op when finished; frees the batch rows if the client went away

    async def next_event(self) -> tuple[Choice, Event] | None:
        """The next event and its choice; None once every request is over."""
        while not all(self.over):
            p, ev = await self.queue.get()
            if ev.prompt_logprobs is not None:  # the prompt's, for every choice of it
                for c in self.choices[p * self.n : (p + 1) * self.n]:
                    c.prompt_lps = ev.prompt_logprobs
            if ev.error or ev.finish_reason == "cancelled":
                self.over[p] = True
            elif ev.finish_reason:
                self.ended[p] += 1
                self.over[p] = self.ended[p] == self.n
            return self.choices[p * self.n + ev.index], ev
        return None

    def finish_reason(self, c: Choice) -> str | None:
        if c.finish == "stop" and c.tools is not None and c.tools.calls:
            return "tool_calls"
        return c.finish

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": obj,
            "created": int(time.time()),
            "model": self.expert,
            "choices": choices,
        }

    # -- whole answers --------------------------------------------------------------------------

    async def full(self, http: Request) -> JSONResponse:
        watch = asyncio.create_task(self._cancel_when_gone(http))
        cancelled = False
        try:
            while (got := await self.next_event()) is not None:
                c, ev = got
                if ev.error:
                    self.account(ev.status)
                    retry = {"Retry-After": "1"} if ev.status in (429, 503) else None
                    raise ApiError(ev.status, ev.error, headers=retry)
                cancelled = cancelled or ev.finish_reason == "cancelled"
                self._collect(c, ev)
        finally:
            watch.cancel()
            self.cancel()
        if cancelled:
            self.account(499)
            return JSONResponse(error_body(499, "the client closed the connection"), status_code=499)
        self.account(200)
        obj = "chat.completion" if self.is_chat else "text_completion"
        return JSONResponse(
            self.envelope(obj, [self._whole(c) for c in self.choices]) | {"usage": self.usage()}
        )

    def _collect(self, c: Choice, ev: Event) -> None:
        c.parts.append(ev.text)
        if c.tools is not None and ev.text:
            c.tools.feed(ev.text)
        c.lps.extend(ev.logprobs)
        if ev.finish_reason:
            c.finish = ev.finish_reason

    def _whole(self, c: Choice) -> dict[str, Any]:
        out: dict[str, Any] = {"index": c.index, "finish_reason": self.finish_reason(c)}
        text = "".join(c.parts)
        if self.is_chat:
            out["message"] = (
                c.tools.message() if c.tools is not None else {"role": "assistant", "content": text}
            )
            out["logprobs"] = chat_logprobs(self.tok, c.lps) if self.want_logprobs else None
            return out
        out["text"] = c.echo + text
        out["logprobs"] = None
        if self.want_logprobs:
            lps: list[TokenLogprob | None] = [*(c.prompt_lps or ()), *c.lps]
            ids = [*(c.prompt_ids if c.prompt_lps is not None else ()), *(x.token for x in c.lps)]
            out["logprobs"] = completion_logprobs(self.tok, lps, ids, 0)
        return out

    async def _cancel_when_gone(self, http: Request) -> None:
        """A whole-answer request whose client left is cancelled: the engine drops its rows at the
        next step (a stream notices by itself, when a write fails)."""
        while True:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if all(self.over):
                return
            if await http.is_disconnected():
                self.cancel()
                return

    # -- streams --------------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]]) -> str:
        return f"data: {json.dumps(self.envelope(self._chunk_obj(), choices))}\n\n"

    def _stream_logprobs(self, c: Choice, ev: Event) -> dict[str, Any] | None:
        if not self.want_logprobs or not (ev.logprobs or ev.prompt_logprobs):
            return None
        if self.is_chat:
            return chat_logprobs(self.tok, ev.logprobs)
        lps: list[TokenLogprob | None] = [*(ev.prompt_logprobs or ()), *ev.logprobs]
        ids = [*(c.prompt_ids if ev.prompt_logprobs is not None else ()), *(x.token for x in ev.logprobs)]
        out = completion_logprobs(self.tok, lps, ids, c.offset)
        c.offset = out["text_offset"][-1] + len(out["tokens"][-1]) if ids else c.offset
        return out

    def _stream_choices(self, c: Choice, ev: Event) -> list[dict[str, Any]]:
        """The chunk entries one event makes for its choice."""
        if ev.finish_reason:
            c.finish = ev.finish_reason
        lp = self._stream_logprobs(c, ev)
        finish = self.finish_reason(c) if ev.finish_reason else None
        if not self.is_chat:
            text = (c.echo if ev.prompt_logprobs is not None or (c.echo and not c.parts) else "") + ev.text
            c.parts.append(ev.text)
            if not (text or lp or finish):
                return []
            return [{"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}]
        if c.tools is not None:
            deltas = c.tools.feed(ev.text) if ev.text else []
        else:
            deltas = [{"content": ev.text}] if ev.text else []
        if (lp or finish) and not deltas:
            deltas = [{}]
        out: list[dict[str, Any]] = [
            {"index": c.index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas
        ]
        if out:
            out[0]["logprobs"], out[-1]["finish_reason"] = lp, finish
        return out

    async def chunks(self, include_usage: bool) -> AsyncIterator[str]:
        status = 200
        cancelled = False
        try:
            if self.is_chat:
                roles = [
                    {"index": c.index, "delta": {"role": "assistant", "content": ""}} for c in self.choices
                ]
                yield self._chunk([r | {"logprobs": None, "finish_reason": None} for r in roles])
            while (got := await self.next_event()) is not None:
                c, ev = got
                if ev.error:
                    status = ev.status
                    yield f"data: {json.dumps(error_body(ev.status, ev.error))}\n\n"
                    break
                if ev.finish_reason == "cancelled":
                    cancelled = True
                    break
                for entry in self._stream_choices(c, ev):
                    yield self._chunk([entry])
            if include_usage and status == 200:
                usage = self.envelope(self._chunk_obj(), []) | {"usage": self.usage()}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # a client that left mid-stream frees its places in the batch
            self.account(
                499 if cancelled or any(r.finish_reason == "cancelled" for r in self.reqs) else status
            )

    def _chunk_obj(self) -> str:
        return "chat.completion.chunk" if self.is_chat else "text_completion"
