"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``GET /v1/models``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from app.api.deps import (
    State,
    authed,
    client_id,
    collected,
    json_body,
    require_key,
    start_generation,
    validate,
    while_connected,
)
from app.api.schemas import ChatCompletionBody
from app.wire.openai import OpenAIStreamEncoder, collect_completion
from app.wire.sse import dumps, sse_response

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    call = await authed(request)
    state, rid = call.state, call.rid
    body = validate(ChatCompletionBody, await json_body(request))
    route = state.router.resolve(body.model)
    chat = body.to_request(rid, "/v1/chat/completions")
    if not body.stream:
        opening = state.dispatch.start(client_id(request), route, chat)
        result = await while_connected(
            request,
            collected(opening, lambda events, model: collect_completion(events, model=model)),
        )
        return Response(dumps(result), media_type="application/json", headers={"X-Request-ID": rid})
    gen = await start_generation(request, state, route, chat)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    encoder = OpenAIStreamEncoder(model=gen.model, include_usage=include_usage)
    return sse_response(
        encoder.stream(gen.events()),
        request_id=rid,
        ping_interval=state.settings.ping_interval_s,
        background=BackgroundTask(gen.aclose),
    )


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def list_models(state: State) -> Response:
    """Configured models and aliases, then what each open-ended provider's upstream lists."""
    created = int(time.time())
    names = state.router.available()
    for provider, ids in (await state.upstreams.listed_models()).items():
        names += [f"{provider}/{i}" for i in ids]
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": name.partition("/")[0] if "/" in name else "gateway",
        }
        for name in dict.fromkeys(names)
    ]
    return Response(dumps({"object": "list", "data": data}), media_type="application/json")
