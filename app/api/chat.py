"""The simple browser protocol: ``POST /chat/stream`` and ``GET /chat/stream``."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from app.api.deps import (
    RequestId,
    State,
    json_body,
    require_key,
    require_key_or_token,
    validate,
    while_connected,
)
from app.api.schemas import SimpleChatBody
from app.errors import InvalidRequest, NotFound
from app.wire.simple import SimpleStreamEncoder
from app.wire.sse import sse_response

router = APIRouter()


async def _stream(request: Request, body: SimpleChatBody, state: State, rid: str) -> Response:
    route = state.router.resolve(body.model)
    gen = await while_connected(
        request, state.router.open(route, body.to_request(rid, "/chat/stream"))
    )
    encoder = SimpleStreamEncoder("gen_" + secrets.token_hex(8))
    return sse_response(
        encoder.stream(gen.events()),
        request_id=rid,
        ping_interval=state.settings.ping_interval_s,
        background=BackgroundTask(gen.aclose),
    )


@router.post("/chat/stream", dependencies=[Depends(require_key)])
async def chat_stream_post(request: Request, state: State, rid: RequestId) -> Response:
    body = validate(SimpleChatBody, await json_body(request))
    return await _stream(request, body, state, rid)


_NUMBERS = {"max_tokens": int, "temperature": float}


@router.get("/chat/stream", dependencies=[Depends(require_key_or_token)])
async def chat_stream_get(request: Request, state: State, rid: RequestId) -> Response:
    last_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if last_id:
        # A reconnect. Resuming needs the stream registry; until a stream is
        # known here, say so with a 404 (which stops EventSource reconnecting)
        # rather than start a second generation (API.md, The simple stream).
        raise NotFound(
            f"stream '{last_id.partition(':')[0]}' is unknown or expired", code="stream_not_found"
        )
    query = request.query_params
    data: dict[str, Any] = {}
    for key in ("prompt", "model", "system"):
        if key in query:
            data[key] = query[key]
    stops = query.getlist("stop")
    if stops:
        data["stop"] = stops if len(stops) > 1 else stops[0]
    for key, kind in _NUMBERS.items():
        if key in query:
            try:
                data[key] = kind(query[key])
            except ValueError:
                raise InvalidRequest(
                    f"{key}: must be {'an integer' if kind is int else 'a number'}",
                    param=key,
                    code="invalid_value",
                ) from None
    return await _stream(request, validate(SimpleChatBody, data), state, rid)
