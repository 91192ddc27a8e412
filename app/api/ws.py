"""``GET /ws/chat``: chat over a WebSocket, several requests in turn, cancellable.

Client frames (JSON text): a request ``{"prompt" | "messages", "model", ...}``
(the simple protocol's body; ``"type": "chat"`` optional), ``{"type": "cancel"}``
to stop the current generation at once, and, when the key was not given as
``?access_token=``, a first ``{"type": "auth", "access_token": "..."}``.

Server frames: ``start``, ``content``, ``tool_call``, ``error``, ``end`` (see
``app.wire.ws``). A bad frame gets an ``error`` frame and the connection stays
open; only failed authentication closes it (code 1008, with the reason). A
request while one is running is refused with ``busy``. A client that goes
away stops its generation, as on every other route.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from app.api.deps import GatewayState, admit, client_of, describe, key_matches, opening
from app.api.schemas import SimpleChatBody
from app.errors import Cancelled, GatewayError, InvalidRequest
from app.events import End
from app.relay import Generation
from app.wire.simple import end_json
from app.wire.ws import frame, frames

router = APIRouter()


class Session:
    def __init__(self, ws: WebSocket, state: GatewayState) -> None:
        self.ws = ws
        self.state = state
        self.lock = asyncio.Lock()  # one frame at a time on the socket
        self.task: asyncio.Task[None] | None = None
        self.gen: Generation | None = None
        self.n = 0
        self.client = client_of(None, ws.client and ws.client.host)

    async def send(self, *texts: str) -> None:
        async with self.lock:
            for text in texts:
                await self.ws.send_text(text)

    async def error(self, exc: GatewayError) -> None:
        await self.send(frame("error", **exc.in_band()))

    async def handle(self, raw: str) -> None:
        try:
            msg: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self.error(InvalidRequest("the frame is not valid JSON", code="invalid_json"))
            return
        if not isinstance(msg, dict):
            await self.error(InvalidRequest("a frame must be a JSON object", code="invalid_json"))
            return
        kind = msg.pop("type", "chat")
        if kind == "cancel":
            await self.cancel()
        elif kind == "chat":
            await self.start(msg)
        else:
            await self.error(
                InvalidRequest(
                    f"type: unknown frame type {kind!r}; expected 'chat' or 'cancel'",
                    param="type",
                    code="invalid_value",
                )
            )

    async def start(self, msg: dict[str, Any]) -> None:
        if self.task is not None and not self.task.done():
            await self.error(
                InvalidRequest(
                    "a generation is running; send {'type': 'cancel'} or wait for its end",
                    code="busy",
                )
            )
            return
        try:
            body = SimpleChatBody.model_validate(msg)
            route = self.state.router.resolve(body.model)
        except ValidationError as exc:
            message, field = describe(exc)
            await self.error(InvalidRequest(message, param=field, code="invalid_value"))
            return
        except GatewayError as exc:
            await self.error(exc)
            return
        self.n += 1
        request = body.to_request(f"ws_{secrets.token_hex(8)}", "/ws/chat")
        self.task = asyncio.create_task(self.run(route, request))

    async def run(self, route: Any, request: Any) -> None:
        stream_id = request.request_id
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            slot = await admit(self.state, self.client)
            gen = await opening(self.state.router, route, request, slot)
        except GatewayError as exc:
            await self.error(exc)
            end = End.before_start("error", route.name, round((loop.time() - started) * 1000))
            await self.send(frame("end", **end_json(end)))
            return
        except asyncio.CancelledError:  # cancelled before the upstream accepted
            end = End.before_start("cancelled", route.name, round((loop.time() - started) * 1000))
            await self.send(frame("end", **end_json(end)))
            return
        self.gen = gen
        try:
            async for batch in gen.events():
                texts = frames(batch, stream_id)
                if texts:
                    await self.send(*texts)
        finally:
            self.gen = None
            await gen.aclose()

    async def cancel(self) -> None:
        task = self.task
        if task is None or task.done():
            return  # nothing running: nothing to stop
        if self.gen is not None:
            # Ends at the next safe point with end (cancelled); the upstream closes.
            self.gen.stop(Cancelled("cancelled by the client", code="cancelled"))
        else:
            task.cancel()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@router.websocket("/ws/chat")
async def ws_chat(ws: WebSocket) -> None:
    state: GatewayState = ws.app.state.gateway
    await ws.accept()
    session = Session(ws, state)
    token = ws.query_params.get("access_token")
    authed = not state.client_keys or key_matches(state.client_keys, token)
    if state.client_keys and authed:
        session.client = client_of(token, None)
    try:
        if not authed:
            first = await ws.receive_text()
            try:
                token = orjson.loads(first).get("access_token")
            except (orjson.JSONDecodeError, AttributeError):
                token = None
            if not key_matches(state.client_keys, token):
                reason = "missing or invalid API key: ?access_token=<key> or a first auth frame"
                await session.send(
                    frame(
                        "error",
                        error={
                            "type": "authentication_error",
                            "code": "invalid_api_key",
                            "message": reason,
                            "retryable": False,
                        },
                    )
                )
                await ws.close(code=1008, reason="invalid API key")
                return
            session.client = client_of(token, None)
        while True:
            await session.handle(await ws.receive_text())
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()
