"""``POST /chat/fanout``: one prompt, several models, streamed side by side on one response.

Each model runs as its own generation (retries, fallbacks and timeouts
included) in its own task; their event batches are merged in arrival order.
A model that fails gets its own ``error`` and ``end``, and the others go on.
The response starts at once (the models start at different times), so even a
model that fails before its stream started is reported in-band. A client that
goes away cancels every task, which closes every upstream call.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.api.deps import (
    RequestId,
    State,
    check_model_names,
    client_id,
    json_body,
    require_key,
    validate,
)
from app.api.schemas import FanoutBody
from app.dispatch import Dispatch, Ticket
from app.errors import GatewayError, InvalidRequest
from app.events import End, Error, RelayEvent, Start
from app.requests import ChatRequest
from app.routing import Route
from app.wire.fanout import FanoutEncoder
from app.wire.sse import sse_response

router = APIRouter()
log = logging.getLogger("app.fanout")

_Item = tuple[int, list[RelayEvent] | None]  # None: that model is over


@router.post("/chat/fanout", dependencies=[Depends(require_key)])
async def chat_fanout(request: Request, state: State, rid: RequestId) -> Response:
    data = await json_body(request)
    check_model_names(request, data.get("models"), "models")
    body = validate(FanoutBody, data)
    limit = state.settings.fanout_max_models
    if len(body.models) > limit:
        raise InvalidRequest(
            f"models: at most {limit} models per request (GATEWAY_FANOUT_MAX_MODELS)",
            param="models",
            code="too_many_models",
        )
    routes = [state.router.resolve(name) for name in body.models]  # 404 before the stream
    encoder = FanoutEncoder("fan_" + secrets.token_hex(8), body.models)

    def make_request() -> ChatRequest:
        return body.to_request(rid, "/chat/fanout")

    # One request, one ticket, whatever the number of models compared.
    ticket = await state.dispatch.admit(client_id(request))
    return sse_response(
        fanout(state.dispatch, routes, make_request, encoder, ticket),
        request_id=rid,
        ping_interval=state.settings.ping_interval_s,
    )


async def fanout(
    dispatch: Dispatch,
    routes: list[Route],
    make_request: Callable[[], ChatRequest],
    encoder: FanoutEncoder,
    ticket: Ticket,
) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def run(index: int, route: Route) -> None:
        started = loop.time()

        def failed(exc: GatewayError, *, opened: bool) -> None:
            end = End.before_start("error", route.name, round((loop.time() - started) * 1000))
            queue.put_nowait(
                (index, [*(() if opened else (Start(model=route.name),)), Error(exc), end])
            )

        opened = False
        try:
            try:
                gen = await dispatch.open(route, make_request(), structured=True)
            except GatewayError as exc:
                failed(exc, opened=False)
                return
            opened = True
            try:
                async for batch in gen.events():
                    queue.put_nowait((index, batch))
            finally:
                await gen.aclose()
        except Exception as exc:
            # A bug must still end this model's stream, not leave it silent.
            log.error("fanout: unhandled %s for %s", type(exc).__name__, route.name)
            failed(GatewayError("internal error"), opened=opened)
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(run(i, route)) for i, route in enumerate(routes)]
    try:
        yield encoder.first()
        running = len(tasks)
        while running:
            index, batch = await queue.get()
            if batch is None:
                running -= 1
                continue
            data = encoder.encode(index, batch)
            while not queue.empty():  # what else is ready goes out in the same write
                index, more = queue.get_nowait()
                if more is None:
                    running -= 1
                else:
                    data += encoder.encode(index, more)
            if data:
                yield data
        yield encoder.done()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ticket.release()
