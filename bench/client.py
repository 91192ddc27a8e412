"""An efficient SSE load client: a raw asyncio Protocol (run it on uvloop).

It sends a streaming chat request, decodes the HTTP/1.1 response (chunked,
Content-Length or read-to-close), splits the body into SSE events on blank
lines and, per event: counts ``data:`` events, counts the ``"tok "`` content
tokens (the first one stamps TTFT), notes the end of the stream and keeps the
first error event. Comments (pings) are ignored. Connections are keep-alive, so
one connection can run many requests in sequence.

The protocols (``request(..., protocol=...)``, named as in ``REQUESTS``):

- ``openai`` (``chat_request``: ``POST /v1/chat/completions``): ``data:`` chunks, an
  in-band ``data: {"error": ...}`` on failure, ``data: [DONE]`` at the end.
- ``responses`` (``responses_request``: ``POST /v1/responses``, OpenAI's Responses
  API) and ``messages`` (``messages_request``: ``POST /v1/messages``, Anthropic's
  Messages API): named events (``event: <type>``). Tokens are counted in the
  delta events only (``response.output_text.delta`` / ``content_block_delta``;
  the closing events repeat the whole text); the stream is complete at its
  terminal event (``response.completed`` / ``message_stop``) with no error event
  before it (``error``, ``response.failed``, ``response.incomplete``); an event
  after the terminal one is an error (``protocol: ...``).
- the simple protocol (``simple_post_request``: ``POST /chat/stream`` with a
  JSON body; ``simple_get_request``: ``GET /chat/stream?prompt=...&model=...``,
  the EventSource route): ``event: start``, one default event
  ``data: {"content": ...}`` per text delta, ``event: error`` on failure, then
  exactly one ``event: end`` and ``data: [DONE]``. The stream is complete only
  when ``[DONE]`` comes right after an ``end`` whose ``finish_reason`` is
  ``stop`` or ``length``; anything else is an error (``protocol: ...``).

Also runnable on its own for a quick look::

    python -m bench.client --url http://127.0.0.1:8000 --model bench/bench-10-0 -c 10 -n 100
    python -m bench.client --protocol simple-get --model bench/bench-10-0 -c 10 -n 100
    python -m bench.client --protocol responses --model bench/bench-10-0 -c 10 -n 100
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
import uvloop

from bench.common import API_KEY, TOKEN, raise_nofile, summarize

perf = time.perf_counter
_ERROR_KEEP = 600


@dataclass(slots=True)
class StreamResult:
    t0: float = 0.0  # perf_counter when the request started (connect or send)
    sent: float = 0.0  # perf_counter when the request was written
    ttft: float | None = None  # seconds from t0 to the first content token
    elapsed: float | None = None  # seconds from t0 to the end of the response
    status: int = 0
    events: int = 0  # data: events
    tokens: int = 0  # "tok " content tokens seen
    done: bool = False  # saw the end: [DONE] (simple: right after a good end), or terminal event
    error: str | None = None  # first error event / HTTP error / transport / protocol problem
    ended: bool = False  # simple protocol: saw event: end
    finish_reason: str | None = None  # simple protocol: the end's finish_reason
    body: bytearray = field(default_factory=bytearray)  # non-SSE body (errors), capped

    def ok(self, tokens: int) -> bool:
        return self.status == 200 and self.done and self.error is None and self.tokens == tokens

    def failure(self, tokens: int) -> str | None:
        """A short reason why this stream is not a complete, correct one."""
        if self.ok(tokens):
            return None
        if self.status and self.status != 200:
            return f"HTTP {self.status}"
        if self.error is not None:
            if self.error.startswith(("transport", "protocol")):
                return self.error.split(":", 1)[0]
            return "error"
        if not self.done:
            return "no [DONE]"
        return f"tokens {self.tokens}/{tokens}"


class SSEClientProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection; ``request()`` runs one streaming request on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self.res: StreamResult | None = None
        self.waiter: asyncio.Future[StreamResult] | None = None
        # How the body is read: OPENAI (inline below), SIMPLE, or a Dialect's events.
        self.dialect: Dialect | None = None
        self.simple = False
        self._reset()

    def _reset(self) -> None:
        self.state = 0  # 0 head, 1 chunked, 2 content-length, 3 until close, 4 done
        self.head = b""
        self.raw = b""  # undecoded chunked bytes
        self.need = 0  # chunked: >0 bytes left in chunk, 0 size line, -1 CRLF, -2 final CRLF
        self.left = 0  # content-length bytes left
        self.sse = False
        self.sep: bytes | None = None
        self.sse_buf = b""

    # asyncio callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.state == 3:
            self._end()
        elif self.waiter is not None and not self.waiter.done():
            res = self.res
            if res is not None and res.error is None:
                res.error = f"transport: connection closed mid-response ({exc or 'EOF'})"
            self._end()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == 1:
            self._chunked(data)
        elif state == 0:
            self._head(data)
        elif state == 2:
            n = len(data)
            if n >= self.left:
                data = data[: self.left]
                self.left = 0
                self._body(data)
                self._end()
            else:
                self.left -= n
                self._body(data)
        elif state == 3:
            self._body(data)
        # state 4: bytes after the response (none expected)

    # request -----------------------------------------------------------------------------------

    def request(
        self, payload: bytes, res: StreamResult, protocol: str = "openai"
    ) -> asyncio.Future[StreamResult]:
        """Send ``payload``; the future is the result once the response is over.

        ``protocol``: how to read the response, a key of ``REQUESTS``.
        """
        if self.closed or self.transport is None:
            raise ConnectionError("connection is closed")
        if protocol not in REQUESTS:
            raise ValueError(f"unknown protocol {protocol!r}")
        self._reset()
        self.simple = protocol in SIMPLE
        self.dialect = DIALECTS.get(protocol)
        self.res = res
        self.waiter = self.loop.create_future()
        if not res.t0:
            res.t0 = perf()
        self.transport.write(payload)
        res.sent = perf()
        return self.waiter

    # parsing -----------------------------------------------------------------------------------

    def _head(self, data: bytes) -> None:
        buf = self.head + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.head = buf
            return
        self.head = b""
        res = self.res
        assert res is not None
        lines = buf[:end].split(b"\r\n")
        try:
            res.status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            res.error = f"transport: bad status line {lines[0][:100]!r}"
            res.status = 0
        chunked = False
        length = -1
        self.keep_alive = True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                self.keep_alive = value.strip().lower() != b"close"
            elif name == b"content-type":
                self.sse = b"text/event-stream" in value.lower()
        rest = buf[end + 4 :]
        if chunked:
            self.state = 1
            if rest:
                self._chunked(rest)
        elif length >= 0:
            self.state = 2
            self.left = length
            if length == 0:
                self._end()
            elif rest:
                self.data_received(rest)
        else:
            self.state = 3
            self.keep_alive = False
            if rest:
                self._body(rest)

    def _chunked(self, data: bytes) -> None:
        buf = self.raw + data if self.raw else data
        self.raw = b""
        pos = 0
        n = len(buf)
        out = []
        finished = False
        while pos < n:
            need = self.need
            if need > 0:
                end = pos + need
                if end <= n:
                    out.append(buf[pos:end])
                    pos = end
                    self.need = -1
                else:
                    out.append(buf[pos:])
                    self.need = need - (n - pos)
                    pos = n
            elif need == 0:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                self.need = size if size else -2
            elif need == -1:
                if n - pos < 2:
                    break
                pos += 2
                self.need = 0
            else:  # -2: after the last chunk: trailer lines, then an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                finished = eol == pos
                pos = eol + 2
                if finished:
                    break
        if pos < n and not finished:
            self.raw = buf[pos:]
        if out:
            self._body(out[0] if len(out) == 1 else b"".join(out))
        if finished:
            self._end()

    def _body(self, data: bytes) -> None:
        res = self.res
        assert res is not None
        if not (self.sse and res.status == 200):
            if len(res.body) < _ERROR_KEEP:
                res.body += data[: _ERROR_KEEP - len(res.body)]
            return
        buf = self.sse_buf + data if self.sse_buf else data
        sep = self.sep
        if sep is None:
            i = buf.find(b"\n")
            if i < 0:
                self.sse_buf = buf
                return
            sep = self.sep = b"\r\n\r\n" if i > 0 and buf[i - 1] == 13 else b"\n\n"
        if sep not in buf:
            self.sse_buf = buf
            return
        parts = buf.split(sep)
        self.sse_buf = parts.pop()
        if self.simple:
            for part in parts:
                simple_event(res, part)
            return
        dialect = self.dialect
        if dialect is not None:
            for part in parts:
                dialect_event(res, part, dialect)
            return
        for part in parts:
            if b"data:" not in part:
                continue  # comment / ping / event without data
            res.events += 1
            if TOKEN in part:
                if res.ttft is None:
                    res.ttft = perf() - res.t0
                res.tokens += part.count(TOKEN)
            elif b"[DONE]" in part:
                res.done = True
            elif b"error" in part and res.error is None:
                res.error = part[:_ERROR_KEEP].decode("utf-8", "replace")

    def _end(self) -> None:
        self.state = 4
        res = self.res
        waiter = self.waiter
        if res is not None:
            res.elapsed = perf() - res.t0
            if res.status != 200 and res.error is None:
                res.error = f"HTTP {res.status}: {bytes(res.body).decode('utf-8', 'replace')}"
            elif res.status == 200 and not self.sse and res.error is None:
                res.error = "not text/event-stream: " + bytes(res.body).decode("utf-8", "replace")
        if not self.keep_alive and self.transport is not None:
            self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(res)  # type: ignore[arg-type]

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _fields(part: bytes) -> tuple[bytes, bytes | None]:
    """One SSE event's name and data (``None``: no data line: a comment, ping or retry
    hint alone, not an event). ``part``: its lines, no blank line."""
    name = b""
    data: bytes | None = None
    for line in part.splitlines():
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data = value if data is None else data + b"\n" + value
        elif field == b"event":
            name = value
        # id:, retry:, comments (":ping") and unknown fields: nothing to count
    return name, data


@dataclass(frozen=True, slots=True)
class Dialect:
    """A protocol of named events: which event carries tokens, which ends the stream,
    which are failures."""

    delta: bytes
    terminal: bytes
    errors: frozenset[bytes]


DIALECTS = {
    "responses": Dialect(
        b"response.output_text.delta",
        b"response.completed",
        frozenset({b"error", b"response.failed", b"response.incomplete"}),
    ),
    "messages": Dialect(b"content_block_delta", b"message_stop", frozenset({b"error"})),
}
SIMPLE = frozenset({"simple-post", "simple-get"})


def dialect_event(res: StreamResult, part: bytes, dialect: Dialect) -> None:
    """Count one SSE event of the Responses or Messages API."""
    name, payload = _fields(part)
    if payload is None:
        return
    res.events += 1
    if res.done:
        if res.error is None:
            res.error = "protocol: event after the terminal event: " + _text(part)
        return
    if name == dialect.delta:
        if TOKEN in payload:
            if res.ttft is None:
                res.ttft = perf() - res.t0
            res.tokens += payload.count(TOKEN)
    elif name == dialect.terminal:
        res.done = True
    elif name in dialect.errors:
        res.error = res.error or _text(part)
    # created, item added, ping, ...: counted as an event, nothing more


def simple_event(res: StreamResult, part: bytes) -> None:
    """Count one SSE event of the simple protocol (``part``: its lines, no blank line)."""
    name, payload = _fields(part)
    if payload is None:
        return  # a comment / ping / retry hint alone: not an event
    res.events += 1
    if res.done:
        if res.error is None:
            res.error = "protocol: event after [DONE]: " + _text(part)
        return
    if not name or name == b"message":
        if payload == b"[DONE]":
            if res.ended:
                res.done = res.finish_reason in ("stop", "length")
                if not res.done and res.error is None:
                    res.error = f"protocol: the stream ended with finish_reason {res.finish_reason}"
            elif res.error is None:
                res.error = "protocol: [DONE] without an end event before it"
            return
        if res.ended:
            if res.error is None:
                res.error = "protocol: content after the end event: " + _text(part)
            return
        if TOKEN in payload:
            if res.ttft is None:
                res.ttft = perf() - res.t0
            res.tokens += payload.count(TOKEN)
    elif name == b"end":
        if res.ended:
            if res.error is None:
                res.error = "protocol: a second end event"
            return
        res.ended = True
        try:
            reason = orjson.loads(payload).get("finish_reason")
        except (orjson.JSONDecodeError, AttributeError):
            reason = None
        res.finish_reason = reason if isinstance(reason, str) else repr(reason)
    elif name == b"error":
        res.error = res.error or _text(part)
    # start, tool_call, anything else: counted as an event, nothing more


def _text(part: bytes) -> str:
    return part[:_ERROR_KEEP].decode("utf-8", "replace")


def _post_json(path: bytes, host: str, port: int, body: bytes, api_key: str) -> bytes:
    """A POST of a JSON body that asks for an event stream."""
    return (
        b"POST %s HTTP/1.1\r\n"
        b"Host: %s:%d\r\n"
        b"Content-Type: application/json\r\n"
        b"Accept: text/event-stream\r\n"
        b"Authorization: Bearer %s\r\n"
        b"Content-Length: %d\r\n"
        b"\r\n%s" % (path, host.encode(), port, api_key.encode(), len(body), body)
    )


def chat_request(host: str, port: int, model: str, api_key: str = API_KEY) -> bytes:
    """The bytes of one streaming chat request (built once, sent many times)."""
    body = orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    return _post_json(b"/v1/chat/completions", host, port, body, api_key)


def simple_post_request(
    host: str, port: int, model: str, prompt: str = "hi", api_key: str = API_KEY
) -> bytes:
    """``POST /chat/stream`` with the simple protocol's JSON body."""
    body = orjson.dumps({"prompt": prompt, "model": model})
    return _post_json(b"/chat/stream", host, port, body, api_key)


def simple_get_request(
    host: str, port: int, model: str, prompt: str = "hi", api_key: str = API_KEY
) -> bytes:
    """``GET /chat/stream?prompt=...&model=...``, the EventSource route (a resumable stream)."""
    query = urlencode({"prompt": prompt, "model": model})
    return (
        b"GET /chat/stream?%s HTTP/1.1\r\n"
        b"Host: %s:%d\r\n"
        b"Accept: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Authorization: Bearer %s\r\n"
        b"\r\n" % (query.encode(), host.encode(), port, api_key.encode())
    )


def responses_request(
    host: str, port: int, model: str, prompt: str = "hi", api_key: str = API_KEY
) -> bytes:
    """``POST /v1/responses`` (OpenAI's Responses API), streamed."""
    body = orjson.dumps({"model": model, "input": prompt, "stream": True})
    return _post_json(b"/v1/responses", host, port, body, api_key)


def messages_request(
    host: str, port: int, model: str, prompt: str = "hi", api_key: str = API_KEY
) -> bytes:
    """``POST /v1/messages`` (Anthropic's Messages API), streamed; Bearer auth."""
    body = orjson.dumps(
        {
            "model": model,
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
        }
    )
    return _post_json(b"/v1/messages", host, port, body, api_key)


# The request builders by protocol name: (host, port, model, [prompt,] api_key=...) -> bytes.
REQUESTS: dict[str, Callable[..., bytes]] = {
    "openai": chat_request,
    "simple-post": simple_post_request,
    "simple-get": simple_get_request,
    "responses": responses_request,
    "messages": messages_request,
}


async def connect(host: str, port: int) -> SSEClientProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: SSEClientProtocol(loop), host, port)
    return proto


async def one_stream(
    host: str,
    port: int,
    payload: bytes,
    res: StreamResult | None = None,
    hold: list[SSEClientProtocol] | None = None,
    protocol: str = "openai",
) -> StreamResult:
    """A fresh connection, one request, close. TTFT counts from before the connect.

    ``protocol``: how to read the response (see ``SSEClientProtocol.request``).
    """
    res = res if res is not None else StreamResult()
    res.t0 = perf()
    try:
        proto = await connect(host, port)
    except OSError as exc:
        res.error = f"transport: connect failed ({exc})"
        return res
    if hold is not None:
        hold.append(proto)
    try:
        return await proto.request(payload, res, protocol)
    finally:
        if proto.transport is not None:
            proto.transport.close()


async def http_get(
    host: str, port: int, path: str, limit_s: float = 5.0, method: str = "GET"
) -> tuple[int, bytes]:
    """A plain request without a body (GET by default), for health checks, /stats, /release."""

    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
                f"Content-Length: 0\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode()
            )
            data = await reader.read(-1)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            out = []
            while body:
                size_line, _, body = body.partition(b"\r\n")
                size = int(size_line.split(b";")[0] or b"0", 16)
                if not size:
                    break
                out.append(body[:size])
                body = body[size + 2 :]
            body = b"".join(out)
        return status, body

    return await asyncio.wait_for(go(), limit_s)


async def _cli(args: argparse.Namespace) -> dict[str, Any]:
    from urllib.parse import urlsplit

    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    payload = REQUESTS[args.protocol](host, port, args.model, api_key=args.api_key)
    sem = asyncio.Semaphore(args.concurrency)

    async def run_one() -> StreamResult:
        async with sem:
            return await one_stream(host, port, payload, protocol=args.protocol)

    t0 = perf()
    results = await asyncio.gather(*(run_one() for _ in range(args.requests)))
    wall = perf() - t0
    ttfts = [r.ttft * 1000 for r in results if r.ttft is not None]
    errors: dict[str, int] = {}
    for r in results:
        if r.status != 200 or r.error or not r.done:
            key = (r.error or f"HTTP {r.status}")[:200]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(results),
        "complete": sum(1 for r in results if r.status == 200 and r.done and not r.error),
        "tokens": sum(r.tokens for r in results),
        "wall_s": wall,
        "ttft_ms": summarize(ttfts),
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="bench/bench-10-0")
    parser.add_argument("--api-key", default=API_KEY)
    parser.add_argument(
        "--protocol",
        choices=sorted(REQUESTS),
        default="openai",
        help="openai: POST /v1/chat/completions; simple-post / simple-get: /chat/stream; "
        "responses: POST /v1/responses; messages: POST /v1/messages",
    )
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=10)
    args = parser.parse_args(argv)
    raise_nofile()
    out = uvloop.run(_cli(args))
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
