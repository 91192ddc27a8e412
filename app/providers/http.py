"""The upstream HTTP call, shared by the SDK-based providers.

The official SDK client is the source of the request's identity: base URL,
auth and version headers, exactly as the SDK would send them (anything with
``base_url``, ``default_headers`` and ``auth_headers`` will do: Gemini, whose
SDK is not a dependency, hands over its REST identity that way). The call itself
goes out on one aiohttp session per provider, because the SDK's per-request
machinery (parameter transform, httpx2 request and header models) costs about
a millisecond a request, the whole budget of added time to first token.
httpx 0.28 is not an option for upstream calls either: its pool bookkeeping
collapses at about a thousand connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from app.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable
from app.providers.errors import GENERIC, Scrubber, map_status, truncated

# Bodies of upstream errors are read only this far.
_ERROR_BODY_LIMIT = 64 * 1024

# (status, body, Retry-After, provider name, scrubber) -> the error to raise;
# ``map_status`` unless a provider's error bodies need their own reading (Gemini).
StatusMapper = Callable[[int, bytes, str | None, str, Scrubber], GatewayError]


class UpstreamSession:
    def __init__(
        self,
        name: str,
        sdk_client: Any,
        connect_timeout: float,
        scrubber: Scrubber = GENERIC,
        *,
        status_mapper: StatusMapper = map_status,
    ) -> None:
        self.name = name
        self.scrub = scrubber
        self._map_status = status_mapper
        self._sdk = sdk_client
        self._base = str(sdk_client.base_url).rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, connect=connect_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _start(self) -> aiohttp.ClientSession:
        sdk = self._sdk
        headers = {**sdk.default_headers, **sdk.auth_headers}
        # The session's defaults: each request copies them by reference, where headers
        # passed per request are rebuilt (a dozen new strings held by every open stream).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=self._timeout,
            auto_decompress=True,
            headers={k: v for k, v in headers.items() if isinstance(v, str)},
        )
        return self._session

    async def post_stream(self, path: str, params: dict[str, Any]) -> aiohttp.ClientResponse:
        """POST JSON; the response once its status is 2xx, else a GatewayError."""
        session = self._session or self._start()
        try:
            resp = await session.post(self._base + path, data=orjson.dumps(params))
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout(
                f"provider '{self.name}' did not accept the connection in time", code="timeout"
            ) from None
        except (aiohttp.ClientError, OSError, ValueError):
            # Never the exception's text: it carries the URL (ValueError: a bad base URL).
            raise UpstreamUnavailable(
                f"could not reach provider '{self.name}' (connection refused or reset)",
                code="upstream_unavailable",
            ) from None
        if resp.status < 300:
            return resp
        try:
            body = await resp.content.read(_ERROR_BODY_LIMIT)
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            resp.close()
        raise self._map_status(
            resp.status, body, resp.headers.get("retry-after"), self.name, self.scrub
        )

    async def get_json(self, path: str) -> Any:
        """GET a small JSON document (a model list); any failure is a GatewayError."""
        session = self._session or self._start()
        try:
            async with session.get(self._base + path) as resp:
                body = await resp.content.read(_ERROR_BODY_LIMIT * 16)
                status = resp.status
        except (aiohttp.ClientError, OSError, ValueError):
            raise UpstreamUnavailable(
                f"provider '{self.name}' did not list its models", code="upstream_unavailable"
            ) from None
        if status >= 300:
            raise self._map_status(status, body, None, self.name, self.scrub)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable(
                f"provider '{self.name}' sent an unreadable model list", code="upstream_unavailable"
            ) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class HTTPProvider:
    """What every provider behind an HTTP upstream shares: nothing to load at start, one
    session to close, and its upstream's model list at ``models_path``."""

    ready = True  # nothing to load: every request connects on its own
    models_path = "/models"
    _http: UpstreamSession

    async def start(self, *, warm: bool) -> None:
        return None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def list_models(self) -> list[str]:
        return model_ids(await self._http.get_json(self.models_path))


async def read_chunks(resp: aiohttp.ClientResponse, provider: str) -> AsyncIterator[bytes]:
    """The body as it arrives; a broken connection is a truncation."""
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    except (aiohttp.ClientError, asyncio.IncompleteReadError):
        raise truncated(provider, "the connection was cut") from None


def release(resp: aiohttp.ClientResponse, complete: bool) -> None:
    """Back to the pool after a whole body; otherwise the connection is closed now."""
    if complete:
        resp.release()
    else:
        resp.close()


__all__ = ["GatewayError", "UpstreamSession", "read_chunks", "release"]


def model_ids(listing: Any) -> list[str]:
    """The ids in an OpenAI- or Anthropic-style ``{"data": [{"id": ...}]}`` model list."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return []
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
