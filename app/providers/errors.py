"""Upstream failures -> ``GatewayError``s, shared by the SDK-based providers.

OpenAI and Anthropic error bodies differ only in nesting, so one mapping
serves both. Upstream messages are kept (they explain a 400 better than we
could) but scrubbed (``Scrubber``) before they reach a client or a log line,
and a 401/403 from the provider never reaches the client as one: it is the
gateway's credentials that were refused, not the client's.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, quote, quote_plus, urlsplit

import orjson

from app.errors import (
    GatewayError,
    InvalidRequest,
    RejectReason,
    UpstreamAuthFailed,
    UpstreamStatus,
    UpstreamTruncated,
)

if TYPE_CHECKING:
    from app.config import Settings
    from app.requests import ChatRequest

_KEYISH = re.compile(r"\b(?:sk|pk|rk|key|sess|api)[-_][A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)
# Any URL (its host, path and query may name internal services), and absolute
# file paths of two segments or more (Unix, home-relative, Windows).
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]*[^\s'\"<>`.,;:!?)\]}]")
_PATH = re.compile(r"(?<![\w.:/\\~-])(?:~?/[\w.@+\-]+(?:/[\w.@+\-]*)+|[A-Za-z]:\\[^\s'\"<>`]+)")
# Shorter secrets are only replaced as whole tokens, so that a dummy key such as
# "EMPTY" does not cut words apart; longer ones wherever they appear.
_ANYWHERE = 8
MAX_MESSAGE = 2000


class Scrubber:
    """Removes what must not leave the process from an upstream's error text.

    In order: the exact secrets it was given (keys of any shape, also
    percent-encoded), URLs on a configured base URL's host (-> that provider's
    name) and that bare ``host:port``, any other URL (``[url]``), absolute
    file paths (``[path]``), and whatever still looks like a key
    (``[redacted]``). Built once per process from the configuration
    (``for_settings``); used on errors only, never per chunk.
    """

    __slots__ = ("_bare", "_hosts", "_secrets")

    def __init__(
        self, secrets: Iterable[str] = (), base_urls: Iterable[tuple[str, str]] = ()
    ) -> None:
        found = {s for s in secrets if s}
        hosts: dict[str, str] = {}  # host[:port] -> the provider's name
        names: dict[str, set[str]] = {}  # host alone -> the providers on it
        for name, url in base_urls:
            try:
                parts = urlsplit(url)
                host = _host(parts)
            except ValueError:
                continue
            if parts.password:
                found.add(parts.password)
            if host:
                hosts.setdefault(host, name)
                names.setdefault(host.rpartition(":")[0] or host, set()).add(name)
        for host, on in names.items():  # a host shared by several providers names none
            hosts.setdefault(host, on.pop() if len(on) == 1 else "[host]")
        found |= {quote(s, safe="") for s in found} | {quote_plus(s) for s in found}
        self._secrets = _alternation(found, lambda s: len(s) < _ANYWHERE)
        self._hosts = hosts
        self._bare = _alternation(hosts, lambda s: True, re.IGNORECASE)

    def __call__(self, message: str) -> str:
        if self._secrets is not None:
            message = self._secrets.sub("[redacted]", message)
        message = _URL.sub(self._url, message)
        if self._bare is not None:
            message = self._bare.sub(self._name, message)
        message = _PATH.sub("[path]", message)
        return _KEYISH.sub("[redacted]", message)[:MAX_MESSAGE]

    def _url(self, match: re.Match[str]) -> str:
        try:
            host = _host(urlsplit(match.group()))
        except ValueError:  # an unparseable URL (a bad port, brackets) is still a URL
            return "[url]"
        return self._hosts.get(host, "[url]")

    def _name(self, match: re.Match[str]) -> str:
        return self._hosts.get(match.group().lower(), "[url]")

    @classmethod
    def for_settings(cls, settings: Settings) -> Scrubber:
        """Every configured provider's key and base URL, and the clients' keys."""
        configs = settings.provider_configs()
        secrets = [c.api_key.get_secret_value() for c in configs.values() if c.api_key]
        secrets += [k.get_secret_value() for k in settings.api_keys]
        urls = [(name, c.base_url) for name, c in configs.items() if c.base_url]
        return cls(secrets, urls)


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _host(parts: SplitResult) -> str:
    """``host`` or ``host:port`` (a scheme's default port left out), lower-case."""
    host = parts.hostname or ""
    port = parts.port
    if host and port is not None and port != _DEFAULT_PORTS.get(parts.scheme.lower()):
        return f"{host}:{port}"
    return host


def _alternation(
    words: Iterable[str], whole: Callable[[str], bool], flags: int = 0
) -> re.Pattern[str] | None:
    """One regex for all ``words``, longest first (a word that contains another wins).

    ``whole(word)``: matched only as a whole token, not inside a longer one.
    """
    parts = []
    for word in sorted(words, key=len, reverse=True):
        escaped = re.escape(word)
        parts.append(rf"(?<![\w.\-]){escaped}(?![\w\-])" if whole(word) else escaped)
    return re.compile("|".join(parts), flags) if parts else None


# Without the configuration (tests, pure functions): the generic patterns only.
GENERIC = Scrubber()


def scrub(message: str) -> str:
    return GENERIC(message)


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


def _fields(body: Any, scrubber: Scrubber) -> tuple[str | None, str | None, str | None, str | None]:
    """``_error_fields``, every one scrubbed: an upstream may echo anything in any of them."""
    message, etype, code, param = _error_fields(body)
    return (
        scrubber(message) if message else None,
        scrubber(etype)[:_MAX_FIELD] if etype else None,
        scrubber(code)[:_MAX_FIELD] if code else None,
        scrubber(param)[:_MAX_FIELD] if param else None,
    )


_MAX_FIELD = 200


def map_status(
    status: int,
    body: bytes,
    retry_after: str | None,
    provider: str,
    scrubber: Scrubber = GENERIC,
) -> GatewayError:
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
    message, etype, code, param = _fields(parsed, scrubber)
    reason, code = reject_reason(status, code, message)
    return UpstreamStatus(
        message or f"provider '{provider}' answered HTTP {status}",
        upstream_status=status,
        error_type=etype,
        code=code,
        param=param,
        retry_after=parse_retry_after(retry_after),
        reason=reason,
    )


def in_band_error(
    body: Any, provider: str = "upstream", scrubber: Scrubber = GENERIC
) -> GatewayError:
    """An error object sent inside an already started upstream stream."""
    message, etype, code, _param = _fields(body, scrubber)
    status = {"overloaded_error": 503, "rate_limit_error": 429, "api_error": 500}.get(
        etype or "", 500
    )
    return UpstreamStatus(
        message or f"provider '{provider}' reported an error mid-stream",
        upstream_status=status,
        error_type=etype or "upstream_error",
        code=code,
    )


def untranslatable(
    provider: str, build: Callable[[ChatRequest], dict[str, Any]], request: ChatRequest
) -> dict[str, Any]:
    """``build(request)``; a request it cannot translate is a 400, never a 500.

    Bodies are validated first, so this is a last guard (a shape the
    translation did not expect): the client is told which provider refused it.
    """
    try:
        return build(request)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise InvalidRequest(
            f"the request cannot be translated for provider '{provider}' ({type(exc).__name__})",
            code="untranslatable_request",
        ) from None


def truncated(provider: str, what: str) -> UpstreamTruncated:
    return UpstreamTruncated(
        f"provider '{provider}' stream ended early: {what}", code="upstream_truncated"
    )
