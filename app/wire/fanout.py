"""Relay events of several generations -> one SSE stream (``POST /chat/fanout``).

The simple protocol's events, each also carrying ``index`` (the model's
position in the request's ``models``) and ``model`` (the name requested
there); ids are numbered across the whole response so that they stay in
order. ``end`` names the target that answered in ``answered_by``. One
``data: [DONE]`` comes after every model has ended.
"""

from __future__ import annotations

from typing import Any, assert_never

from app.events import End, Error, Parsed, Partial, RelayEvent, Start, TextDelta, ToolCallDelta
from app.wire.simple import end_json
from app.wire.sse import dumps, retry_hint


class FanoutEncoder:
    def __init__(self, stream_id: str, models: list[str]) -> None:
        self.stream_id = stream_id
        self._sid = stream_id.encode()
        self.models = models
        self.n = 0

    def _event(self, name: bytes | None, data: dict[str, Any]) -> bytes:
        n = self.n
        self.n = n + 1
        head = b"id: %s:%d\n" % (self._sid, n)
        if name is not None:
            head += b"event: " + name + b"\n"
        return head + b"data: " + dumps(data) + b"\n\n"

    def encode(self, index: int, batch: list[RelayEvent]) -> bytes:
        tag = {"index": index, "model": self.models[index]}
        out: list[bytes] = []
        for ev in batch:
            if isinstance(ev, TextDelta):
                out.append(self._event(None, {**tag, "content": ev.text}))
            elif isinstance(ev, ToolCallDelta):
                call: dict[str, Any] = {**tag, "tool_index": ev.index, "arguments": ev.arguments}
                if ev.id is not None:
                    call["id"] = ev.id
                if ev.name is not None:
                    call["name"] = ev.name
                out.append(self._event(b"tool_call", call))
            elif isinstance(ev, Start):
                if ev.continuation:
                    continue  # one start per model; its end names who finished
                data = {
                    **tag,
                    "id": self.stream_id,
                    "provider": ev.provider,
                    "answered_by": ev.model,
                }
                out.append(self._event(b"start", data))
            elif isinstance(ev, Partial):
                out.append(self._event(b"partial", {**tag, "object": ev.value}))
            elif isinstance(ev, Parsed):
                out.append(self._event(b"object", {**tag, "object": ev.value}))
            elif isinstance(ev, Error):
                out.append(self._event(b"error", {**tag, **ev.error.in_band()}))
            elif isinstance(ev, End):
                data = end_json(ev)
                data["answered_by"] = data.pop("model")
                out.append(self._event(b"end", {**tag, **data}))
            else:
                assert_never(ev)
        return b"".join(out)

    def first(self) -> bytes:
        return retry_hint()

    def done(self) -> bytes:
        n = self.n
        self.n = n + 1
        return b"id: %s:%d\ndata: [DONE]\n\n" % (self._sid, n)
