"""Relay events -> WebSocket JSON frames (``/ws/chat``): the simple protocol's events as objects.

``{"type": "start"|"content"|"tool_call"|"error"|"end", ...}``; the fields are
the simple protocol's (API.md, "The simple stream").
"""

from __future__ import annotations

from typing import Any, assert_never

from app.errors import GatewayError
from app.events import End, Error, Parsed, Partial, RelayEvent, Start, TextDelta, ToolCallDelta
from app.wire.simple import end_json
from app.wire.sse import dumps


def frame(kind: str, **fields: Any) -> str:
    return dumps({"type": kind, **fields}).decode()


def error_frame(exc: GatewayError) -> str:
    """A refused frame or request: the in-band error with ``param``, the field at fault."""
    error = exc.in_band()["error"]
    error["param"] = exc.param
    return frame("error", error=error)


def frames(batch: list[RelayEvent], stream_id: str) -> list[str]:
    out: list[str] = []
    for ev in batch:
        if isinstance(ev, TextDelta):
            out.append(frame("content", content=ev.text))
        elif isinstance(ev, ToolCallDelta):
            call: dict[str, Any] = {"index": ev.index, "arguments": ev.arguments}
            if ev.id is not None:
                call["id"] = ev.id
            if ev.name is not None:
                call["name"] = ev.name
            out.append(frame("tool_call", **call))
        elif isinstance(ev, Start):
            if ev.continuation:
                continue  # one start per request; its end names who finished
            out.append(frame("start", id=stream_id, model=ev.model, provider=ev.provider))
        elif isinstance(ev, Partial):
            out.append(frame("partial", object=ev.value))
        elif isinstance(ev, Parsed):
            out.append(frame("object", object=ev.value))
        elif isinstance(ev, Error):
            out.append(frame("error", **ev.error.in_band()))
        elif isinstance(ev, End):
            out.append(frame("end", **end_json(ev)))
        else:
            assert_never(ev)
    return out
