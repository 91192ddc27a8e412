"""Resumable streams (API.md): start one, follow it from any point, stop it.

- ``POST /chat/streams`` (the simple protocol's body) -> ``201 {"id",
  "events_url"}`` at once: the generation runs whether or not anyone reads.
  An unknown model or a rate limit answers before that (404, 429); a failure
  to reach any upstream is the stream's first events (``error``, ``end``).
- ``GET /chat/streams/{id}/events`` replays what came after ``Last-Event-ID``
  (header, or ``?last_event_id=``), then follows live; ``204`` once it ended
  and everything was delivered; ``404`` for an unknown or expired id, or one
  started with another key.
- ``DELETE /chat/streams/{id}`` stops the generation on whichever instance
  runs it; ``200 {"id", "status": "ended", "finish_reason"}`` once its end is
  logged (``finish_reason`` is ``cancelled`` unless it had already ended),
  ``202`` with ``"status": "stopping"`` if that takes over 5 s.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.api.deps import (
    RequestId,
    State,
    client_id,
    json_body,
    require_key,
    require_key_or_token,
    validate,
)
from app.api.schemas import SimpleChatBody
from app.streams import parse_event_id
from app.wire.sse import dumps, sse_response

router = APIRouter()


def last_event_id(request: Request) -> str | None:
    return request.headers.get("last-event-id") or request.query_params.get("last_event_id")


async def resume(state: State, rid: str, sid: str, client: str, after: int) -> Response:
    body = await state.streams.subscribe(sid, client, after)
    if after >= 0:
        state.metrics.resumes.inc()
    if body is None:
        # Everything was delivered; 204 stops EventSource reconnecting.
        return Response(status_code=204, headers={"X-Request-ID": rid})
    return sse_response(body, request_id=rid, ping_interval=state.settings.ping_interval_s)


@router.post("/chat/streams", dependencies=[Depends(require_key)], status_code=201)
async def create_stream(request: Request, state: State, rid: RequestId) -> Response:
    body = validate(SimpleChatBody, await json_body(request))
    route = state.router.resolve(body.model)
    client = client_id(request)
    ticket = await state.dispatch.admit(client)
    chat = body.to_request(rid, "/chat/streams")
    run = await state.streams.start(
        client,
        route.name,
        lambda: state.dispatch.open(route, chat, ticket, structured=True),
        slot=ticket,
    )
    url = f"/chat/streams/{run.sid}/events"
    return Response(
        dumps({"id": run.sid, "events_url": url}),
        status_code=201,
        media_type="application/json",
        headers={"Location": url, "X-Request-ID": rid},
    )


@router.get("/chat/streams/{sid}/events", dependencies=[Depends(require_key_or_token)])
async def stream_events(request: Request, sid: str, state: State, rid: RequestId) -> Response:
    last = last_event_id(request)
    after = parse_event_id(last, sid)[1] if last else -1
    return await resume(state, rid, sid, client_id(request), after)


@router.delete("/chat/streams/{sid}", dependencies=[Depends(require_key)])
async def stop_stream(request: Request, sid: str, state: State, rid: RequestId) -> Response:
    reason = await state.streams.cancel(sid, client_id(request))
    body = {"id": sid, "status": "ended" if reason else "stopping", "finish_reason": reason}
    return Response(
        dumps(body),
        status_code=200 if reason else 202,
        media_type="application/json",
        headers={"X-Request-ID": rid},
    )
