"""What routes share: the app's state, client-key auth, body parsing, and starting a
generation while the client stays connected (admission itself is ``app.dispatch``'s).

Dependencies are ``async def``: FastAPI runs a plain ``def`` one in a worker
thread, a thread hop per request for nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from app.api.bounds import check_depth, check_model, refusal
from app.config import Settings
from app.dispatch import Dispatch
from app.errors import AuthenticationFailed, ClientClosed, InvalidRequest
from app.events import RelayEvent
from app.metrics import Metrics
from app.relay import Generation
from app.requests import ChatRequest
from app.routing import Route, Router
from app.shutdown import Drain
from app.streams import Streams
from app.upstreams import Upstreams
from app.wire.sse import watch_disconnect

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    router: Router
    upstreams: Upstreams
    dispatch: Dispatch
    metrics: Metrics
    client_keys: tuple[bytes, ...]
    drain: Drain
    streams: Streams
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


def _check(request: Request, *, allow_query: bool = False, x_api_key: bool = False) -> None:
    keys = request.app.state.gateway.client_keys
    if not keys:
        request.scope["state"]["client"] = client_of(None, request.client and request.client.host)
        return
    token = _bearer(request)
    if token is None and x_api_key:
        token = request.headers.get("x-api-key")  # Anthropic's SDKs send the key so
    if token is None and allow_query:
        # EventSource cannot send headers (API.md, Running and configuring).
        token = request.query_params.get("access_token")
    if not key_matches(keys, token):
        raise AuthenticationFailed(
            "missing or invalid API key: send 'Authorization: Bearer <key>'"
            + (" or 'x-api-key: <key>'" if x_api_key else "")
            + (" or ?access_token=<key>" if allow_query else ""),
            code="invalid_api_key",
        )
    request.scope["state"]["client"] = client_of(token, None)


async def require_key(request: Request) -> None:
    _check(request)


@dataclass(slots=True)
class Call:
    """An authenticated request's context (the hot routes call ``authed`` themselves: no
    FastAPI dependency to resolve, and ``app.api.direct`` can run them as they are)."""

    state: GatewayState
    rid: str
    client: str


def _call(request: Request) -> Call:
    scope_state = request.scope["state"]
    return Call(request.app.state.gateway, scope_state["request_id"], scope_state["client"])


async def authed(request: Request) -> Call:
    _check(request)
    return _call(request)


async def authed_x_api_key(request: Request) -> Call:
    _check(request, x_api_key=True)
    return _call(request)


async def require_key_or_token(request: Request) -> None:
    _check(request, allow_query=True)


async def require_key_or_x_api_key(request: Request) -> None:
    """Bearer, or Anthropic's ``x-api-key`` header (``POST /v1/messages``)."""
    _check(request, x_api_key=True)


_TAGS = frozenset({"str", "int", "float", "bool", "TextPart", "ImagePart"})


def describe(exc: ValidationError) -> tuple[str, str | None]:
    """The first problem as 'field: message', and the field as the ``param``."""
    # FastAPI's RequestValidationError (main.py) has a plain errors().
    errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else exc.errors()
    # A union reports every member's failure; the member that got furthest
    # into the value is the one the client meant (a part's ``type``, not "a string").
    first = errors[0]["loc"][:1]
    err = max((e for e in errors if e["loc"][:1] == first), key=lambda e: len(e["loc"]))
    # Union members and validators add their tags to the path (``str``,
    # ``list[str]``, ``TextPart``, ``function-after[...]``); keep the fields only.
    loc = [str(p) for p in err["loc"]]
    loc = [p for p in loc if "[" not in p and p not in _TAGS]
    field = ".".join(loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    return (f"{field}: {msg}" if field else msg), field


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field = describe(exc)
        raise InvalidRequest(message, param=field, code="invalid_value") from None


def refused(request: Request, limit: str) -> None:
    """Count a refusal by a safety limit (gateway_limit_refusals_total)."""
    request.app.state.gateway.metrics.refused.labels(limit).inc()


def check_bounds(request: Request, data: dict[str, Any]) -> None:
    """Depth anywhere in the body, then the model name's length: before any validation."""
    settings: Settings = request.app.state.gateway.settings
    try:
        check_depth(data, settings.max_json_depth, settings.max_list_items)
    except InvalidRequest as exc:
        refused(request, refusal(exc))
        raise
    check_model_names(request, data.get("model"), "model")


def check_model_names(request: Request, names: Any, param: str) -> None:
    """``check_model`` on a name or each name of a list (``models`` of /chat/fanout)."""
    limit = request.app.state.gateway.settings.max_model_length
    try:
        for name in names if isinstance(names, list) else (names,):
            check_model(name, limit, param)
    except InvalidRequest:
        refused(request, "model_length")
        raise


async def json_body(request: Request) -> Any:
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if any(w in str(exc).lower() for w in ("recursion", "depth limit")):
            # orjson's own limit (1024 levels), far past GATEWAY_MAX_JSON_DEPTH.
            refused(request, "json_depth")
            limit = request.app.state.gateway.settings.max_json_depth
            raise InvalidRequest(
                f"body: JSON nested deeper than {limit} levels (GATEWAY_MAX_JSON_DEPTH)",
                code="json_too_deep",
            ) from None
        raise InvalidRequest(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    check_bounds(request, data)
    return data


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, abandoned as soon as the client goes away.

    Retries and backoff can hold a request for seconds before the response
    starts (and a non-streamed answer until its end), and uvicorn does not
    cancel a handler whose client left: ``watch_disconnect`` does, so that no
    upstream is called, or kept generating, for nobody.
    """
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def left() -> None:
        nonlocal gone
        gone = True
        task.cancel()

    stop_watching = watch_disconnect(request.scope, request.receive, left)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientClosed("the client closed the request") from None
        raise
    finally:
        stop_watching()


async def start_generation(
    request: Request,
    state: GatewayState,
    route: Route,
    chat: ChatRequest,
    *,
    structured: bool = False,
) -> Generation:
    """Admit this request's client and open a generation, abandoned if the client leaves."""
    opening = state.dispatch.start(client_id(request), route, chat, structured=structured)
    return await while_connected(request, opening)


async def collected(
    opening: Awaitable[Generation],
    collect: Callable[[AsyncIterator[list[RelayEvent]], str], Awaitable[T]],
) -> T:
    """A whole non-streamed answer: ``collect(events, model)`` reads the generation's events
    into the protocol's object; the upstream is released however this ends."""
    gen = await opening
    try:
        async with aclosing(gen.events()) as events:
            return await collect(events, gen.model)
    finally:
        await gen.aclose()
