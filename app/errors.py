"""Every failure the gateway reports, and its one mapping to the wire.

::

    GatewayError                      500 internal_error
    ├── InvalidRequest                400 invalid_request_error
    ├── AuthenticationFailed          401 authentication_error (WWW-Authenticate: Bearer)
    ├── OriginNotAllowed              403 permission_error (a cross-site Origin)
    ├── NotFound                      404 not_found_error (unknown model, stream, route)
    ├── MethodNotAllowed              405 invalid_request_error (Allow: the path's methods)
    ├── PayloadTooLarge               413 request_too_large
    ├── UnsupportedMediaType          415 (no-key mode: a JSON route without application/json)
    ├── HostNotAllowed                421 (no-key mode: a Host that is not loopback or allowed)
    ├── RateLimited                   429 rate_limit_error        (Retry-After)
    ├── Overloaded                    503 overloaded_error        (Retry-After)
    │   ├── ShuttingDown              503 server_shutdown (draining; streams ended after the grace)
    │   └── StoreUnavailable          503 store_unavailable (Redis unreachable)
    ├── StreamLogFull                 500 the replay log reached its bound (in-band only)
    ├── StreamLost                    502 the instance running the stream is gone (in-band only)
    ├── OutputInvalid                 502 invalid_output: structured output off its schema (in-band)
    ├── ClientClosed                  499 the client left before the response started
    ├── Cancelled                     499 the client stopped the generation (no error event)
    └── UpstreamError                 502 upstream_error
        ├── UpstreamStatus            the upstream's own 4xx/5xx, its message kept
        ├── UpstreamAuthFailed        502 the provider refused the gateway's own key
        ├── UpstreamUnavailable       502 connect error, reset before headers
        ├── UpstreamTimeout           504 timeout (connect, first token, idle, total)
        └── UpstreamTruncated         502 upstream_truncated (cut, unparseable chunk)

Before the first byte an error becomes a status and OpenAI's JSON body; after
it, an in-band ``error`` event (see ``app.wire``). Messages are written for
clients: they never carry a key, a stack trace or an upstream's raw body.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import orjson


class GatewayError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    @property
    def http_status(self) -> int:
        return self.status

    @property
    def is_retryable(self) -> bool:
        return self.retryable

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape: ``{"error": {"message", "type", "code", "param"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "code": self.code,
                "param": self.param,
            }
        }

    def in_band(self) -> dict[str, Any]:
        """The simple protocol's ``error`` event payload."""
        err = self.body()["error"]
        return {
            "error": {
                "type": err["type"],
                "code": err["code"],
                "message": self.message,
                "retryable": self.is_retryable,
            }
        }

    def headers(self) -> dict[str, str]:
        retry_after = self.retry_after
        if retry_after is None:
            if self.http_status not in (429, 503):
                return {}
            # Every 429 and 503 says when to come back (API.md); where nothing
            # better is known, a second.
            retry_after = 1.0
        # Rounded up: a client that waits what it is told is not refused again.
        return {"Retry-After": str(max(1, math.ceil(retry_after)))}

    def json_bytes(self) -> bytes:
        return orjson.dumps(self.body())


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "authentication_error"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="gateway"'}


class NotFound(GatewayError):
    status = 404
    error_type = "not_found_error"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"


class OriginNotAllowed(GatewayError):
    status = 403
    error_type = "permission_error"


class UnsupportedMediaType(GatewayError):
    status = 415
    error_type = "invalid_request_error"


class HostNotAllowed(GatewayError):
    status = 421  # Misdirected Request: this server does not answer for that name
    error_type = "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status = 413
    error_type = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    error_type = "rate_limit_error"
    retryable = True


class Overloaded(GatewayError):
    status = 503
    error_type = "overloaded_error"
    retryable = True


class ShuttingDown(Overloaded):
    """The server is draining for a shutdown: no new streams; running ones end after the grace."""

    error_type = "server_shutdown"


class StoreUnavailable(Overloaded):
    """The shared state (Redis) cannot be reached: no resumable stream or rate count without it."""

    error_type = "store_unavailable"


class StreamLogFull(GatewayError):
    """A resumable stream's replay log reached its bound: the stream ends rather than grow."""

    error_type = "stream_log_full"


class StreamLost(GatewayError):
    """The instance that ran a stream stopped without ending it (it crashed or was killed)."""

    status = 502
    error_type = "stream_lost"
    retryable = True


class OutputInvalid(GatewayError):
    """The model's structured output did not parse or match its schema (in-band only)."""

    status = 502
    error_type = "invalid_output"


class Cancelled(GatewayError):
    """The client asked to stop the generation: the stream ends ``cancelled``, without an error."""

    status = 499
    error_type = "cancelled"


class ClientClosed(GatewayError):
    """The client left before the response started (nginx's 499; never seen by it)."""

    status = 499
    error_type = "client_closed_request"


class UpstreamError(GatewayError):
    status = 502
    error_type = "upstream_error"
    retryable = True


RejectReason = Literal["context_length", "content_policy"]


class UpstreamStatus(UpstreamError):
    """The upstream answered with an error status; we pass its status on.

    ``reason`` marks the two rejections that aliases can route around:
    a prompt too long for the model, and a content-policy refusal.
    """

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        reason: RejectReason | None = None,
    ) -> None:
        super().__init__(message, code=code, param=param, retry_after=retry_after)
        self.upstream_status = upstream_status
        self._type = error_type
        self.reason = reason

    @property
    def http_status(self) -> int:
        # A 4xx that explains the problem goes to the client as it is; an
        # upstream 5xx is a bad gateway from the client's point of view, except
        # 503 (overloaded) and 504, which keep their meaning.
        s = self.upstream_status
        if 400 <= s < 500:
            return s
        return s if s in (503, 504) else 502

    @property
    def is_retryable(self) -> bool:
        s = self.upstream_status
        return s in (408, 409, 429) or s >= 500

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["type"] = self._type or (
            "invalid_request_error" if 400 <= self.upstream_status < 500 else "upstream_error"
        )
        return body


class UpstreamAuthFailed(UpstreamError):
    error_type = "upstream_auth_error"
    retryable = False


class UpstreamUnavailable(UpstreamError):
    error_type = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "timeout"

    def __init__(
        self,
        message: str,
        *,
        phase: Literal["connect", "first_token", "idle", "total"] = "connect",
        code: str | None = "timeout",
    ) -> None:
        super().__init__(message, code=code)
        # Routing moves on after a silent upstream (first_token) rather than
        # retry it, and gives up once the total budget is spent.
        self.phase = phase


class UpstreamTruncated(UpstreamError):
    error_type = "upstream_truncated"
