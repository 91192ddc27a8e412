"""Who may talk to the gateway from a browser: Host, Origin and Content-Type checks.

Plain ASGI middleware (never BaseHTTPMiddleware), one pass over the headers
per request or handshake, nothing per chunk.

Without client keys (no-key mode) the gateway is meant for this machine only,
and listening on loopback is not enough: a web page can reach it through the
browser. So in no-key mode:

- ``Host`` must be a loopback name (``localhost``, ``*.localhost``,
  ``127.0.0.0/8``, ``[::1]``, any port) or one of ``GATEWAY_ALLOWED_HOSTS``,
  else 421: a DNS-rebinding page sends its own name as the Host;
- an ``Origin`` must be the gateway's own or one of ``GATEWAY_CORS_ORIGINS``
  (``null``, sent by sandboxed frames and ``file:`` pages, is refused), and a
  request a browser marks ``Sec-Fetch-Site: cross-site`` is refused (a
  ``<img>`` or ``<script>`` that would start a generation by GET), except
  navigations to the page at ``/``: 403;
- a POST to a JSON route must say ``Content-Type: application/json``: 415,
  so that a cross-site HTML form cannot post one.

With keys, the Bearer key protects every route (a browser never adds it
across sites), and only WebSockets keep the Origin check: a handshake cannot
carry an Authorization header, so the key may ride in the URL or a frame.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import GatewayError, HostNotAllowed, OriginNotAllowed, UnsupportedMediaType
from app.wire.errors import error_body, send_json

# POST routes that take a JSON body; every later /v1/* POST is one too.
JSON_ROUTES = frozenset({"/chat/stream", "/chat/streams", "/chat/fanout"})
_SHOWN = 100  # at most this much of a client's header value goes into a message
_DEFAULT_PORTS = {b"http": b"80", b"https": b"443", b"ws": b"80", b"wss": b"443"}


def _shown(value: bytes) -> str:
    text = value[:_SHOWN].decode("latin-1")
    return text + "..." if len(value) > _SHOWN else text


def split_host(value: bytes) -> tuple[bytes, bytes | None] | None:
    """``(name, port)`` of a Host value, lower-cased; ``None`` if it is malformed."""
    value = value.strip().lower()
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(b":"):
            return None
        port = rest[1:] if rest else None
    elif value.count(b":") == 1:
        name, _, port = value.partition(b":")
    else:
        name, port = value, None
    name = name.rstrip(b".")  # "localhost." is localhost
    if not name or (port is not None and not port.isdigit()):
        return None
    return name, port


def is_loopback(name: bytes) -> bool:
    if name == b"localhost" or name.endswith(b".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip(b"[]").decode("ascii")).is_loopback
    except (ValueError, UnicodeDecodeError):
        return False


def _origin_key(origin: bytes) -> bytes | None:
    """``host:port`` of an Origin (the scheme's default port when none is given)."""
    scheme, sep, authority = origin.lower().partition(b"://")
    default = _DEFAULT_PORTS.get(scheme)
    if not sep or default is None or b"/" in authority:
        return None
    parts = split_host(authority)
    if parts is None:
        return None
    return parts[0] + b":" + (parts[1] or default)


class Guard:
    """Host, Origin and Content-Type checks (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, settings: Settings, refused: Any) -> None:
        self.app = app
        self.open = not settings.api_keys  # no-key mode
        self.refused = refused  # the gateway_limit_refusals counter
        hosts = [h.strip().lower().encode() for h in settings.allowed_hosts if h.strip()]
        self.any_host = b"*" in hosts
        names = (split_host(h) for h in hosts if not h.startswith(b"*"))
        self.host_names = frozenset(parts[0] for parts in names if parts is not None)
        self.host_suffixes = tuple(h[1:] for h in hosts if h.startswith(b"*."))
        origins = [o.strip().rstrip("/").lower().encode() for o in settings.cors_origins]
        self.any_origin = b"*" in origins
        self.origins = frozenset(origins)
        # A verdict per distinct Host value; bounded, so clients cannot grow it.
        self.host_ok = lru_cache(maxsize=256)(self._host_ok)

    def _host_ok(self, value: bytes) -> bool:
        parts = split_host(value)
        if parts is None:
            return False
        name = parts[0]
        return (
            self.any_host
            or is_loopback(name)
            or name in self.host_names
            or name.endswith(self.host_suffixes)
        )

    def origin_ok(self, origin: bytes, host: bytes | None) -> bool:
        origin = origin.strip().lower()
        if self.any_origin or origin in self.origins:
            return True
        if origin == b"null" or host is None:
            return False
        key = _origin_key(origin)
        parts = split_host(host)
        if key is None or parts is None:
            return False
        name, port = parts
        if port is None:
            # The default port of the Origin's scheme (behind a TLS proxy the
            # gateway sees http either way, so either default will do).
            return key in (name + b":80", name + b":443")
        return key == name + b":" + port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        websocket = kind == "websocket"
        if not self.open and not websocket:
            await self.app(scope, receive, send)
            return
        host = origin = ctype = fetch_site = None
        for name, value in scope["headers"]:
            if name == b"host":
                # Two Hosts: which one the app reads is not ours to guess (malformed).
                host = value if host is None else b""
            elif name == b"origin":
                origin = value
            elif name == b"content-type":
                ctype = value
            elif name == b"sec-fetch-site":
                fetch_site = value
        error: GatewayError | None = None
        if self.open and (host is None or not self.host_ok(host)):
            error = self._host_error(host)
        elif origin is not None and not self.origin_ok(origin, host):
            error = OriginNotAllowed(
                f"Origin '{_shown(origin)}' is not allowed: only the gateway's own origin "
                "and GATEWAY_CORS_ORIGINS are",
                code="origin_not_allowed",
            )
        elif websocket:
            pass
        elif (
            self.open
            and fetch_site == b"cross-site"
            and not (scope["path"] == "/" and scope["method"] in ("GET", "HEAD"))
        ):
            error = OriginNotAllowed(
                "a cross-site request (Sec-Fetch-Site: cross-site) is not allowed without API keys",
                code="origin_not_allowed",
            )
        elif scope["method"] == "POST" and _json_route(scope["path"]) and not _is_json(ctype):
            shown = f"'{_shown(ctype)}'" if ctype is not None else "missing"
            error = UnsupportedMediaType(
                f"Content-Type {shown} is not accepted: send 'Content-Type: application/json'",
                code="unsupported_media_type",
                param="Content-Type",
            )
        if error is None:
            await self.app(scope, receive, send)
            return
        self.refused.labels(_LIMITS[type(error)]).inc()
        if websocket:
            await _refuse_websocket(scope, receive, send, error)
        else:
            await send_json(send, error.http_status, error_body(scope["path"], error))

    def _host_error(self, host: bytes | None) -> GatewayError:
        shown = f"'{_shown(host)}'" if host is not None else "(none)"
        return HostNotAllowed(
            f"Host {shown} is not served without API keys: only loopback names "
            "(localhost, 127.0.0.1, [::1]) and GATEWAY_ALLOWED_HOSTS are; "
            "set GATEWAY_API_KEYS to serve other names",
            code="host_not_allowed",
            param="Host",
        )


_LIMITS: dict[type[GatewayError], str] = {
    HostNotAllowed: "host",
    OriginNotAllowed: "origin",
    UnsupportedMediaType: "content_type",
}


def _json_route(path: str) -> bool:
    return path in JSON_ROUTES or path.startswith("/v1/")


def _is_json(ctype: bytes | None) -> bool:
    if ctype is None:
        return False
    return ctype.partition(b";")[0].strip().lower() == b"application/json"


async def _refuse_websocket(
    scope: Scope, receive: Receive, send: Send, error: GatewayError
) -> None:
    """Refuse the handshake: the JSON error as an HTTP response where the server
    supports it, else a close before accept (the client sees a 403)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        body = error.json_bytes()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": error.http_status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        reason = error.message.encode()[:120].decode(errors="ignore")  # 123 bytes at most
        await send({"type": "websocket.close", "code": 1008, "reason": reason})


class SecurityHeaders:
    """Adds fixed response headers to everything an ASGI app sends (the static files)."""

    def __init__(self, app: ASGIApp, headers: Iterable[tuple[str, str]]) -> None:
        self.app = app
        self.extra = [(k.lower().encode(), v.encode()) for k, v in headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *self.extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
