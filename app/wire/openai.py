"""Relay events -> OpenAI Chat Completions: ``chat.completion.chunk`` SSE, or one JSON.

The chunk envelope (id, created, model) is fixed for a stream, so it is
rendered once and each token costs one small ``orjson.dumps`` of its delta.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, assert_never

from app.errors import Cancelled, GatewayError
from app.events import End, Error, Parsed, Partial, RelayEvent, Start, TextDelta, ToolCallDelta
from app.wire.sse import DONE, dumps, encoded

# Finish reasons OpenAI clients know; the rest (cancelled, error, timeout) are
# failures and are reported as an in-band error instead.
OPENAI_FINISH = frozenset({"stop", "length", "tool_calls", "content_filter"})
_TAIL = b',"logprobs":null,"finish_reason":null}]}\n\n'


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage_json(end: End) -> dict[str, int]:
    prompt = end.input_tokens or 0
    completion = end.output_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _tool_delta(ev: ToolCallDelta) -> dict[str, Any]:
    call: dict[str, Any] = {"index": ev.index}
    if ev.id is not None:
        call["id"] = ev.id
        call["type"] = "function"
    fn: dict[str, Any] = {"arguments": ev.arguments}
    if ev.name is not None:
        fn["name"] = ev.name
    call["function"] = fn
    return {"tool_calls": [call]}


def _role_delta(batch: list[RelayEvent], start: Start) -> bytes:
    """The first chunk's delta: ``content`` null when the answer opens with a tool call, as
    OpenAI sends it (clients would show an empty text part otherwise)."""
    at = next(i for i, ev in enumerate(batch) if ev is start)
    if at + 1 < len(batch) and isinstance(batch[at + 1], ToolCallDelta):
        return b'{"role":"assistant","content":null}'
    return b'{"role":"assistant","content":""}'


class OpenAIStreamEncoder:
    def __init__(self, *, model: str, include_usage: bool) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.include_usage = include_usage
        self._errored = False
        self._set_model(model)

    def _set_model(self, model: str) -> None:
        self.model = model
        self._head = (
            b'data: {"id":"'
            + self.id.encode()
            + b'","object":"chat.completion.chunk","created":'
            + str(self.created).encode()
            + b',"model":'
            + dumps(model)
        )
        self._prefix = self._head + b',"choices":[{"index":0,"delta":'

    def encode(self, batch: list[RelayEvent]) -> bytes:
        out: list[bytes] = []
        prefix = self._prefix
        for ev in batch:
            if isinstance(ev, TextDelta):
                out.append(prefix + dumps({"content": ev.text}) + _TAIL)
            elif isinstance(ev, ToolCallDelta):
                out.append(prefix + dumps(_tool_delta(ev)) + _TAIL)
            elif isinstance(ev, Start):
                if ev.model and ev.model != self.model:
                    self._set_model(ev.model)
                    prefix = self._prefix
                if not ev.continuation:  # the seam of a continued answer: only the model changes
                    out.append(prefix + _role_delta(batch, ev) + _TAIL)
            elif isinstance(ev, Partial | Parsed):
                pass  # structured output is the JSON text itself here
            elif isinstance(ev, Error):
                self._errored = True
                out.append(b"data: " + dumps(error_json(ev.error)) + b"\n\n")
            elif isinstance(ev, End):
                out.append(self._end(ev))
            else:
                assert_never(ev)
        return b"".join(out)

    def _end(self, end: End) -> bytes:
        if end.model and end.model != self.model and end.provider:
            self._set_model(end.model)  # the usage chunk names who answered
        parts = []
        if end.finish_reason in OPENAI_FINISH:
            parts.append(
                self._prefix
                + b'{},"logprobs":null,"finish_reason":"'
                + end.finish_reason.encode()
                + b'"}]}\n\n'
            )
        elif end.finish_reason == "cancelled" and not self._errored:
            parts.append(_CANCELLED)
        if self.include_usage:
            parts.append(self._head + b',"choices":[],"usage":' + dumps(usage_json(end)) + b"}\n\n")
        parts.append(DONE)
        return b"".join(parts)

    def stream(self, events: AsyncIterator[list[RelayEvent]]) -> AsyncIterator[bytes]:
        return encoded(self.encode, events)


def error_json(exc: GatewayError) -> dict[str, Any]:
    err = exc.body()["error"]
    return {"error": {"message": err["message"], "type": err["type"], "code": err["code"]}}


# What an OpenAI client reads when a generation was stopped without an error.
_CANCELLED = (
    b"data: "
    + dumps(error_json(Cancelled("the generation was cancelled", code="cancelled")))
    + b"\n\n"
)


async def collect_completion(
    events: AsyncIterator[list[RelayEvent]], *, model: str
) -> dict[str, Any]:
    """A whole (non-streamed) ``chat.completion``; a failure is raised, never half-returned."""
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    end: End | None = None
    async for batch in events:
        for ev in batch:
            if isinstance(ev, TextDelta):
                text.append(ev.text)
            elif isinstance(ev, ToolCallDelta):
                call = calls.setdefault(
                    ev.index,
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if ev.id:
                    call["id"] = ev.id
                if ev.name:
                    call["function"]["name"] += ev.name
                call["function"]["arguments"] += ev.arguments
            elif isinstance(ev, Start):
                model = ev.model or model
            elif isinstance(ev, Error):
                raise ev.error
            elif isinstance(ev, End):
                end = ev
            elif isinstance(ev, Partial | Parsed):
                pass
    assert end is not None  # the relay always ends with End
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": end.model or model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": end.finish_reason}
        ],
        "usage": usage_json(end),
    }
