"""``GET /ws/chat``: chat over a WebSocket, several requests in turn, cancellable.

Client frames (JSON text): a request ``{"prompt" | "messages", "model", ...}``
(the simple protocol's body; ``"type": "chat"`` optional), ``{"type": "cancel"}``
to stop the current generation at once, and, when the key was not given as
``?access_token=``, a first ``{"type": "auth", "access_token": "..."}``.

Server frames: ``start``, ``content``, ``tool_call``, ``error``, ``end`` (see
``app.wire.ws``). A bad frame gets an ``error`` frame naming the problem (and
``param``, the field) and the connection stays open: a binary frame, a message
over ``ws_max_bytes()``, JSON nested deeper than ``max_json_depth``, a model
name over ``max_model_length``, an invalid body. Only failed authentication
closes it (code 1008, with the reason): a wrong or non-string key, an auth
frame that is not a JSON object, or none within ``ws_auth_timeout_s``. A
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

from app.api.bounds import check_depth, check_model, refusal
from app.api.deps import GatewayState, client_of, describe, key_matches
from app.api.schemas import SimpleChatBody
from app.errors import (
    AuthenticationFailed,
    Cancelled,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
)
from app.events import End
from app.relay import Generation
from app.requests import ChatRequest
from app.routing import Route
from app.wire.simple import end_json
from app.wire.ws import error_frame, frame, frames

router = APIRouter()


async def receive(ws: WebSocket) -> str | bytes:
    """The next message, text or binary (``receive_text`` would raise on a binary one)."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    if text is not None:
        return str(text)
    data = message.get("bytes")
    return bytes(data) if data is not None else b""


def too_large(text: str, limit: int) -> bool:
    # Encoded only when the characters alone cannot decide: UTF-8 is at most 4 bytes each.
    return len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit)


def binary_frame() -> InvalidRequest:
    return InvalidRequest(
        "binary frames are not accepted; send each frame as JSON text", code="binary_frame"
    )


def message_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the message is larger than {limit} bytes (GATEWAY_WS_MAX_MESSAGE_BYTES)",
        code="message_too_large",
    )


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

    def refused(self, limit: str) -> None:
        self.state.metrics.refused.labels(limit).inc()

    async def error(self, exc: GatewayError) -> None:
        await self.send(error_frame(exc))

    def parse(self, raw: str | bytes) -> dict[str, Any]:
        """A frame as a JSON object, bounded in size and depth before anything reads it."""
        if isinstance(raw, bytes):
            raise binary_frame()
        limit = self.state.settings.ws_max_bytes()
        if too_large(raw, limit):
            self.refused("ws_message_size")
            raise message_too_large(limit)
        settings = self.state.settings
        try:
            msg: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if "depth limit" in str(exc).lower() or "recursion" in str(exc).lower():
                # orjson's own limit (1024 levels), far past GATEWAY_MAX_JSON_DEPTH.
                self.refused("json_depth")
                raise InvalidRequest(
                    f"frame: JSON nested deeper than {settings.max_json_depth} levels "
                    "(GATEWAY_MAX_JSON_DEPTH)",
                    code="json_too_deep",
                ) from None
            raise InvalidRequest("the frame is not valid JSON", code="invalid_json") from None
        if not isinstance(msg, dict):
            raise InvalidRequest("a frame must be a JSON object", code="invalid_json")
        try:
            check_depth(msg, settings.max_json_depth, settings.max_list_items)
        except InvalidRequest as exc:
            self.refused(refusal(exc))
            raise
        return msg

    async def authenticate(self) -> str | None:
        """The key from the first frame, or None once refused (error frame, close 1008)."""
        timeout = self.state.settings.ws_auth_timeout_s
        try:
            raw = await asyncio.wait_for(receive(self.ws), timeout)
        except TimeoutError:
            self.refused("ws_auth_timeout")
            await self.refuse(
                AuthenticationFailed(
                    f"no auth frame within {timeout:g} s (GATEWAY_WS_AUTH_TIMEOUT_S); send "
                    '{"type": "auth", "access_token": "<key>"} first, or use ?access_token=',
                    code="auth_timeout",
                ),
                "auth timeout",
            )
            return None
        try:
            msg = self.parse(raw)
        except GatewayError as exc:
            await self.refuse(exc, "bad auth frame")
            return None
        token = msg.get("access_token")
        if token is not None and not isinstance(token, str):
            await self.refuse(
                InvalidRequest(
                    "access_token: must be a string", param="access_token", code="invalid_value"
                ),
                "bad auth frame",
            )
            return None
        if not key_matches(self.state.client_keys, token):
            await self.refuse(
                AuthenticationFailed(
                    "missing or invalid API key: ?access_token=<key> or a first auth frame",
                    code="invalid_api_key",
                ),
                "invalid API key",
            )
            return None
        return token

    async def refuse(self, exc: GatewayError, reason: str) -> None:
        await self.error(exc)
        await self.ws.close(code=1008, reason=reason)

    async def handle(self, raw: str | bytes) -> None:
        try:
            msg = self.parse(raw)
        except GatewayError as exc:
            await self.error(exc)
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
            check_model(msg.get("model"), self.state.settings.max_model_length)
        except InvalidRequest as exc:
            self.refused("model_length")
            await self.error(exc)
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

    async def run(self, route: Route, request: ChatRequest) -> None:
        stream_id = request.request_id
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            gen = await self.state.dispatch.start(self.client, route, request, structured=True)
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
            token = await session.authenticate()
            if token is None:
                return
            session.client = client_of(token, None)
        while True:
            await session.handle(await receive(ws))
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()
