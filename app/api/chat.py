"""The simple browser protocol: ``POST /chat/stream`` and ``GET /chat/stream``.

``POST`` streams straight from the generation: a client that leaves stops it
at once. ``GET`` is for ``EventSource``, which reconnects by itself: its
stream is resumable (``app.streams``), and a request carrying
``Last-Event-ID`` (header, or ``last_event_id`` for fetch clients) resumes
the stream it names and never starts a second generation.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from app.api.deps import (
    RequestId,
    State,
    authed,
    check_model_names,
    client_id,
    json_body,
    require_key_or_token,
    start_generation,
    validate,
    while_connected,
)
from app.api.schemas import SimpleChatBody
from app.api.streams import last_event_id, resume
from app.errors import InvalidRequest
from app.streams import parse_event_id
from app.wire.simple import SimpleStreamEncoder
from app.wire.sse import sse_response

router = APIRouter()


@router.post("/chat/stream")
async def chat_stream_post(request: Request) -> Response:
    call = await authed(request)
    state, rid = call.state, call.rid
    body = validate(SimpleChatBody, await json_body(request))
    route = state.router.resolve(body.model)
    chat = body.to_request(rid, "/chat/stream")
    gen = await start_generation(request, state, route, chat, structured=True)
    encoder = SimpleStreamEncoder("gen_" + secrets.token_hex(8))
    return sse_response(
        encoder.stream(gen.events()),
        request_id=rid,
        ping_interval=state.settings.ping_interval_s,
        background=BackgroundTask(gen.aclose),
    )


_NUMBERS = {"max_tokens": int, "temperature": float}


def _query_body(request: Request) -> SimpleChatBody:
    query = request.query_params
    data: dict[str, Any] = {}
    for key in ("prompt", "model", "system"):
        if key in query:
            data[key] = query[key]
    check_model_names(request, data.get("model"), "model")
    stops = query.getlist("stop")
    if stops:
        data["stop"] = stops if len(stops) > 1 else stops[0]
    for key, kind in _NUMBERS.items():
        if key in query:
            try:
                value = kind(query[key])
                if not math.isfinite(value):  # float("nan"), float("inf")
                    raise ValueError(key)
            except ValueError:
                raise InvalidRequest(
                    f"{key}: must be {'an integer' if kind is int else 'a finite number'}",
                    param=key,
                    code="invalid_value",
                ) from None
            data[key] = value
    return validate(SimpleChatBody, data)


@router.get("/chat/stream", dependencies=[Depends(require_key_or_token)])
async def chat_stream_get(request: Request, state: State, rid: RequestId) -> Response:
    last = last_event_id(request)
    if last:
        sid, n = parse_event_id(last)
        return await resume(state, rid, sid, client_id(request), n)
    body = _query_body(request)
    route = state.router.resolve(body.model)
    client = client_id(request)
    ticket = await state.dispatch.admit(client)
    # The stream's record before the upstream: with the store down, none is called.
    try:
        run = await state.streams.reserve(client, route.name)
    except BaseException:
        await ticket.release()
        raise
    chat = body.to_request(rid, "/chat/stream")
    try:
        opening = state.dispatch.open(route, chat, ticket, structured=True)
        gen = await while_connected(request, opening)
    except BaseException:
        await state.streams.discard(run)
        raise
    state.streams.launch(run, gen, reading=True)
    return sse_response(
        state.streams.read_new(run),
        request_id=rid,
        ping_interval=state.settings.ping_interval_s,
    )
