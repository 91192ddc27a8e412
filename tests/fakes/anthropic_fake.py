"""Fake Anthropic Messages upstream (``POST /v1/messages``, count_tokens, ``GET /v1/models``)."""

from __future__ import annotations

import json
from typing import Any

from .scenario import Attempt, Scenario
from .server import FakeServer, Handler, Request, _Conn, dumps, random_id

# OpenAI finish_reason -> Anthropic stop_reason (anything else passes through unchanged)
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# status -> (type, message)
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low."),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    503: ("overloaded_error", "Overloaded"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}

MODELS = ["claude-sonnet-4-5", "claude-haiku-4-5"]


def stop_reason(finish_reason: str) -> str:
    return STOP_REASONS.get(finish_reason, finish_reason)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    data = {"type": "content_block_start", "index": index, "content_block": block}
    return _sse("content_block_start", data)


class AnthropicFake(FakeServer):
    name = "anthropic-fake"
    request_id_header = "request-id"
    base_path = ""  # the SDK appends /v1/messages itself

    def route(self, method: str, path: str) -> Handler | None:
        if method == "POST" and path == "/v1/messages":
            return self._messages
        if method == "POST" and path == "/v1/messages/count_tokens":
            return self._count_tokens
        if method == "GET" and path == "/v1/models":
            return self._models
        return None

    def is_generation(self, req: Request) -> bool:
        return req.method == "POST" and req.path == "/v1/messages"

    def error_body(
        self, status: int, scenario: Scenario | None, *, mid_stream: bool = False
    ) -> dict[str, Any]:
        if mid_stream:  # what Anthropic sends as an `event: error` inside a 200 stream
            etype, message = "overloaded_error", "Overloaded"
        elif status in _ERRORS:
            etype, message = _ERRORS[status]
        elif status >= 500:
            etype, message = "api_error", "Internal server error"
        else:
            etype, message = "invalid_request_error", "Invalid request."
        error: dict[str, Any] = {"type": etype, "message": message}
        if scenario is not None:
            error["type"] = scenario.error_type or etype
            error["message"] = scenario.error_message or message
            if scenario.error_code is not None:
                error["details"] = {"error_code": scenario.error_code}
        body: dict[str, Any] = {"type": "error", "error": error}
        if not mid_stream:
            body["request_id"] = random_id("req_011", 21)
        return body

    def malformed_event(self) -> bytes:
        return (
            b"event: content_block_delta\n"
            b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_del\n\n'
        )

    def error_event(self, scenario: Scenario) -> bytes:
        return _sse("error", self.error_body(200, scenario, mid_stream=True))

    # -- handlers -------------------------------------------------------------------------
    async def _models(self, conn: _Conn, req: Request, attempt: Attempt) -> bool:
        names = list(dict.fromkeys([*MODELS, *self.for_model]))
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": m,
                "created_at": "2025-01-01T00:00:00Z",
            }
            for m in names
        ]
        obj = {"data": data, "has_more": False, "first_id": names[0], "last_id": names[-1]}
        return await self.send_json(conn, req, attempt, 200, obj)

    async def _count_tokens(self, conn: _Conn, req: Request, attempt: Attempt) -> bool:
        obj = {"input_tokens": attempt.scenario.input_tokens}
        return await self.send_json(conn, req, attempt, 200, obj)

    async def _messages(self, conn: _Conn, req: Request, attempt: Attempt) -> bool:
        if not isinstance(attempt.body, dict):
            err = self.error_body(400, None)
            err["error"]["message"] = "There was an issue with the JSON body of your request."
            return await self.send_json(conn, req, attempt, 400, err)
        sc = attempt.scenario
        model = sc.model or attempt.model or MODELS[0]
        mid = random_id("msg_01", 22)
        reason = stop_reason(sc.finish_reason)

        if not attempt.stream:
            content: list[dict[str, Any]] = []
            if sc.chunks or not sc.tool_calls:
                content.append({"type": "text", "text": sc.text})
            for t in sc.tool_calls:
                raw = "".join(t.arguments)
                try:
                    tool_input = json.loads(raw) if raw else {}
                except ValueError:
                    tool_input = {"_raw": raw}
                content.append(
                    {"type": "tool_use", "id": t.id, "name": t.name, "input": tool_input}
                )
            obj = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": reason,
                "stop_sequence": None,
                "usage": {"input_tokens": sc.input_tokens, "output_tokens": sc.completion_tokens},
            }
            return await self.send_body_nonstream(conn, req, attempt, obj)

        start = {
            "type": "message_start",
            "message": {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": model,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": sc.input_tokens, "output_tokens": 1},
            },
        }
        items: list[tuple[str, bytes]] = [("s", _sse("message_start", start))]
        index = 0
        pinged = False
        if sc.chunks or not sc.tool_calls:
            items.append(("s", _block_start(0, {"type": "text", "text": ""})))
            items.append(("s", _sse("ping", {"type": "ping"})))
            pinged = True
            for text in sc.chunks:
                delta = {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                }
                items.append(("c", _sse("content_block_delta", delta)))
            items.append(
                ("s", _sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
            )
            index = 1
        for t in sc.tool_calls:
            block: dict[str, Any] = {"type": "tool_use", "id": t.id, "name": t.name, "input": {}}
            items.append(("s", _block_start(index, block)))
            if not pinged:
                items.append(("s", _sse("ping", {"type": "ping"})))
                pinged = True
            for piece in t.arguments:
                delta = {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                }
                items.append(("c", _sse("content_block_delta", delta)))
            items.append(
                ("s", _sse("content_block_stop", {"type": "content_block_stop", "index": index}))
            )
            index += 1
        items.append(("f", b""))
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": None},
            "usage": {"output_tokens": sc.completion_tokens},
        }
        items.append(("s", _sse("message_delta", message_delta)))
        items.append(("d", _sse("message_stop", {"type": "message_stop"})))
        return await self.stream_items(conn, req, attempt, items)
