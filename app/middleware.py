"""Plain ASGI middleware (never BaseHTTPMiddleware: it breaks streaming and
disconnect detection): request id, body-size limit, access log.

The access log names the path without its query string: ``access_token`` may
ride there (EventSource cannot send headers) and must never reach a log.
"""

from __future__ import annotations

import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import GatewayError, PayloadTooLarge
from app.wire.errors import error_body, send_json

log = logging.getLogger("app.access")
_app_log = logging.getLogger("app")
_VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestContext:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid_bytes: bytes | None = None
        length: int | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id" and _VALID_ID.fullmatch(value):
                rid_bytes = value
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if rid_bytes is None:
            rid_bytes = os.urandom(16).hex().encode()  # a uuid4 object costs 3x more
        rid = rid_bytes.decode()
        scope.setdefault("state", {})["request_id"] = rid
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid_bytes))
            await send(message)

        limit = self.max_body
        if length is not None and length > limit:
            await self._too_large(send_wrapper, limit, scope["path"])
        else:
            received = 0

            async def receive_wrapper() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise PayloadTooLarge(_too_large_message(limit), code="request_too_large")
                return message

            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except Exception as exc:
                # Outside every handler (the gateway's middleware runs in front of
                # FastAPI's error layer): the same JSON 500, if nothing was sent yet;
                # after that the server closes the connection, a cut that no client
                # takes for a whole answer.
                report_unexpected(scope, exc)
                if not status:
                    await send_json(send_wrapper, 500, internal_error(scope["path"]))
            finally:
                route = getattr(scope.get("route"), "path", None) or "other"
                _count(scope, route, status)
                # Health probes every few seconds would drown the log: debug.
                level = logging.DEBUG if scope["path"] in _QUIET else logging.INFO
                if log.isEnabledFor(level):
                    ms = round((time.perf_counter() - start) * 1000, 1)
                    log.log(
                        level,
                        "%s %s %s",
                        scope["method"],
                        scope["path"],
                        status or "-",
                        extra={
                            "fields": {
                                "request_id": rid,
                                "method": scope["method"],
                                "path": scope["path"],  # never the query string
                                "status": status,
                                "duration_ms": ms,
                            }
                        },
                    )
            return
        _count(scope, "other", 413)
        log.info(
            "%s %s 413",
            scope["method"],
            scope["path"],
            extra={"fields": {"request_id": rid, "path": scope["path"], "status": 413}},
        )

    @staticmethod
    async def _too_large(send: Send, limit: int, path: str) -> None:
        error = PayloadTooLarge(_too_large_message(limit), code="request_too_large")
        await send_json(send, 413, error_body(path, error), [(b"connection", b"close")])


def internal_error(path: str) -> bytes:
    """The body of a 500: no detail, in the shape of the path's protocol."""
    return error_body(path, GatewayError("internal error"))


def report_unexpected(scope: Scope, exc: BaseException) -> None:
    """One log line per request for an exception no handler expected: its type and the
    request id; the traceback only at debug level (a frame's text may quote a request)."""
    state = scope.setdefault("state", {})
    if state.get("unexpected_reported"):
        return
    state["unexpected_reported"] = True
    _app_log.error(
        "unhandled %s rid=%s",
        type(exc).__name__,
        state.get("request_id", "-"),
        exc_info=_app_log.isEnabledFor(logging.DEBUG),
    )


def _count(scope: Scope, route: str, status: int | None) -> None:
    gateway = getattr(getattr(scope.get("app"), "state", None), "gateway", None)
    if gateway is not None:
        gateway.metrics.http_requests.labels(route, str(status or 0)).inc()


def _too_large_message(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes (GATEWAY_MAX_BODY_BYTES)"
