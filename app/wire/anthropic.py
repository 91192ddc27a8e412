"""Relay events -> Anthropic's Messages API: its streamed events, one ``message``, its errors.

Streamed, exactly as Anthropic sends them (``event: <type>`` + ``data: {"type": <type>, ...}``)::

    message_start        the message with empty content, stop_reason null, usage so far
    content_block_start  a text block, or a tool_use block with input {}
    ping                 once, after the first block opens (as Anthropic does)
    content_block_delta  text_delta, or input_json_delta with the arguments' next piece
    content_block_stop   before the next block opens, and at the end
    message_delta        stop_reason (end_turn, max_tokens, tool_use, refusal) and usage
    message_stop

``message_start`` waits for the relay's first batch: until content arrives a
fallback may still take over, and the message names the model that answers.
Input tokens are often known only at the end, so ``message_start`` carries
what is known then (or 0) and ``message_delta.usage`` the real counts (the
SDKs' accumulators overwrite the start's values with them).

A failure, before or after the start, is Anthropic's ``event: error`` with
``{"type": "error", "error": {"type", "message"}}`` and nothing after it: no
``content_block_stop``, ``message_delta`` or ``message_stop``, so no client can
take a broken answer for a whole one (the SDKs raise on the error event).
A generation stopped without an error (``cancelled``) ends the same way.

Tool calls arrive as OpenAI-shaped deltas numbered by call; each becomes its
own ``tool_use`` block, numbered with the text blocks. Calls are relayed one
after another by every provider; a piece for a call whose block was already
closed cannot be placed, and ends the stream with an error rather than corrupt
the arguments.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, assert_never

import orjson

from app.errors import Cancelled, GatewayError, OutputInvalid, UpstreamError
from app.events import End, Error, Parsed, Partial, RelayEvent, Start, TextDelta, ToolCallDelta
from app.wire.sse import dumps, encoded

# The relay's finish reasons that are a whole answer; the others (cancelled,
# error, timeout) end with an error event instead.
STOP_REASONS: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}

# Anthropic's error types (anthropic.types.shared.ErrorType, plus 413's).
_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "timeout_error",
        "api_error",
        "overloaded_error",
    }
)
_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def error_type(exc: GatewayError) -> str:
    """The Anthropic error type for a gateway error: its own type when Anthropic has it
    (an Anthropic upstream's ``overloaded_error`` stays one), else by HTTP status."""
    own = exc.body()["error"]["type"]
    if own in _TYPES:
        return str(own)
    status = exc.http_status
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return "invalid_request_error" if 400 <= status < 499 else "api_error"


def error_json(exc: GatewayError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(exc), "message": exc.message}}


def error_body(exc: GatewayError) -> bytes:
    """Anthropic's error JSON for an error before the stream (main.py's handler, /v1/messages)."""
    return orjson.dumps(error_json(exc))


def _not_whole(end: End) -> GatewayError:
    """What to report for an ending that is not an answer and came without its error."""
    if end.finish_reason == "cancelled":
        return Cancelled("the generation was cancelled", code="cancelled")
    return UpstreamError(f"the generation ended with '{end.finish_reason}'", code="incomplete")


def _frame(kind: bytes, data: bytes) -> bytes:
    return b"event: " + kind + b"\ndata: " + data + b"\n\n"


_PING = _frame(b"ping", b'{"type":"ping"}')
_MESSAGE_STOP = _frame(b"message_stop", b'{"type":"message_stop"}')
_NO_BLOCK = -1
_TEXT = -1  # ``_call`` while the open block is text (calls are numbered from 0)


class MessagesStreamEncoder:
    """One streamed message. ``input_tokens`` says what is known of them at the start."""

    __slots__ = (
        "_block",
        "_call",
        "_calls",
        "_delta_prefix",
        "_input_tokens",
        "_next",
        "_over",
        "_pinged",
        "_started",
        "id",
        "model",
    )

    def __init__(self, *, model: str, input_tokens: Callable[[], int | None] | None = None) -> None:
        self.id = message_id()
        self.model = model
        self._input_tokens = input_tokens
        self._started = False
        self._over = False  # an error was sent, or the message stopped: nothing more
        self._block = _NO_BLOCK  # the open block's index
        self._next = 0  # the next block's index
        self._pinged = False
        self._call = _TEXT  # the tool call the open block carries
        self._calls: set[int] = set()  # tool calls that had a block
        # Everything of a content_block_delta frame before the piece itself.
        self._delta_prefix = b""

    def encode(self, batch: list[RelayEvent]) -> bytes:
        if self._over:
            return b""
        out: list[bytes] = []
        for ev in batch:
            if isinstance(ev, TextDelta):
                if self._call != _TEXT or self._block == _NO_BLOCK:
                    out.append(self._open_text())
                out.append(self._delta_prefix + dumps(ev.text) + b"}}\n\n")
            elif isinstance(ev, ToolCallDelta):
                out.append(self._tool(ev))
                if self._over:
                    break
            elif isinstance(ev, Start):
                if not self._started:
                    out.append(self._message_start(ev.model or self.model))
            elif isinstance(ev, Partial | Parsed):
                pass  # structured output is the JSON text itself here
            elif isinstance(ev, Error):
                out.append(self._error(ev.error))
                break
            elif isinstance(ev, End):
                out.append(self._end(ev))
                break
            else:
                assert_never(ev)
        return b"".join(out)

    def stream(self, events: AsyncIterator[list[RelayEvent]]) -> AsyncIterator[bytes]:
        return encoded(self.encode, events)

    def _message_start(self, model: str) -> bytes:
        self._started = True
        self.model = model
        known = self._input_tokens() if self._input_tokens is not None else None
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": known or 0, "output_tokens": 0},
        }
        return _frame(b"message_start", dumps({"type": "message_start", "message": message}))

    def _open(self, block: dict[str, Any], delta_type: bytes, field: bytes) -> bytes:
        """Close the open block, open ``block``; on the first, the start and the ping first."""
        out = b"" if self._started else self._message_start(self.model)
        out += self._close()
        index = self._block = self._next
        self._next = index + 1
        out += _frame(
            b"content_block_start",
            dumps({"type": "content_block_start", "index": index, "content_block": block}),
        )
        if not self._pinged:
            self._pinged = True
            out += _PING
        self._delta_prefix = (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
            b'"delta":{"type":"%s","%s":' % (index, delta_type, field)
        )
        return out

    def _open_text(self) -> bytes:
        self._call = _TEXT
        return self._open({"type": "text", "text": ""}, b"text_delta", b"text")

    def _close(self) -> bytes:
        if self._block == _NO_BLOCK:
            return b""
        index, self._block = self._block, _NO_BLOCK
        return _frame(b"content_block_stop", b'{"type":"content_block_stop","index":%d}' % index)

    def _tool(self, ev: ToolCallDelta) -> bytes:
        out = b""
        if ev.index != self._call or self._block == _NO_BLOCK:
            if ev.index in self._calls:
                # A piece for a call whose block is closed: it cannot be placed.
                return self._error(
                    UpstreamError(
                        "the provider interleaved the pieces of its tool calls",
                        code="tool_call_order",
                    )
                )
            self._calls.add(ev.index)
            self._call = ev.index
            block = {
                "type": "tool_use",
                "id": ev.id or "toolu_" + uuid.uuid4().hex,
                "name": ev.name or "",
                "input": {},
            }
            out = self._open(block, b"input_json_delta", b"partial_json")
        if ev.arguments:
            out += self._delta_prefix + dumps(ev.arguments) + b"}}\n\n"
        return out

    def _error(self, exc: GatewayError) -> bytes:
        self._over = True
        return _frame(b"error", dumps(error_json(exc)))

    def _end(self, end: End) -> bytes:
        reason = STOP_REASONS.get(end.finish_reason)
        if reason is None:
            return self._error(_not_whole(end))
        self._over = True
        out = b"" if self._started else self._message_start(end.model or self.model)
        out += self._close()
        usage: dict[str, int] = {"output_tokens": end.output_tokens or 0}
        if end.input_tokens is not None:
            usage = {"input_tokens": end.input_tokens, **usage}
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": None},
            "usage": usage,
        }
        return out + _frame(b"message_delta", dumps(delta)) + _MESSAGE_STOP


async def collect_message(events: AsyncIterator[list[RelayEvent]], *, model: str) -> dict[str, Any]:
    """A whole (non-streamed) ``message``; a failure is raised, never half-returned."""
    content: list[dict[str, Any]] = []
    text: list[str] | None = None  # the pieces of the last block, when it is text
    calls: dict[int, tuple[dict[str, Any], list[str]]] = {}
    end: End | None = None
    async for batch in events:
        for ev in batch:
            if isinstance(ev, TextDelta):
                if text is None:
                    text = []
                    content.append({"type": "text", "text": text})
                text.append(ev.text)
            elif isinstance(ev, ToolCallDelta):
                call = calls.get(ev.index)
                if call is None:
                    text = None
                    use: dict[str, Any] = {
                        "type": "tool_use",
                        "id": ev.id,
                        "name": ev.name or "",
                        "input": {},
                    }
                    call = calls[ev.index] = (use, [])
                    content.append(use)
                elif ev.name and not call[0]["name"]:
                    call[0]["name"] = ev.name
                if ev.id and not call[0]["id"]:
                    call[0]["id"] = ev.id
                call[1].append(ev.arguments)
            elif isinstance(ev, Start):
                model = ev.model or model
            elif isinstance(ev, Error):
                raise ev.error
            elif isinstance(ev, End):
                end = ev
            elif isinstance(ev, Partial | Parsed):
                pass
            else:
                assert_never(ev)
    assert end is not None  # the relay always ends with End
    reason = STOP_REASONS.get(end.finish_reason)
    if reason is None:
        raise _not_whole(end)
    for part in content:
        if part["type"] == "text":
            part["text"] = "".join(part["text"])
    for block, pieces in calls.values():
        block["id"] = block["id"] or "toolu_" + uuid.uuid4().hex
        arguments = "".join(pieces).strip() or "{}"
        try:
            block["input"] = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            block["input"] = None
        if not isinstance(block["input"], dict):
            raise OutputInvalid(
                f"the arguments of tool call '{block['name']}' are not a JSON object",
                code="invalid_tool_arguments",
            )
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": end.model or model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": {"input_tokens": end.input_tokens or 0, "output_tokens": end.output_tokens or 0},
    }
