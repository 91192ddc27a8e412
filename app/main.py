"""``create_app()``: the parts of the gateway put together, routes, error handlers, middleware.

``app.main:create_app`` is the ASGI factory (``uvicorn --factory``); ``app``
below is a lazy module attribute so that ``app.main:app`` works for any ASGI
server without building anything at import time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import chat, fanout, health, messages, openai, page, responses, ws
from app.api import streams as streams_api
from app.api.deps import GatewayState, describe
from app.api.direct import DirectRoutes
from app.capacity import Capacity
from app.config import Settings, load_settings
from app.dispatch import Dispatch
from app.errors import GatewayError, InvalidRequest, MethodNotAllowed, NotFound
from app.guard import Guard, SecurityHeaders
from app.metrics import Metrics
from app.middleware import RequestContext, internal_error, report_unexpected
from app.providers import build_provider
from app.providers.base import Provider
from app.ratelimit import make_rate_limits
from app.routing import Router, Target
from app.shutdown import Drain
from app.streams import make_streams
from app.upstreams import Upstreams
from app.wire.errors import error_body
from app.wire.simple import SimpleLog

log = logging.getLogger("app")


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return _json(exc.http_status, error_body(request.url.path, exc), exc.headers())


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, field = describe(exc)  # type: ignore[arg-type]
    return await _gateway_error(request, InvalidRequest(message, param=field))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path, a method the path lacks) in the gateway's shape."""
    assert isinstance(exc, HTTPException)
    err: GatewayError
    if exc.status_code == 404:
        err = NotFound(f"no route {request.url.path}", code="route_not_found")
    elif exc.status_code == 405:
        err = MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"
        )
    else:
        err = InvalidRequest(str(exc.detail))
    response = await _gateway_error(request, err)
    response.headers.update(exc.headers or {})  # Allow, on a 405
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    # The client gets no detail; the log gets the type (and the trace at debug).
    report_unexpected(request.scope, exc)
    return _json(500, internal_error(request.url.path))


class GatewayApp(FastAPI):
    """FastAPI behind the gateway's own plain-ASGI middleware (``front``).

    Middleware added with ``add_middleware`` runs inside FastAPI's own layers
    (the server-error middleware, exception telemetry, the body-limit wrapper):
    five more coroutine frames held by every open stream, and a ``send``
    wrapper called for every chunk. Here the request id, body cap, CORS, the
    guard and the direct streaming routes come first; everything else then
    takes FastAPI's whole path (routing, its exception handlers, the server
    error middleware) as before. ``front`` handles every scope type: lifespan
    and WebSocket pass through to FastAPI.
    """

    front: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        await self.front(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    configs = settings.provider_configs()
    providers: dict[str, Provider] = {}
    for name, cfg in configs.items():
        provider = build_provider(name, cfg, settings)
        if provider is not None:
            providers[name] = provider
    router = Router(settings, configs, providers)
    upstreams = Upstreams(settings, providers, configs)
    keys = tuple(k.get_secret_value().encode() for k in settings.api_keys)
    redis_client = None
    if settings.redis_url:
        from app.sharedstate import connect

        redis_client = connect(settings.redis_url)
    capacity = Capacity(
        settings.max_open_streams, settings.max_readers_per_stream, settings.max_readers_per_client
    )
    streams = make_streams(settings, redis_client, SimpleLog(), capacity)
    metrics = Metrics(upstreams.circuits)
    metrics.label_circuits(lambda name: router.metric_key(Target(*name.split("/", 1))))
    dispatch = Dispatch(
        settings, router, upstreams, make_rate_limits(settings, redis_client), capacity, metrics
    )
    metrics.gauge(
        "gateway_resumable_streams",
        "resumable streams this instance runs (readers attached or not)",
        lambda: len(streams.runs),
    )
    capacity.export(metrics)  # open streams and readers, when scraped
    drain = Drain(dispatch, settings.shutdown_grace_s, streams)
    # Readers of streams that run on other instances: clients reconnect elsewhere.
    drain.before_exit.append(lambda: setattr(streams.store, "closing", True))
    state = GatewayState(
        settings=settings,
        router=router,
        upstreams=upstreams,
        dispatch=dispatch,
        metrics=metrics,
        client_keys=keys,
        drain=drain,
        streams=streams,
        redis=redis_client,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = [
            asyncio.create_task(p.start(warm=router.names_provider(name)))
            for name, p in providers.items()
        ]
        drain.install()
        streams.start_listening()
        try:
            yield
        finally:
            drain.uninstall()
            await streams.aclose()
            for task in starting:
                task.cancel()
            await asyncio.gather(*starting, return_exceptions=True)
            for p in providers.values():
                await p.aclose()

    app = GatewayApp(
        title="LLM streaming gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.gateway = state
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(messages.router)
    app.include_router(chat.router)
    app.include_router(streams_api.router)
    app.include_router(fanout.router)
    app.include_router(ws.router)
    app.include_router(page.router)
    static = StaticFiles(directory=page.STATIC)
    app.mount("/static", SecurityHeaders(static, page.SECURITY_HEADERS.items()), name="static")
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    # The gateway's own middleware runs in front of FastAPI's (see GatewayApp), innermost
    # first: the streaming POST routes skip FastAPI's routing and exception stack; the
    # guard runs inside CORS, so a preflight from a configured origin is answered before
    # its checks, and refusals carry CORS headers for the origins allowed to read them.
    front: ASGIApp = DirectRoutes(
        partial(FastAPI.__call__, app),
        routes={
            "/v1/chat/completions": openai.chat_completions,
            "/v1/responses": responses.create_response,
            "/v1/messages": messages.create_message,
            "/chat/stream": chat.chat_stream_post,
        },
        on_error=_gateway_error,
        on_unexpected=_unexpected,
    )
    front = Guard(front, settings=settings, refused=metrics.refused)
    if settings.cors_origins:
        origins = settings.cors_origins
        front = CORSMiddleware(
            front,
            allow_origins=origins,
            # Clients authenticate with a Bearer key, not cookies; and a
            # wildcard origin must never be combined with credentials.
            allow_credentials="*" not in origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Last-Event-ID",
                "X-Request-ID",
                # Anthropic's SDKs (POST /v1/messages)
                "x-api-key",
                "anthropic-version",
                "anthropic-beta",
            ],
            expose_headers=["X-Request-ID", "Retry-After", "Location"],
            max_age=600,
        )
    app.front = RequestContext(front, max_body_bytes=settings.max_body_bytes)
    return app


def __getattr__(name: str) -> Any:
    if name == "app":
        return create_app()
    raise AttributeError(name)
