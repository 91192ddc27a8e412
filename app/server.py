"""How uvicorn runs the gateway: one set of server options for ``python -m app``
and the tests, and an HTTP protocol that bounds what a client can make the
server hold before the app sees its request.

httptools (llhttp) sets no limit on the request line or headers: it keeps an
unfinished header in memory however long it grows, and uvicorn sets no
deadline for headers to arrive. ``GatewayHttpProtocol`` adds both, per
request: over ``max_header_bytes`` of request line + headers the request is
answered 431 (or the connection closed), and headers that have not all arrived
``header_timeout_s`` after the request's first byte (or the connect) close the
connection. Both work on the parser's callbacks and on bytes received while a
head is unfinished; nothing is added per body chunk. Idle keep-alive
connections are uvicorn's ``timeout_keep_alive``; WebSocket messages over
``ws_max_bytes()`` are refused by the protocol (close 1009) from the frame
header, before their payload is buffered (or, compressed, as they inflate).
A connection beyond ``max_connections`` open in this process is answered
503 and closed as it connects, before anything of it is read or held.
Every refusal is counted in ``gateway_limit_refusals_total{limit=...}``:
``connections``, ``header_size``, ``header_timeout``, ``ws_message_size``.

It also tells an SSE response that its client is gone
(``app.wire.sse.ON_DISCONNECT``): a callback from ``connection_lost``, where
otherwise each response would hold a task waiting on ``receive()`` for the
disconnect. The running request is the one tracked, not uvicorn's newest: a
client that pipelines a request behind its stream and leaves is seen (at the
stream's next write: nothing is read while a pipelined request waits).
"""

from __future__ import annotations

import asyncio
import gc
import http
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.config import Settings, load_settings
from app.errors import GatewayError, InvalidRequest, Overloaded
from app.logs import configure as configure_logs
from app.wire.sse import ON_DISCONNECT


def _ignore(limit: str) -> None:
    pass


@dataclass(frozen=True)
class TransportLimits:
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 16_384
    # Called with the limit's name on each refusal (the app's refusal counter).
    on_refused: Callable[[str], None] = _ignore

    @classmethod
    def of(cls, settings: Settings, on_refused: Callable[[str], None]) -> TransportLimits:
        return cls(
            settings.max_header_bytes,
            settings.header_timeout_s,
            settings.body_timeout_s,
            settings.max_connections,
            on_refused,
        )


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a refused request."""


_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding"})

# uvicorn's parser callbacks, called without super()'s lookup (once per header).
_on_url = HttpToolsProtocol.on_url
_on_header = HttpToolsProtocol.on_header


class GatewayHttpProtocol(HttpToolsProtocol):
    limits: ClassVar[TransportLimits] = TransportLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False  # between a request's first byte and the end of its headers
        self._head_new = False  # the head began in the chunk being parsed
        # Bytes left for the request line + complete headers, as parsed, and for
        # the bytes received in later chunks of an unfinished head.
        self._head_left = self._raw_left = 0
        self._head_timer: asyncio.TimerHandle | None = None
        # Set while a declared body is awaited (Content-Length or Transfer-Encoding).
        self._has_body = False
        self._body_timer: asyncio.TimerHandle | None = None
        # The running request's cycle (a pipelined one waits its turn), and its response's
        # disconnect callback (app.wire.sse.ON_DISCONNECT) with the cycle it belongs to.
        self._running: Any = None
        self._on_lost: tuple[Any, Callable[[], None]] | None = None

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def _on_disconnect(
        self, scope: dict[str, Any], callback: Callable[[], None]
    ) -> Callable[[], None] | None:
        """Call ``callback`` if the connection is lost before ``scope``'s response is
        complete; returns what forgets it. None when that cannot be promised (not the
        running request, or its client already gone): the caller watches ``receive``."""
        cycle = self._running
        if (
            cycle is None
            or cycle.scope is not scope
            or cycle.response_complete
            or cycle.disconnected
            or self.transport.is_closing()
        ):
            return None
        entry = (cycle, callback)
        self._on_lost = entry
        return partial(self._forget, entry)

    def _forget(self, entry: tuple[Any, Callable[[], None]]) -> None:
        if self._on_lost is entry:
            self._on_lost = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            # Before anything is read: what an idle connection holds is not held.
            self.limits.on_refused("connections")
            limit = self.limits.max_connections
            error = Overloaded(
                f"this gateway process holds its limit of {limit} connections "
                "(GATEWAY_MAX_CONNECTIONS); retry shortly",
                code="too_many_connections",
            )
            status = http.HTTPStatus.SERVICE_UNAVAILABLE
            self._answer_and_close(status, error, b"retry-after: 1\r\n")
            return
        # From the connect: a client that sends nothing is closed too.
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_body_timer()
        lost, self._on_lost = self._on_lost, None
        running, self._running = self._running, None
        super().connection_lost(exc)
        # The scopes' hooks point back here: a closed connection is freed without the
        # cycle collector. (uvicorn marks only its newest request disconnected, not a
        # running one with a pipelined request behind it, so completeness is checked.)
        for scope in (self.scope, running and running.scope, *(c.scope for c, _ in self.pipeline)):
            if scope:
                scope.pop(ON_DISCONNECT, None)
        if lost is not None and not lost[0].response_complete:
            lost[1]()

    def data_received(self, data: bytes) -> None:
        # uvicorn's, but a request refused here is not answered 400 as well.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self.transport.is_closing():  # else refused here, already answered
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        if self._in_head:
            # What httptools holds of an unfinished header is not seen by any
            # callback: bound it by the bytes received since the head began.
            # (The chunk it began in may end the previous body: not counted.)
            if self._head_new:
                self._head_new = False
            else:
                self._raw_left -= len(data)
                if self._raw_left < 0:
                    self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[ON_DISCONNECT] = self._on_disconnect  # type: ignore[literal-required]
        self._in_head = self._head_new = True
        self._has_body = False
        self._head_left = self._raw_left = self.limits.max_header_bytes
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )

    def on_url(self, url: bytes) -> None:
        self._head_left -= len(url)
        if self._head_left < 0:
            self._refuse_head()
            raise _Refused
        _on_url(self, url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_left -= len(name) + len(value) + 4  # ": " and CRLF
        if self._head_left < 0:
            self._refuse_head()
            raise _Refused
        if len(name) in (14, 17) and name.lower() in _BODY_HEADERS and value.strip() != b"0":
            self._has_body = True
        _on_header(self, name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        if self._has_body:
            # Also when the app answers without reading it (a 401): the connection
            # is not held while a client trickles a body nobody reads.
            self._body_timer = self.loop.call_later(
                self.limits.body_timeout_s, self._body_timed_out
            )
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._stop_body_timer()
        super().on_message_complete()

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():
            self.limits.on_refused("body_timeout")
            self.transport.close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse_head(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        self.limits.on_refused("header_size")
        if self.transport.is_closing():
            return
        limit = self.limits.max_header_bytes
        error = InvalidRequest(
            f"the request line and headers are larger than {limit} bytes "
            "(GATEWAY_MAX_HEADER_BYTES)",
            code="request_header_fields_too_large",
        )
        self._answer_and_close(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, error)

    def _answer_and_close(
        self, status: http.HTTPStatus, error: GatewayError, extra: bytes = b""
    ) -> None:
        """A refusal written straight to the socket, outside any request cycle."""
        body = error.json_bytes()
        head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            extra,
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.limits.on_refused("header_timeout")
            self.transport.close()


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (websockets, sans-I/O), counting its refusals."""

    limits: ClassVar[TransportLimits] = TransportLimits()

    def handle_parser_exception(self) -> None:
        close = self.conn.close_sent
        if close is not None and close.code == 1009:  # over ws_max_size, or inflating past it
            self.limits.on_refused("ws_message_size")
        super().handle_parser_exception()


class WorkerHttpProtocol(GatewayHttpProtocol):
    """For ``--workers N``: importable by name in each worker (a class made per
    app cannot cross to a spawned process), bound there by ``worker_app``."""


class WorkerWebSocketProtocol(GatewayWebSocketProtocol):
    """As ``WorkerHttpProtocol``."""


def protocols(limits: TransportLimits) -> dict[str, Any]:
    """uvicorn's ``http`` and ``ws`` classes bound to ``limits`` (per app: tests run
    several in one process)."""
    return {
        "http": type("GatewayHttpProtocol", (GatewayHttpProtocol,), {"limits": limits}),
        "ws": type("GatewayWebSocketProtocol", (GatewayWebSocketProtocol,), {"limits": limits}),
    }


def refusal_counter(app: Any) -> Callable[[str], None]:
    """Counts a refusal in the app's ``gateway_limit_refusals_total{limit=...}``."""
    refused = app.state.gateway.metrics.refused

    def count(limit: str) -> None:
        refused.labels(limit).inc()

    return count


def uvicorn_options(settings: Settings, app: Any = None) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``/``uvicorn.run``, all but host, port, workers.

    With ``app``: serve it, counting refusals in its metrics. Without
    (``--workers N``): each worker builds its own app with ``worker_app``.
    """
    if app is not None:
        served: dict[str, Any] = {
            "app": app,
            **protocols(TransportLimits.of(settings, refusal_counter(app))),
        }
    else:
        served = {
            "app": "app.server:worker_app",
            "factory": True,
            "http": WorkerHttpProtocol,
            "ws": WorkerWebSocketProtocol,
        }
    return {
        **served,
        "loop": "uvloop",
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        # The protocol refuses a larger message from its frame header (close 1009).
        "ws_max_size": settings.ws_max_bytes(),
        "log_level": settings.log_level,
        "access_log": False,  # ours leaves out query strings (access_token)
        "log_config": None,  # keep the JSON logging of app.logs
        # X-Forwarded-For/-Proto are believed only from the configured proxies;
        # uvicorn would trust 127.0.0.1 if given none, so none turns it off.
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": settings.forwarded_allow_ips or None,
        # The app drains streams itself on SIGTERM (app.shutdown) before uvicorn
        # starts its own shutdown; this only bounds what is left after that.
        "timeout_graceful_shutdown": 10,
    }


def freeze_heap() -> None:
    """Move what the process built at start out of the garbage collector's sight.

    The app's long-lived objects (FastAPI, pydantic validators, the SDKs: several
    hundred thousand) would otherwise be walked by every full collection, tens of
    ms each, landing in the middle of requests. Called once per serving process,
    after the app is built (never in tests, where apps come and go)."""
    gc.collect()
    gc.freeze()


def worker_app() -> Any:
    """The app of one ``--workers N`` process (uvicorn's factory), with its logs and limits."""
    from app.main import create_app

    settings = load_settings()
    configure_logs(settings.log_level)
    app = create_app(settings)
    limits = TransportLimits.of(settings, refusal_counter(app))
    WorkerHttpProtocol.limits = WorkerWebSocketProtocol.limits = limits
    freeze_heap()
    return app
