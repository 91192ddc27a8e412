"""The only code that writes Server-Sent Events.

Frames are built here as bytes: every payload is orjson output, which cannot
contain CR or LF (control characters are escaped), so one ``data:`` line per
event is always correct framing, whatever the tokens hold. U+2028/U+2029 are
legal inside SSE data but break clients that split lines with
``str.splitlines()`` or evaluate the text as JavaScript, so they are sent
escaped (the JSON means the same).

``SSEResponse`` is sse-starlette's ``EventSourceResponse`` (its framing,
streaming loop, body cleanup on failure, send lock and timeouts), run leaner:

- sse-starlette starts four tasks per response in an anyio task group (the
  stream, pings, a shutdown listener, a disconnect listener). Here the stream
  runs in the request's own task; the client's disconnect cancels it (as the
  task group would), called back by the gateway's HTTP protocol
  (``ON_DISCONNECT``, set by ``app.server``) or, under another server, seen by
  one watcher task waiting on ``receive``; a timer sends the keep-alive pings
  (a task only while one is being sent); the send
  lock is asyncio's, which makes its waiter queue only when someone waits.
  Shutdown is the gateway's own (``app.shutdown``), so sse-starlette's
  listener is not started. This saves about a hundred µs of task and
  cancel-scope set-up per request and some 20 KiB per open stream; HEAD and
  WebSocket scopes still take sse-starlette's own path.
- a send without a timeout skips the cancel scope sse-starlette opens around
  every send, a few µs per relayed batch that buys nothing.

Nothing is queued on the way out: each piece of a body is sent in turn, and
uvicorn's send waits while the connection's write buffer is over its
high-water mark, so a client that stops reading stops its body iterator at
its next piece (``app.streams`` hands a reader that is behind bounded pieces).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import suppress
from contextvars import ContextVar
from typing import Any

import anyio
import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.types import Message, Receive, Scope, Send

from app.events import End, RelayEvent

DONE = b"data: [DONE]\n\n"
_LS, _PS = "\u2028".encode(), "\u2029".encode()


def dumps(obj: Any) -> bytes:
    out = orjson.dumps(obj)
    if b"\xe2\x80" in out:
        out = out.replace(_LS, b"\\u2028").replace(_PS, b"\\u2029")
    return out


# How a body tells the response iterating it that its last piece (the terminator) is
# out: the response sets a cell in its own task's context before iterating the body,
# which runs in that task. After it, not even a keep-alive ping is sent, though the
# body may still be busy (reading the upstream's tail, releasing its slot).
_ENDED: ContextVar[list[bool] | None] = ContextVar("sse_body_ended", default=None)


async def encoded(
    encode: Callable[[list[RelayEvent]], bytes],
    events: AsyncIterator[list[RelayEvent]],
    first: bytes = b"",
) -> AsyncIterator[bytes]:
    """A protocol's body: each batch of events as ``encode`` writes it (``first`` before
    them), one piece per batch, nothing for a batch that encodes to nothing. The batch
    that holds the ``End`` (the relay's last) ends the response's pings."""
    ended = _ENDED.get()
    if first:
        yield first
    async for batch in events:
        data = encode(batch)
        if data:
            yield data
        if ended is not None and isinstance(batch[-1], End):
            ended[0] = True


def retry_hint(base_ms: int = 3000) -> bytes:
    """A jittered ``retry:`` so that a crowd of clients does not reconnect in step."""
    return b"retry: %d\n" % random.randint(int(base_ms * 0.8), int(base_ms * 1.2))


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep="\n")


# The headers every SSE response carries, one tuple for all responses.
_SHARED = {
    h: h
    for h in [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        (b"connection", b"keep-alive"),
    ]
}

# A scope key set by the gateway's HTTP protocol (app.server): a DisconnectHook. It
# registers a callback for the client of that scope leaving before its response is
# complete, and returns what forgets it; or None when it cannot promise that.
ON_DISCONNECT = "gateway.on_disconnect"
DisconnectHook = Callable[[Scope, Callable[[], None]], Callable[[], None] | None]


def watch_disconnect(scope: Scope, receive: Receive, gone: Callable[[], None]) -> Callable[[], Any]:
    """Call ``gone`` if the client of ``scope`` leaves; returns what stops watching.

    The gateway's HTTP protocol calls back (``ON_DISCONNECT``); under another server
    one task waits on ``receive`` (after the body was read, the next message is the
    disconnect)."""
    hook: DisconnectHook | None = scope.get(ON_DISCONNECT)
    forget = hook(scope, gone) if hook is not None else None
    if forget is not None:
        return forget

    async def watch() -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server that ended the request; nothing left to watch
            return
        gone()

    return asyncio.get_running_loop().create_task(watch()).cancel


_PING_MESSAGE: Message = {"type": "http.response.body", "body": b": ping\n\n", "more_body": True}


class SSEResponse(EventSourceResponse):
    """sse-starlette's response, run leaner (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # asyncio's lock makes its waiter queue only when someone waits; anyio's makes it
        # up front: 2 KiB per open stream for a lock that pings alone contend for.
        self._send_lock = asyncio.Lock()  # type: ignore[assignment]
        # Held for the stream's life: the constant headers as one shared tuple each.
        self.raw_headers = [_SHARED.get(h, h) for h in self.raw_headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD" or self.data_sender_callable:
            await super().__call__(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._ended = [False]
        ended_token = _ENDED.set(self._ended)
        loop = asyncio.get_running_loop()
        stop_watching = watch_disconnect(scope, receive, self._client_left)
        self._pinging: asyncio.Task[None] | None = None  # held: a lone task may be collected
        self._timer = (
            loop.call_later(self._ping_interval, self._ping_due, send)
            if self._ping_interval > 0
            else None
        )
        try:
            await self._stream_response(send)
        except asyncio.CancelledError:
            # Ours alone (the client left): the body's cleanup ran; end normally.
            if not self._client_disconnected or task.uncancel():
                raise
        finally:
            self.active = False  # no ping after a body that failed
            stop_watching()
            _ENDED.reset(ended_token)
            if self._timer is not None:
                self._timer.cancel()
            if self._pinging is not None:
                self._pinging.cancel()
        if self.background is not None:
            await self.background()

    def _client_left(self) -> None:
        """The client went away: cancel the stream, as sse-starlette's task group would."""
        self._client_disconnected = True
        if self.active:
            self.active = False
            self._task.cancel()

    def _ping_due(self, send: Send) -> None:
        if not self.active or self._ended[0]:
            return
        self._timer = asyncio.get_running_loop().call_later(
            self._ping_interval, self._ping_due, send
        )
        if self._pinging is None or self._pinging.done():
            self._pinging = asyncio.get_running_loop().create_task(self._ping_once(send))

    async def _ping_once(self, send: Send) -> None:
        async with self._send_lock:
            if self.active and not self._ended[0]:
                # The client left (uvloop: RuntimeError on a closed transport); the
                # disconnect is seen where it is watched.
                with suppress(OSError, RuntimeError):
                    await self._send_with_timeout(send, _PING_MESSAGE)

    async def _listen_for_exit_signal_with_grace(self) -> None:
        # Shutdown is the gateway's own (app.shutdown): running streams get the
        # grace period and then an honest end, rather than sse-starlette's cut.
        await anyio.sleep_forever()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def sse_response(
    body: AsyncIterator[bytes],
    *,
    request_id: str,
    ping_interval: float,
    background: BackgroundTask | None = None,
    headers: Mapping[str, str] | None = None,
) -> SSEResponse:
    return SSEResponse(
        body,
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "X-Request-ID": request_id,
            **(headers or {}),
        },
        ping=ping_interval,
        ping_message_factory=_ping,
        sep="\n",
        background=background,
    )
