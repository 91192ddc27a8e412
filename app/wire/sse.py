"""The only code that writes Server-Sent Events.

Frames are built here as bytes: every payload is orjson output, which cannot
contain CR or LF (control characters are escaped), so one ``data:`` line per
event is always correct framing, whatever the tokens hold. U+2028/U+2029 are
legal inside SSE data but break clients that split lines with
``str.splitlines()`` or evaluate the text as JavaScript, so they are sent
escaped (the JSON means the same).

``SSEResponse`` is sse-starlette's ``EventSourceResponse`` (disconnect
detection, keep-alive pings, shutdown handling) with one change: a send
without a timeout skips the cancel scope sse-starlette opens around every
send, a few µs per relayed batch that buys nothing.

Nothing is queued on the way out: each piece of a body is sent in turn, and
uvicorn's send waits while the connection's write buffer is over its
high-water mark, so a client that stops reading stops its body iterator at
its next piece (``app.streams`` hands a reader that is behind bounded pieces).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.types import Message, Send

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


class SSEResponse(EventSourceResponse):
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
