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
  runs in the request's own task and one watcher task waits for the client's
  disconnect (cancelling the stream, as the task group would) with the
  keep-alive ping as its timeout. Shutdown is the gateway's own
  (``app.shutdown``), so sse-starlette's listener is not started. This saves
  about a hundred µs of task and cancel-scope set-up per request; HEAD and
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
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.types import Message, Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
_LS, _PS = "\u2028".encode(), "\u2029".encode()


def dumps(obj: Any) -> bytes:
    out = orjson.dumps(obj)
    if b"\xe2\x80" in out:
        out = out.replace(_LS, b"\\u2028").replace(_PS, b"\\u2029")
    return out


def retry_hint(base_ms: int = 3000) -> bytes:
    """A jittered ``retry:`` so that a crowd of clients does not reconnect in step."""
    return b"retry: %d\n" % random.randint(int(base_ms * 0.8), int(base_ms * 1.2))


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep="\n")


_PING = b": ping\n\n"


class SSEResponse(EventSourceResponse):
    """sse-starlette's response, run leaner (see the module docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD" or self.data_sender_callable:
            await super().__call__(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, send, task))
        try:
            await self._stream_response(send)
        except asyncio.CancelledError:
            # Ours alone (the client left): the body's cleanup ran; end normally.
            if not self._client_disconnected or task.uncancel():
                raise
        finally:
            watcher.cancel()
        if self.background is not None:
            await self.background()

    async def _watch(self, receive: Receive, send: Send, task: asyncio.Task[Any]) -> None:
        """One task per response: the client's disconnect (which cancels the stream, as
        sse-starlette's task group would), and the keep-alive pings in between."""
        interval = self._ping_interval
        while True:
            if interval > 0:
                try:
                    async with asyncio.timeout(interval):
                        message = await receive()
                except TimeoutError:
                    async with self._send_lock:
                        if self.active:
                            await self._send_with_timeout(
                                send,
                                {"type": "http.response.body", "body": _PING, "more_body": True},
                            )
                    continue
            else:
                message = await receive()
            if message["type"] == "http.disconnect":
                self._client_disconnected = True
                if self.active:
                    self.active = False
                    task.cancel()
                return

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
