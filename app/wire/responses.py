"""Relay events -> OpenAI's Responses API: its streamed events, or one ``response`` object.

The stream is OpenAI's own (API.md, "Responses API and Messages API"): every
event is ``event: <type>`` plus ``data: {"type": <type>, ..., "sequence_number": n}``,
numbered from 0. ``response.created`` and ``response.in_progress`` come at once; then
each output item in turn, a message::

    response.output_item.added, response.content_part.added,
    response.output_text.delta ..., response.output_text.done,
    response.content_part.done, response.output_item.done

or a function call::

    response.output_item.added, response.function_call_arguments.delta ...,
    response.function_call_arguments.done, response.output_item.done

and exactly one terminal event: ``response.completed`` (finish ``stop`` or
``tool_calls``), ``response.incomplete`` (``length`` -> ``max_output_tokens``,
``content_filter``), or, for any failure (``error``, ``timeout``, ``cancelled``),
an ``error`` event followed by ``response.failed``. An item is closed when the
next one begins: providers deliver text, then tool calls one after another.

The ``error`` event carries the error flat (``code``, ``message``, ``param``: the
SDK's ``ResponseErrorEvent``, older AI SDKs) and nested under ``error`` as OpenAI
sends it; the nested form is what makes the official openai SDK raise
``APIError`` inside ``responses.stream()`` / ``responses.create(stream=True)``,
so that a failure never reads as a clean end. Items open at a failure are not
"done" (that would read as complete); ``response.failed`` lists them as
``incomplete``, with the usage as far as known.

Per token the encoder appends the text (the final object needs it) and does one
small ``dumps``; the rest of a delta's frame is rendered once per item.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, assert_never

from app.errors import Cancelled, GatewayError, UpstreamError
from app.events import End, Error, Parsed, Partial, RelayEvent, Start, TextDelta, ToolCallDelta
from app.wire.sse import dumps, encoded

ItemStatus = Literal["in_progress", "completed", "incomplete"]

# Finish reasons that end a response as incomplete, and the reason OpenAI gives.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
COMPLETE = frozenset({"stop", "tool_calls"})

# The request's settings a response object repeats (OpenAI echoes them); the route
# passes what the client sent, these fill the rest.
ECHO_DEFAULTS: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None},
    "store": False,  # stateless: nothing is kept, whatever the client asked
    "temperature": None,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": None,
    "truncation": "disabled",
    "user": None,
}


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


@dataclass(slots=True)
class TextItem:
    """An assistant message with one ``output_text`` part."""

    id: str
    index: int
    parts: list[str] = field(default_factory=list)
    status: ItemStatus = "in_progress"
    frame: bytes = b""  # a delta event up to its delta (ResponsesStreamEncoder)

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def json(self) -> dict[str, Any]:
        # While in progress its part is announced by ``response.content_part.added``.
        content = [] if self.status == "in_progress" else [self.part("".join(self.parts))]
        return {
            "id": self.id,
            "type": "message",
            "status": self.status,
            "content": content,
            "role": "assistant",
        }


@dataclass(slots=True)
class CallItem:
    """A ``function_call`` item; ``call_id`` is the provider's tool-call id."""

    id: str
    index: int
    call_id: str
    name: str
    args: list[str] = field(default_factory=list)
    status: ItemStatus = "in_progress"
    frame: bytes = b""

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function_call",
            "status": self.status,
            "arguments": "".join(self.args),
            "call_id": self.call_id,
            "name": self.name,
        }


Item = TextItem | CallItem


def _frame_head(kind: bytes, item: Item, extra: bytes) -> bytes:
    """A delta event of ``item`` up to the delta itself: rendered once per item."""
    return b'event: %s\ndata: {"type":"%s","item_id":"%s","output_index":%d%s,"delta":' % (
        kind,
        kind,
        item.id.encode(),
        item.index,
        extra,
    )


def usage_json(end: End) -> dict[str, Any]:
    prompt = end.input_tokens or 0
    output = end.output_tokens or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def error_parts(exc: GatewayError) -> tuple[str, dict[str, Any]]:
    """(the error's type, its ``code``/``message``/``param``); ``code`` is never null (AI SDK
    versions that validate the ``error`` event want a string)."""
    err = exc.body()["error"]
    return err["type"], {
        "code": err["code"] or err["type"],
        "message": err["message"],
        "param": err["param"],
    }


def failure_json(exc: GatewayError) -> dict[str, Any]:
    """A failed response's ``error``: ``code`` and ``message``, as OpenAI gives them."""
    fields = error_parts(exc)[1]
    return {"code": fields["code"], "message": fields["message"]}


@dataclass(slots=True)
class ResponseObject:
    """What a ``response`` object is made of, beside its output items."""

    model: str
    echo: Mapping[str, Any]
    id: str = field(default_factory=lambda: new_id("resp_"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def json(
        self,
        status: Literal["in_progress", "completed", "incomplete", "failed"],
        items: list[Item],
        end: End | None = None,
        *,
        error: GatewayError | None = None,
    ) -> dict[str, Any]:
        reason = INCOMPLETE.get(end.finish_reason) if end and status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": failure_json(error) if error is not None else None,
            "incomplete_details": {"reason": reason} if reason else None,
            "model": self.model,
            "output": [item.json() for item in items],
            "usage": usage_json(end) if end is not None else None,
            **ECHO_DEFAULTS,
            **self.echo,
        }


def ending_error(end: End) -> GatewayError:
    """The error reported for a failed end that came without an ``Error`` event (a
    cancelled generation; any other such end is a relay bug, and still never a success)."""
    if end.finish_reason == "cancelled":
        return Cancelled("the generation was cancelled", code="cancelled")
    return UpstreamError("the generation ended without an answer", code=end.finish_reason)


class ResponsesStreamEncoder:
    """Relay event batches -> Responses API SSE frames (see the module docstring)."""

    __slots__ = ("_calls", "_error", "_items", "_open", "obj", "seq")

    def __init__(self, *, model: str, echo: Mapping[str, Any]) -> None:
        self.obj = ResponseObject(model, echo)
        self.seq = 0
        self._items: list[Item] = []
        self._calls: dict[int, CallItem] = {}  # by ToolCallDelta.index
        self._open: Item | None = None
        self._error: GatewayError | None = None

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        seq = self.seq
        self.seq += 1
        head = b"event: " + kind.encode() + b'\ndata: {"type":"' + kind.encode() + b'",'
        return head + dumps(data)[1:-1] + b',"sequence_number":%d}\n\n' % seq

    def opening(self) -> bytes:
        """``response.created`` and ``response.in_progress``: sent before any upstream token."""
        response = self.obj.json("in_progress", [])
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def encode(self, batch: list[RelayEvent]) -> bytes:
        out: list[bytes] = []
        for ev in batch:
            if isinstance(ev, TextDelta):
                if ev.text:
                    out.append(self._text(ev.text))
            elif isinstance(ev, ToolCallDelta):
                out.append(self._call(ev))
            elif isinstance(ev, Start):
                if ev.model:  # also at a continuation's seam: from here on it answers
                    self.obj.model = ev.model
            elif isinstance(ev, Partial | Parsed):
                pass  # structured output is the JSON text itself here
            elif isinstance(ev, Error):
                self._error = ev.error
                out.append(self._error_event(ev.error))
            elif isinstance(ev, End):
                out.append(self._end(ev))
            else:
                assert_never(ev)
        return b"".join(out)

    def _text(self, text: str) -> bytes:
        item = self._open
        head = b""
        if not isinstance(item, TextItem):
            head = self._close("completed")
            item = TextItem(new_id("msg_"), len(self._items))
            item.frame = _frame_head(b"response.output_text.delta", item, b',"content_index":0')
            head += self._added(item) + self._event(
                "response.content_part.added",
                {
                    "item_id": item.id,
                    "output_index": item.index,
                    "content_index": 0,
                    "part": item.part(""),
                },
            )
        item.parts.append(text)
        seq = self.seq
        self.seq = seq + 1
        return head + item.frame + dumps(text) + b',"logprobs":[],"sequence_number":%d}\n\n' % seq

    def _call(self, ev: ToolCallDelta) -> bytes:
        call = self._calls.get(ev.index)
        head = b""
        if call is None:
            head = self._close("completed")
            call = CallItem(
                new_id("fc_"), len(self._items), ev.id or new_id("call_"), ev.name or ""
            )
            call.frame = _frame_head(b"response.function_call_arguments.delta", call, b"")
            self._calls[ev.index] = call
            head += self._added(call)
        elif ev.name:
            call.name += ev.name
        # A piece for a call already closed (a provider interleaving parallel calls,
        # which none does) still reaches the client and the final object.
        if not ev.arguments:
            return head
        call.args.append(ev.arguments)
        seq = self.seq
        self.seq = seq + 1
        return head + call.frame + dumps(ev.arguments) + b',"sequence_number":%d}\n\n' % seq

    def _added(self, item: Item) -> bytes:
        self._items.append(item)
        self._open = item
        return self._event(
            "response.output_item.added", {"output_index": item.index, "item": item.json()}
        )

    def _close(self, status: ItemStatus) -> bytes:
        """The "done" events of the open item, if any."""
        item = self._open
        if item is None:
            return b""
        self._open = None
        item.status = status
        where = {"item_id": item.id, "output_index": item.index}
        if isinstance(item, TextItem):
            text = "".join(item.parts)
            out = self._event(
                "response.output_text.done",
                {**where, "content_index": 0, "text": text, "logprobs": []},
            ) + self._event(
                "response.content_part.done",
                {**where, "content_index": 0, "part": item.part(text)},
            )
        else:
            out = self._event(
                "response.function_call_arguments.done", {**where, "arguments": "".join(item.args)}
            )
        return out + self._event(
            "response.output_item.done", {"output_index": item.index, "item": item.json()}
        )

    def _error_event(self, exc: GatewayError) -> bytes:
        kind, fields = error_parts(exc)
        return self._event("error", {**fields, "error": {"type": kind, **fields}})

    def _end(self, end: End) -> bytes:
        if end.model and end.provider:
            self.obj.model = end.model  # who answered, after any fallback
        reason = end.finish_reason
        if self._error is None and reason in COMPLETE:
            out = self._close("completed")
            return out + self._event(
                "response.completed", {"response": self.obj.json("completed", self._items, end)}
            )
        if self._error is None and reason in INCOMPLETE:
            out = self._close("incomplete")
            response = self.obj.json("incomplete", self._items, end)
            return out + self._event("response.incomplete", {"response": response})
        out = b""
        if self._error is None:
            self._error = ending_error(end)
            out = self._error_event(self._error)
        if self._open is not None:
            self._open.status = "incomplete"
            self._open = None
        response = self.obj.json("failed", self._items, end, error=self._error)
        return out + self._event("response.failed", {"response": response})

    def stream(self, events: AsyncIterator[list[RelayEvent]]) -> AsyncIterator[bytes]:
        return encoded(self.encode, events, self.opening())


async def collect_response(
    events: AsyncIterator[list[RelayEvent]], *, model: str, echo: Mapping[str, Any]
) -> dict[str, Any]:
    """A whole (non-streamed) ``response`` object; a failure is raised, never half-returned."""
    obj = ResponseObject(model, echo)
    items: list[Item] = []
    calls: dict[int, CallItem] = {}
    end: End | None = None
    async for batch in events:
        for ev in batch:
            if isinstance(ev, TextDelta):
                last = items[-1] if items else None
                if not isinstance(last, TextItem):
                    last = TextItem(new_id("msg_"), len(items))
                    items.append(last)
                last.parts.append(ev.text)
            elif isinstance(ev, ToolCallDelta):
                call = calls.get(ev.index)
                if call is None:
                    call = CallItem(new_id("fc_"), len(items), ev.id or new_id("call_"), "")
                    calls[ev.index] = call
                    items.append(call)
                call.name += ev.name or ""
                call.args.append(ev.arguments)
            elif isinstance(ev, Start):
                obj.model = ev.model or obj.model
            elif isinstance(ev, Error):
                raise ev.error
            elif isinstance(ev, End):
                end = ev
            elif isinstance(ev, Partial | Parsed):
                pass
            else:
                assert_never(ev)
    assert end is not None  # the relay always ends with End
    if end.model and end.provider:
        obj.model = end.model
    if end.finish_reason in COMPLETE:
        status: Literal["completed", "incomplete"] = "completed"
    elif end.finish_reason in INCOMPLETE:
        status = "incomplete"
    else:
        raise ending_error(end)
    for item in items:
        item.status = status
    return obj.json(status, items, end)
