"""Fake OpenAI Chat Completions upstream (``POST /v1/chat/completions``, ``GET /v1/models``)."""

from __future__ import annotations

import time
from typing import Any

from .scenario import Attempt, Scenario
from .server import FakeServer, Handler, Request, _Conn, dumps, random_id

# status -> (type, code, message)
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "permission_denied", "You are not allowed to do that."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    409: ("invalid_request_error", "conflict", "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached. Please try again later."),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", "bad_gateway", "Bad gateway."),
    503: ("server_error", "overloaded", "The engine is currently overloaded."),
    504: ("server_error", "timeout", "Gateway timeout."),
}

MODELS = ["gpt-4o-mini", "gpt-4o"]


def _error_fields(status: int, sc: Scenario | None) -> tuple[str, str | None, str]:
    etype, code, message = _ERRORS.get(
        status,
        ("server_error", None, "Server error.")
        if status >= 500
        else ("invalid_request_error", None, "Request failed."),
    )
    if sc is not None:
        etype = sc.error_type or etype
        code = sc.error_code if sc.error_code is not None else code
        message = sc.error_message or message
    return etype, code, message


class OpenAIFake(FakeServer):
    name = "openai-fake"
    request_id_header = "x-request-id"
    base_path = "/v1"

    def route(self, method: str, path: str) -> Handler | None:
        if method == "POST" and path == "/v1/chat/completions":
            return self._chat
        if method == "GET" and path == "/v1/models":
            return self._models
        return None

    def is_generation(self, req: Request) -> bool:
        return req.method == "POST" and req.path == "/v1/chat/completions"

    def error_body(
        self, status: int, scenario: Scenario | None, *, mid_stream: bool = False
    ) -> dict[str, Any]:
        etype, code, message = _error_fields(status, scenario)
        if mid_stream:
            return {"error": {"message": message, "type": etype, "code": code}}
        return {"error": {"message": message, "type": etype, "param": None, "code": code}}

    def malformed_event(self) -> bytes:
        return (
            b'data: {"id":"chatcmpl-broken","object":"chat.completion.chunk","choices":[{"ind\n\n'
        )

    def error_event(self, scenario: Scenario) -> bytes:
        return b"data: " + dumps(self.error_body(500, scenario, mid_stream=True)) + b"\n\n"

    # -- handlers -------------------------------------------------------------------------
    async def _models(self, conn: _Conn, req: Request, attempt: Attempt) -> bool:
        names = list(dict.fromkeys([*MODELS, *self.for_model]))
        data = [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
            for m in names
        ]
        return await self.send_json(conn, req, attempt, 200, {"object": "list", "data": data})

    async def _chat(self, conn: _Conn, req: Request, attempt: Attempt) -> bool:
        body = attempt.body
        if not isinstance(body, dict):
            err = self.error_body(400, None)
            err["error"]["message"] = "We could not parse the JSON body of your request."
            return await self.send_json(conn, req, attempt, 400, err)
        sc = attempt.scenario
        model = sc.model or attempt.model or "gpt-4o-mini"
        cid = random_id("chatcmpl-", 29)
        created = int(time.time())
        fingerprint = random_id("fp_", 10).lower()
        usage = {
            "prompt_tokens": sc.input_tokens,
            "completion_tokens": sc.completion_tokens,
            "total_tokens": sc.input_tokens + sc.completion_tokens,
        }
        if not attempt.stream:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": sc.text if sc.chunks or not sc.tool_calls else None,
                "refusal": None,
                "annotations": [],
            }
            if sc.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": t.id,
                        "type": "function",
                        "function": {"name": t.name, "arguments": "".join(t.arguments)},
                    }
                    for t in sc.tool_calls
                ]
            obj = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": sc.finish_reason,
                    }
                ],
                "usage": usage,
                "system_fingerprint": fingerprint,
            }
            return await self.send_body_nonstream(conn, req, attempt, obj)

        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and (
            stream_options.get("include_usage") is True
        )

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": fingerprint,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                obj["usage"] = None
            return b"data: " + dumps(obj) + b"\n\n"

        first_content: str | None = "" if sc.chunks or not sc.tool_calls else None
        items: list[tuple[str, bytes]] = [
            ("s", chunk({"role": "assistant", "content": first_content, "refusal": None}))
        ]
        items += [("c", chunk({"content": text})) for text in sc.chunks]
        for i, t in enumerate(sc.tool_calls):
            start = {
                "index": i,
                "id": t.id,
                "type": "function",
                "function": {"name": t.name, "arguments": ""},
            }
            items.append(("c", chunk({"tool_calls": [start]})))
            items += [
                ("c", chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
                for piece in t.arguments
            ]
        items.append(("f", b""))
        items.append(("s", chunk({}, sc.finish_reason)))
        if include_usage:
            final = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": fingerprint,
                "choices": [],
                "usage": usage,
            }
            items.append(("s", b"data: " + dumps(final) + b"\n\n"))
        items.append(("d", b"data: [DONE]\n\n"))
        return await self.stream_items(conn, req, attempt, items)
