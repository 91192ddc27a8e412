"""The streaming routes, run without FastAPI's per-request machinery.

A request that FastAPI routes passes its router (matching every route in
turn), its dependency solver, two exit stacks and the exception middleware,
which also wraps every ``send`` of the response: for a streamed answer that
is one more Python call per chunk, and a chain of frames that a held stream
keeps for its whole life. The hot POST routes need none of it: they parse,
authenticate and validate themselves (``app.api.deps``) and map errors
through the one error tree.

``DirectRoutes`` sits innermost among the gateway's own middleware (request
id, body cap, CORS and the no-key guard still apply) and sends a POST to one
of ``routes`` straight to its handler; anything else, and any other method on
those paths (a 405), goes on to FastAPI, where the same handlers are also
registered. A ``GatewayError`` becomes the same response FastAPI's handler
would give (``on_error``); anything else the same 500 (``on_unexpected``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import GatewayError

Handler = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class DirectRoute:
    """What ``scope["route"]`` holds for the access log and the request counter."""

    path: str


class DirectRoutes:
    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[str, Handler],
        on_error: ErrorHandler,
        on_unexpected: ErrorHandler,
    ) -> None:
        self.app = app
        self.routes = {path: (handler, DirectRoute(path)) for path, handler in routes.items()}
        self.on_error = on_error
        self.on_unexpected = on_unexpected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if found is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        handler, route = found
        scope["route"] = route
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except GatewayError as exc:
            response = await self.on_error(request, exc)
        except Exception as exc:
            response = await self.on_unexpected(request, exc)
        await response(scope, receive, send)
