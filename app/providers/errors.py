"""Upstream failures -> ``GatewayError``s, shared by the SDK-based providers.

OpenAI and Anthropic error bodies differ only in nesting, so one mapping
serves both. Upstream messages are kept
(they explain a 400 better than we could) but scrubbed of anything shaped
like a key, and a 401/403 from the provider never reaches the client as one:
it is the gateway's credentials that were refused, not the client's.
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import Any

import orjson

from app.errors import (
    GatewayError,
    RejectReason,
    UpstreamAuthFailed,
    UpstreamStatus,
    UpstreamTruncated,
)

_KEYISH = re.compile(r"\b(?:sk|pk|rk|key|sess|api)[-_][A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)


def scrub(message: str) -> str:
    return _KEYISH.sub("[redacted]", message)[:2000]


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in delta-seconds or as an HTTP date (RFC 9110, 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_fields(body: Any) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, type, code, param) from an OpenAI- or Anthropic-shaped error body."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict):
        return None, None, None, None

    def text(key: str) -> str | None:
        value = body.get(key)
        return str(value) if value is not None else None

    return text("message"), text("type"), text("code"), text("param")


# How providers say "prompt too long" and "refused by policy": OpenAI and Azure
# by code, Anthropic and vLLM only in the message.
_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_TEXT = re.compile(
    r"maximum context length|context window|prompt is too long|context_length_exceeded"
    r"|too many tokens|exceeds the context",
    re.IGNORECASE,
)
_POLICY_CODES = frozenset({"content_policy_violation", "content_filter", "content_policy"})
_POLICY_TEXT = re.compile(
    r"content (?:management )?policy|content filter|safety system|flagged as", re.IGNORECASE
)


def reject_reason(
    status: int, code: str | None, message: str | None
) -> tuple[RejectReason | None, str | None]:
    """(reason, code) for a 4xx: the code becomes the uniform one when only the text said so."""
    if not 400 <= status < 500 or status in (408, 409, 429):
        return None, code
    text = message or ""
    if code in _CONTEXT_CODES or _CONTEXT_TEXT.search(text):
        return "context_length", code or "context_length_exceeded"
    if code in _POLICY_CODES or _POLICY_TEXT.search(text):
        return "content_policy", code or "content_policy_violation"
    return None, code


def map_status(status: int, body: bytes, retry_after: str | None, provider: str) -> GatewayError:
    """An upstream's error status, before the stream started."""
    if status in (401, 403):
        return UpstreamAuthFailed(
            f"provider '{provider}' refused the gateway's credentials (HTTP {status}); "
            "check its API key setting",
            code="upstream_auth_failed",
        )
    try:
        parsed: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    message, etype, code, param = _error_fields(parsed)
    reason, code = reject_reason(status, code, message)
    return UpstreamStatus(
        scrub(message or f"provider '{provider}' answered HTTP {status}"),
        upstream_status=status,
        error_type=etype,
        code=code,
        param=param,
        retry_after=parse_retry_after(retry_after),
        reason=reason,
    )


def in_band_error(body: Any, provider: str = "upstream") -> GatewayError:
    """An error object sent inside an already started upstream stream."""
    message, etype, code, _param = _error_fields(body)
    status = {"overloaded_error": 503, "rate_limit_error": 429, "api_error": 500}.get(
        etype or "", 500
    )
    return UpstreamStatus(
        scrub(message or f"provider '{provider}' reported an error mid-stream"),
        upstream_status=status,
        error_type=etype or "upstream_error",
        code=code,
    )


def truncated(provider: str, what: str) -> UpstreamTruncated:
    return UpstreamTruncated(
        f"provider '{provider}' stream ended early: {what}", code="upstream_truncated"
    )
