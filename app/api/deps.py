"""What routes share: the app's state, client-key auth, and body parsing.

Dependencies are ``async def``: FastAPI runs a plain ``def`` one in a worker
thread, a thread hop per request for nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from app.config import Settings
from app.errors import AuthenticationFailed, ClientClosed, InvalidRequest, RateLimited
from app.limits import RateLimits, Slot
from app.providers.base import ChatRequest
from app.relay import Generation
from app.routing import Route, Router
from app.shutdown import Drain
from app.streams import Streams

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    router: Router
    client_keys: tuple[bytes, ...]
    drain: Drain
    streams: Streams
    limits: RateLimits
    redis: Any | None  # the shared Redis client, when GATEWAY_REDIS_URL is set


async def gateway(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


State = Annotated[GatewayState, Depends(gateway)]


async def request_id(request: Request) -> str:
    rid: str = request.scope["state"]["request_id"]
    return rid


RequestId = Annotated[str, Depends(request_id)]


def key_matches(keys: tuple[bytes, ...], token: str | None) -> bool:
    if not token:
        return False
    candidate = token.encode()
    found = False
    for key in keys:  # no early exit: the time taken says nothing about which key
        found |= hmac.compare_digest(key, candidate)
    return found


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def client_of(token: str | None, host: str | None) -> str:
    """Who a request is for rate limits and stream ownership: its key, else its address."""
    if token is None:
        return "ip:" + (host or "-")
    return "key:" + hashlib.sha256(token.encode()).hexdigest()[:24]


def client_id(request: Request) -> str:
    client: str = request.scope["state"]["client"]
    return client


def _check(request: Request, *, allow_query: bool) -> None:
    keys = request.app.state.gateway.client_keys
    if not keys:
        request.scope["state"]["client"] = client_of(None, request.client and request.client.host)
        return
    token = _bearer(request)
    if token is None and allow_query:
        # EventSource cannot send headers (API.md, Running and configuring).
        token = request.query_params.get("access_token")
    if not key_matches(keys, token):
        raise AuthenticationFailed(
            "missing or invalid API key: send 'Authorization: Bearer <key>'"
            + (" or ?access_token=<key>" if allow_query else ""),
            code="invalid_api_key",
        )
    request.scope["state"]["client"] = client_of(token, None)


async def require_key(request: Request) -> None:
    _check(request, allow_query=False)


async def require_key_or_token(request: Request) -> None:
    _check(request, allow_query=True)


def describe(exc: ValidationError) -> tuple[str, str | None]:
    """The first problem as 'field: message', and the field as the ``param``."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "union["))]
    # Union members add their type names to the path; keep the fields only.
    loc = [p for p in loc if p not in ("str", "list[union[TextPart,ImagePart]]")]
    field = ".".join(loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    return (f"{field}: {msg}" if field else msg), field


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field = describe(exc)
        raise InvalidRequest(message, param=field, code="invalid_value") from None


async def json_body(request: Request) -> Any:
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return data


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, abandoned as soon as the client goes away.

    Retries and backoff can hold a request for seconds before the response
    starts (and a non-streamed answer until its end), and uvicorn does not
    cancel a handler whose client left: a watcher on ``receive()`` does, so
    that no upstream is called, or kept generating, for nobody.
    """
    task = asyncio.current_task()
    assert task is not None
    receive = request.receive
    gone = False

    async def watch() -> None:
        nonlocal gone
        try:
            while (await receive())["type"] != "http.disconnect":
                pass  # an empty GET body; the next message is the disconnect
        except Exception:
            return
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientClosed("the client closed the request") from None
        raise
    finally:
        watcher.cancel()


async def admit(state: GatewayState, client: str) -> Slot:
    """The client's place under its rate limit and concurrency cap (429 otherwise)."""
    try:
        return await state.limits.admit(client)
    except RateLimited as exc:
        state.router.metrics.rate_limited.labels(exc.code or "").inc()
        raise


async def opening(router: Router, route: Route, chat: ChatRequest, slot: Slot) -> Generation:
    """Open a generation that holds ``slot`` until it is over."""
    try:
        gen = await router.open(route, chat)
    except BaseException:
        await slot.release()
        raise
    gen.on_close = slot.release
    return gen


async def open_generation(
    request: Request, state: GatewayState, route: Route, chat: ChatRequest
) -> Generation:
    """Admit the client (rate limit, concurrency cap), then open while it stays connected."""
    slot = await admit(state, client_id(request))
    return await while_connected(request, opening(state.router, route, chat, slot))
