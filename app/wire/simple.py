"""Relay events -> the simple browser protocol (API.md, "The simple stream").

``start``, one default (unnamed) event per text delta so that
``EventSource.onmessage`` sees only text, ``tool_call``, ``error``, exactly
one ``end``, then ``data: [DONE]``. Every event, ``[DONE]`` included, has an
``id: <stream>:<n>`` so that a reconnect can say where it stopped.

``SimpleLog`` is this protocol as a resumable stream's log codec
(``app.streams.codec.LogCodec``): one SSE frame per log entry, ``[DONE]`` the
terminator. It is the only code that knows what those logged frames hold.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, assert_never

from app.errors import GatewayError
from app.events import (
    End,
    Error,
    FinishReason,
    Parsed,
    Partial,
    RelayEvent,
    Start,
    TextDelta,
    ToolCallDelta,
)
from app.wire.sse import DONE, dumps, encoded, retry_hint


def end_json(end: End) -> dict[str, Any]:
    return {
        "finish_reason": end.finish_reason,
        "usage": end.usage(),
        "model": end.model,
        "provider": end.provider,
        "ttft_ms": end.ttft_ms,
        "duration_ms": end.duration_ms,
        "attempts": [a.json() for a in end.attempts],
    }


def ending_frames(
    stream_id: str,
    n: int | None,
    error: GatewayError,
    reason: FinishReason = "error",
    *,
    model: str = "",
) -> list[bytes]:
    """``error``, ``end`` and ``[DONE]`` numbered from ``n`` (None: no id lines), for a stream
    whose log broke or whose owner is gone (usage is not known there); with ``start`` first
    when nothing was logged yet (``n`` = 0)."""
    enc = SimpleStreamEncoder(stream_id)
    enc.n = n or 0
    events: list[RelayEvent] = [Start(model=model)] if n == 0 else []
    events += [Error(error), End.before_start(reason, model, 0)]
    frames = enc.frames(events)
    if n is None:
        return [f.partition(b"\n")[2] for f in frames]
    return frames


class SimpleStreamEncoder:
    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self._sid = stream_id.encode()
        self.n = 0

    def _id(self) -> bytes:
        n = self.n
        self.n = n + 1
        return b"id: %s:%d\n" % (self._sid, n)

    def encode(self, batch: list[RelayEvent]) -> bytes:
        return b"".join(self.frames(batch))

    def frames(self, batch: list[RelayEvent]) -> list[bytes]:
        """One frame per event, in order (a replay log stores them one by one)."""
        out: list[bytes] = []
        for ev in batch:
            if isinstance(ev, TextDelta):
                out.append(self._id() + b"data: " + dumps({"content": ev.text}) + b"\n\n")
            elif isinstance(ev, ToolCallDelta):
                call = {"index": ev.index, "arguments": ev.arguments}
                if ev.id is not None:
                    call["id"] = ev.id
                if ev.name is not None:
                    call["name"] = ev.name
                out.append(self._id() + b"event: tool_call\ndata: " + dumps(call) + b"\n\n")
            elif isinstance(ev, Start):
                if ev.continuation:
                    continue  # one start per stream; the end names who finished
                data = {"id": self.stream_id, "model": ev.model, "provider": ev.provider}
                out.append(
                    retry_hint() + self._id() + b"event: start\ndata: " + dumps(data) + b"\n\n"
                )
            elif isinstance(ev, Partial):
                value = dumps({"object": ev.value})
                out.append(self._id() + b"event: partial\ndata: " + value + b"\n\n")
            elif isinstance(ev, Parsed):
                value = dumps({"object": ev.value})
                out.append(self._id() + b"event: object\ndata: " + value + b"\n\n")
            elif isinstance(ev, Error):
                payload = dumps(ev.error.in_band())
                out.append(self._id() + b"event: error\ndata: " + payload + b"\n\n")
            elif isinstance(ev, End):
                out.append(self._id() + b"event: end\ndata: " + dumps(end_json(ev)) + b"\n\n")
                out.append(self._id() + b"data: [DONE]\n\n")
            else:
                assert_never(ev)
        return out

    def stream(self, events: AsyncIterator[list[RelayEvent]]) -> AsyncIterator[bytes]:
        return encoded(self.encode, events)


class SimpleLog:
    """The simple protocol as a replay log's codec (``app.streams.codec.LogCodec``)."""

    __slots__ = ()

    def encoder(self, sid: str) -> SimpleStreamEncoder:
        return SimpleStreamEncoder(sid)

    def ending(
        self,
        sid: str,
        n: int,
        error: GatewayError,
        reason: FinishReason = "error",
        *,
        model: str = "",
    ) -> list[bytes]:
        return ending_frames(sid, n, error, reason, model=model)

    def opening(self, sid: str) -> bytes:
        # The stream's id at once: a reconnect while the first token is still
        # awaited resumes this stream rather than start another (an id field
        # with no data sets Last-Event-ID and dispatches nothing).
        return retry_hint() + b"id: %s\n\n" % sid.encode()

    def resuming(self) -> bytes:
        return retry_hint()  # a fresh jitter on every reconnect

    def broken(self, sid: str, last: int, tail: bytes, error: GatewayError) -> bytes:
        # Each with the last real event's id again: the log may yet hold real
        # events under the next numbers, and a resume must ask for them.
        again = b"id: %s\n" % (sid if last < 0 else f"{sid}:{last}").encode()
        if b"\nevent: end\n" in tail:
            # The end came already, its [DONE] not yet (a log read in pieces can
            # split them): one end only.
            return again + DONE
        return b"".join(again + f for f in ending_frames(sid, None, error))
