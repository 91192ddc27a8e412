"""A tiny HTTP/1.1 server on raw asyncio, run in a background thread, for fake upstreams.

Each fake owns an event loop in a daemon thread.  ``start()`` returns once the socket is
listening; ``stop()`` aborts every connection, waits for the handlers and joins the thread.
Connections are plain ``asyncio.Protocol`` objects so that closes are noticed at once
(``eof_received`` / ``connection_lost``) and every byte written is under our control:
streamed responses use ``Transfer-Encoding: chunked`` with one chunk per ``transport.write``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import socket
import string
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from .scenario import Attempt, Scenario

_MAX_HEAD = 64 * 1024
_ID_ALPHABET = string.ascii_letters + string.digits

Handler = Callable[["_Conn", "Request", Attempt], Awaitable[bool]]


def random_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(random.choices(_ID_ALPHABET, k=n))


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


CHUNKED_END = b"0\r\n\r\n"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return {529: "Site Overloaded"}.get(status, "Unknown")


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


class BadRequest(Exception):
    pass


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def wants_close(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" not in conn
        return "close" in conn


class _Conn(asyncio.Protocol):
    """One accepted TCP connection."""

    def __init__(self, server: FakeServer, cid: int) -> None:
        self.server = server
        self.cid = cid
        self.transport: asyncio.Transport | None = None
        self.reader: asyncio.StreamReader | None = None
        self.task: asyncio.Task[None] | None = None
        self.attempts: list[Attempt] = []
        self.closed = False
        self.closed_by_us = False
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.reader = asyncio.StreamReader(limit=_MAX_HEAD)
        self.server._conns.add(self)
        self.task = asyncio.get_running_loop().create_task(self.server._serve(self))

    def data_received(self, data: bytes) -> None:
        assert self.reader is not None
        self.reader.feed_data(data)

    def eof_received(self) -> bool:
        # An HTTP client that shuts down its side is gone; treat it as a close right away.
        assert self.reader is not None
        self.reader.feed_eof()
        self._mark_closed()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader is not None and not self.reader.at_eof():
            self.reader.feed_eof()
        self._mark_closed()
        self._writable.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.server._conns.discard(self)
        if self.server._conn_gone is not None:
            self.server._conn_gone.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- helpers --------------------------------------------------------------------------
    def _mark_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        with self.server._cond:
            for a in self.attempts:
                if a.closed_at is None:
                    a.closed_at = now
                    if not a.completed and not self.closed_by_us:
                        a.closed_by_client = True
            self.server._cond.notify_all()

    @property
    def open(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    async def write(self, data: bytes) -> None:
        if not self.open:
            raise ConnectionResetError("connection closed")
        assert self.transport is not None
        self.transport.write(data)
        if not self._writable.is_set():
            await self._writable.wait()

    async def write_chunk(self, data: bytes) -> None:
        if data:  # an empty chunk would be the terminator
            await self.write(encode_chunk(data))

    def close(self) -> None:
        """Graceful close (FIN after pending data).  Recorded as closed right away."""
        if self.transport is not None and not self.transport.is_closing():
            if not self.closed:
                self.closed_by_us = True
            self._mark_closed()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            if not self.closed:
                self.closed_by_us = True
            self._mark_closed()
            self.transport.abort()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), discarding anything unsent."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()


class FakeServer:
    """Base fake upstream.  Subclasses provide routes and the provider's wire format."""

    name = "fake"
    request_id_header = "x-request-id"
    base_path = ""  # appended to http://127.0.0.1:PORT for base_url

    def __init__(self, default: Scenario | None = None) -> None:
        self.default: Scenario = default if default is not None else Scenario()
        self.for_model: dict[str, Scenario] = {}
        self._queue: deque[Scenario] = deque()
        self._attempts: list[Attempt] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._conn_gone: asyncio.Event | None = None
        self._cids = itertools.count(1)
        self.port = 0
        self.errors: list[str] = []  # unexpected exceptions inside the server thread

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.set_exception_handler(self._on_loop_error)
            try:
                self._conn_gone = asyncio.Event()
                self._server = loop.run_until_complete(
                    loop.create_server(
                        lambda: _Conn(self, next(self._cids)), "127.0.0.1", 0, backlog=128
                    )
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # pragma: no cover - startup failure
                failure.append(exc)
                loop.close()
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()
        if not ready.wait(10):  # pragma: no cover
            raise RuntimeError(f"{self.name} did not start")
        if failure:  # pragma: no cover
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive() and not loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                fut.result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None
        self._loop = None
        self._server = None

    async def _shutdown(self) -> None:
        assert self._server is not None and self._conn_gone is not None
        self._server.close()
        tasks = [c.task for c in self._conns if c.task is not None]
        for conn in list(self._conns):
            conn.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Wait for every connection_lost so that all sockets are really closed.
        deadline = time.monotonic() + 5
        while self._conns and time.monotonic() < deadline:
            self._conn_gone.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._conn_gone.wait(), 0.1)
        await self._server.wait_closed()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ConnectionError | asyncio.CancelledError):
            return
        self.errors.append(f"{context.get('message')}: {exc!r}")

    # -- scenarios and records -----------------------------------------------------------
    def enqueue(self, *scenarios: Scenario) -> None:
        """FIFO scenarios, one consumed per generation attempt, before for_model/default."""
        with self._cond:
            self._queue.extend(scenarios)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def clear_queue(self) -> None:
        with self._cond:
            self._queue.clear()

    @property
    def attempts(self) -> list[Attempt]:
        with self._cond:
            return list(self._attempts)

    def reset_record(self) -> None:
        with self._cond:
            self._attempts.clear()

    def wait_for_attempts(self, n: int, timeout: float = 5.0) -> list[Attempt]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._attempts) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name}: expected {n} attempts within {timeout}s, "
                        f"got {len(self._attempts)}"
                    )
                self._cond.wait(left)
            return list(self._attempts)

    def _resolve_attempt(self, attempt: Attempt | int) -> Attempt | None:
        if isinstance(attempt, Attempt):
            return attempt
        try:
            return self._attempts[attempt]
        except IndexError:
            return None

    def wait_closed(self, attempt: Attempt | int = -1, timeout: float = 5.0) -> float:
        """Block until the connection that carried ``attempt`` is closed; return closed_at."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                a = self._resolve_attempt(attempt)
                if a is not None and a.closed_at is not None:
                    return a.closed_at
                left = deadline - time.monotonic()
                if left <= 0:
                    what = "no such attempt" if a is None else "still open"
                    raise AssertionError(
                        f"{self.name}: connection of attempt {attempt!r} not closed "
                        f"within {timeout}s ({what})"
                    )
                self._cond.wait(left)

    async def wait_for_attempts_async(
        self,
        n: int,
        timeout: float = 5.0,  # noqa: ASYNC109 - mirrors the sync API
    ) -> list[Attempt]:
        """Like wait_for_attempts, without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if len(self._attempts) >= n:
                    return list(self._attempts)
            if time.monotonic() >= deadline:
                return self.wait_for_attempts(n, timeout=0)
            await asyncio.sleep(0.005)

    async def wait_closed_async(
        self,
        attempt: Attempt | int = -1,
        timeout: float = 5.0,  # noqa: ASYNC109 - mirrors the sync API
    ) -> float:
        """Like wait_closed, without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                a = self._resolve_attempt(attempt)
                if a is not None and a.closed_at is not None:
                    return a.closed_at
            if time.monotonic() >= deadline:
                return self.wait_closed(attempt, timeout=0)
            await asyncio.sleep(0.005)

    def _select(self, model: str | None, consume_queue: bool) -> Scenario:
        if consume_queue and self._queue:
            return self._queue.popleft()
        if model is not None and model in self.for_model:
            return self.for_model[model]
        return self.default

    def _record(self, conn: _Conn, req: Request) -> Attempt:
        body: Any = None
        if req.body:
            try:
                body = json.loads(req.body)
            except ValueError:
                body = None
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            model = None
        with self._cond:
            scenario = self._select(model, self.is_generation(req))
            attempt = Attempt(
                index=len(self._attempts),
                method=req.method,
                path=req.path,
                headers=dict(req.headers),
                body=body,
                model=model,
                scenario=scenario,
                started=time.monotonic(),
                query=req.query,
                stream=isinstance(body, dict) and body.get("stream") is True,
                connection_id=conn.cid,
            )
            self._attempts.append(attempt)
            conn.attempts.append(attempt)
            self._cond.notify_all()
        return attempt

    async def _write_last(self, conn: _Conn, attempt: Attempt, data: bytes) -> None:
        """Write the response's last bytes, marking the attempt completed first.

        Marked before the bytes leave so that a client which has seen the whole response
        can rely on ``completed`` already being True.
        """
        if not conn.open:
            raise ConnectionResetError("connection closed")
        with self._cond:
            attempt.completed = True
            self._cond.notify_all()
        await conn.write(data)

    # -- to be provided by subclasses ----------------------------------------------------
    def route(self, method: str, path: str) -> Handler | None:
        return None

    def is_generation(self, req: Request) -> bool:
        return False

    def error_body(
        self, status: int, scenario: Scenario | None, *, mid_stream: bool = False
    ) -> dict[str, Any]:
        return {"error": {"message": f"error {status}"}}

    def malformed_event(self) -> bytes:
        return b'data: {"truncated": \n\n'

    def error_event(self, scenario: Scenario) -> bytes:
        return b"data: " + dumps(self.error_body(500, scenario, mid_stream=True)) + b"\n\n"

    # -- HTTP plumbing ------------------------------------------------------------------
    async def _serve(self, conn: _Conn) -> None:
        try:
            while True:
                try:
                    req = await self._read_request(conn)
                except BadRequest as exc:
                    body = dumps(self.error_body(400, None) | {"detail": str(exc)})
                    await conn.write(self._head(400, self._json_headers(len(body), close=True)))
                    await conn.write(body)
                    break
                if req is None:
                    break
                attempt = self._record(conn, req)
                keep = await self._respond(conn, req, attempt)
                if not keep or req.wants_close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # keep the server alive, but make it visible
            self.errors.append(f"handler error: {exc!r}")
        finally:
            conn.close()

    async def _read_request(self, conn: _Conn) -> Request | None:
        reader = conn.reader
        assert reader is not None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise BadRequest("incomplete request head") from exc
            return None
        except asyncio.LimitOverrunError as exc:
            raise BadRequest("request head too large") from exc
        lines = head.lstrip(b"\r\n").decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError as exc:
            raise BadRequest(f"bad request line {lines[0]!r}") from exc
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest(f"bad header line {line!r}")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        path, _, query = target.partition("?")
        if headers.get("expect", "").lower() == "100-continue":
            await conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked(reader)
        else:
            try:
                length = int(headers.get("content-length", "0") or 0)
            except ValueError as exc:
                raise BadRequest("bad content-length") from exc
            body = await reader.readexactly(length) if length else b""
        return Request(method, target, path, query, version, headers, body)

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise BadRequest("bad chunk size") from exc
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def _head(self, status: int, headers: Iterable[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_reason(status)}"]
        lines.extend(f"{k}: {v}" for k, v in headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _common_headers(self) -> list[tuple[str, str]]:
        return [
            ("date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
            (self.request_id_header, random_id("req_")),
        ]

    def _json_headers(self, length: int, *, close: bool = False) -> list[tuple[str, str]]:
        h = [
            *self._common_headers(),
            ("content-type", "application/json"),
            ("content-length", str(length)),
        ]
        if close:
            h.append(("connection", "close"))
        return h

    def _sse_headers(self, *, close: bool = False) -> list[tuple[str, str]]:
        h = [
            *self._common_headers(),
            ("content-type", "text/event-stream; charset=utf-8"),
            ("transfer-encoding", "chunked"),
            ("cache-control", "no-cache"),
        ]
        if close:
            h.append(("connection", "close"))
        return h

    async def send_json(
        self,
        conn: _Conn,
        req: Request,
        attempt: Attempt,
        status: int,
        obj: Any,
        extra_headers: Iterable[tuple[str, str]] = (),
    ) -> bool:
        body = dumps(obj)
        headers = [*self._json_headers(len(body), close=req.wants_close), *extra_headers]
        await self._write_last(conn, attempt, self._head(status, headers) + body)
        return True

    async def _respond(self, conn: _Conn, req: Request, attempt: Attempt) -> bool:
        handler = self.route(req.method, req.path)
        if handler is None:
            return await self.send_json(conn, req, attempt, 404, self.error_body(404, None), ())
        sc = attempt.scenario
        if sc.fault == "reset":
            conn.reset()
            return False
        if sc.fault == "never_answer":
            await _forever()
        await _sleep(sc.headers_delay)
        if sc.fault == "status":
            extra = [("retry-after", sc.retry_after)] if sc.retry_after is not None else []
            return await self.send_json(
                conn, req, attempt, sc.status, self.error_body(sc.status, sc), extra
            )
        if sc.raw_parts is not None and self.is_generation(req):
            items = [("c", p) for p in sc.raw_parts] + [("f", b"")]
            return await self.stream_items(conn, req, attempt, items)
        return await handler(conn, req, attempt)

    async def stream_items(
        self, conn: _Conn, req: Request, attempt: Attempt, items: list[tuple[str, bytes]]
    ) -> bool:
        """Write an SSE response, one chunk per item, applying delays and faults.

        Item kinds: "s" structural event, "c" content event (counted for fault_after, with
        first_token_delay / interval before it), "f" marker where the content ends
        (a fault with fault_after >= the number of content events fires here), "d" the
        terminal event left out under no_done.
        """
        sc = attempt.scenario
        await conn.write(self._head(200, self._sse_headers(close=req.wants_close)))
        mid_fault = sc.fault if sc.fault in ("stall", "cut", "malformed", "error_event") else None
        sent = 0
        fired = False
        for kind, payload in items:
            if kind in ("c", "f"):
                if kind == "c" or sent == 0:
                    await _sleep(sc.first_token_delay if sent == 0 else sc.interval)
                if mid_fault is not None and not fired and sent >= sc.fault_after:
                    fired = True
                    if mid_fault == "stall":
                        await _forever()
                    elif mid_fault == "cut":
                        conn.close()
                        return False
                    elif mid_fault == "malformed":
                        await conn.write_chunk(self.malformed_event())
                    else:  # error_event
                        await conn.write_chunk(self.error_event(sc))
                        await self._write_last(conn, attempt, CHUNKED_END)
                        return True
                if kind == "c":
                    await conn.write_chunk(payload)
                    sent += 1
                continue
            if kind == "d" and sc.fault == "no_done":
                continue
            await conn.write_chunk(payload)
        if sc.fault == "no_done":
            await _forever()
        await self._write_last(conn, attempt, CHUNKED_END)
        return True

    async def send_body_nonstream(
        self, conn: _Conn, req: Request, attempt: Attempt, obj: Any
    ) -> bool:
        """Non-streaming answer, after the time a stream would have taken; faults adapted."""
        sc = attempt.scenario
        n = len(sc.chunks) + sum(1 + len(t.arguments) for t in sc.tool_calls)
        await _sleep(sc.first_token_delay + sc.interval * max(0, n - 1))
        if sc.fault == "stall":
            await _forever()
        body = dumps(obj)
        if sc.fault == "cut":
            head = self._head(200, self._json_headers(len(body)))
            await conn.write(head + body[: len(body) // 2])
            conn.close()
            return False
        if sc.fault == "malformed":
            body = body[: len(body) // 2]
        headers = self._json_headers(len(body), close=req.wants_close)
        await self._write_last(conn, attempt, self._head(200, headers) + body)
        return True
