"""Fake Google Gemini upstream (``streamGenerateContent?alt=sse``, ``generateContent``,
``GET /v1beta/models``), byte for byte as the Gemini API answers.

Wire details copied from Google's answers: each SSE event is ``data: <json>`` ended by
CRLF CRLF; the JSON has a space after each colon and none after a comma; every chunk
repeats ``usageMetadata`` (the prompt's count, the candidates' once known) and names the
``modelVersion``; the model is named in the path, not the body; a function call comes
whole in one part; a zero-argument call has no ``args``; the last chunk carries the
candidate's ``finishReason`` (here after the content, with an empty text part, as
Gemini 3 sends its final signature chunk). Errors are ``{"error": {"code", "message",
"status", "details"}}``; a bad key is a 400 with reason ``API_KEY_INVALID``.

The request is checked as Google does, loosely: unknown top-level or generationConfig
fields, roles other than user/model, empty contents or parts, and a missing or wrong
``x-goog-api-key`` (when ``api_key`` is set) are refused with Google's 400s. Only the SSE
form of streaming is spoken: without ``alt=sse`` the fake answers 400.

Scenario fields mean what they mean for the other fakes; ``finish_reason`` takes OpenAI
names (stop, length, tool_calls, content_filter) or a Gemini one as it is (RECITATION);
``error_type`` is Google's status string (RESOURCE_EXHAUSTED), ``error_code`` the
ErrorInfo reason in ``details`` (API_KEY_INVALID).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import parse_qs, unquote

from .scenario import Attempt, Scenario
from .server import FakeServer, Handler, Request, _Conn, random_id

FINISH_REASONS = {
    "stop": "STOP",
    "length": "MAX_TOKENS",
    "tool_calls": "STOP",
    "function_call": "STOP",
    "content_filter": "SAFETY",
}

# status -> (Google's status string, message)
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "Method doesn't allow unregistered callers."),
    404: ("NOT_FOUND", "models/unknown is not found for API version v1beta."),
    429: ("RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan."),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}

BAD_KEY = "API key not valid. Please pass a valid API key."

MODELS = ["gemini-2.5-flash", "gemini-2.5-pro"]
EMBEDDING_MODEL = "text-embedding-004"  # listed, but cannot generate content

_PATH = re.compile(
    r"^/v1beta/(models|tunedModels)/([^/:]+):(streamGenerateContent|generateContent)$"
)
_TOP_LEVEL = {
    "contents",
    "systemInstruction",
    "generationConfig",
    "tools",
    "toolConfig",
    "safetySettings",
    "cachedContent",
}
_GENERATION_CONFIG = {
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "candidateCount",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "thinkingConfig",
}
_PART_KINDS = {"text", "inlineData", "fileData", "functionCall", "functionResponse"}


def gdumps(obj: Any) -> bytes:
    """JSON as Google writes it in SSE: ``{"a": 1,"b": 2}``."""
    return json.dumps(obj, separators=(",", ": "), ensure_ascii=False).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + gdumps(obj) + b"\r\n\r\n"


def finish_reason(name: str) -> str:
    return FINISH_REASONS.get(name, name)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def _check(body: Any) -> str | None:
    """Why Google would refuse this request body, or None (field names in either of
    protobuf JSON's spellings, lowerCamel or snake_case, as Google accepts them)."""
    if not isinstance(body, dict):
        return "Invalid JSON payload received."
    for key in body:
        if _camel(key) not in _TOP_LEVEL:
            return f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
    for key in body.get("generationConfig") or body.get("generation_config") or {}:
        if _camel(key) not in _GENERATION_CONFIG:
            return (
                f'Invalid JSON payload received. Unknown name "{key}" at '
                "'generation_config': Cannot find field."
            )
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for i, content in enumerate(contents):
        if content.get("role") not in ("user", "model"):
            return f"Please use a valid role: user, model. (contents[{i}])"
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return (
                f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
            )
        for part in parts:
            if not _PART_KINDS & set(part):
                return f"* GenerateContentRequest.contents[{i}].parts: part has no data."
    return None


class GeminiFake(FakeServer):
    name = "gemini-fake"
    request_id_header = "x-goog-request-id"
    base_path = ""  # the provider adds /v1beta itself

    def __init__(self, default: Scenario | None = None, api_key: str | None = None) -> None:
        super().__init__(default)
        self.api_key = api_key

    def route(self, method: str, path: str) -> Handler | None:
        if method == "POST" and _PATH.match(path):
            return self._generate
        if method == "GET" and path == "/v1beta/models":
            return self._models
        return None

    def is_generation(self, req: Request) -> bool:
        return req.method == "POST" and _PATH.match(req.path) is not None

    def _record(self, conn: _Conn, req: Request) -> Attempt:
        # The model is named in the path; "stream" is the streaming method.
        body: Any = None
        if req.body:
            try:
                body = json.loads(req.body)
            except ValueError:
                body = None
        found = _PATH.match(req.path)
        model = unquote(found.group(2)) if found else None
        with self._cond:
            attempt = Attempt(
                index=len(self._attempts),
                method=req.method,
                path=req.path,
                headers=dict(req.headers),
                body=body,
                model=model,
                scenario=self._select(model, self.is_generation(req)),
                started=time.monotonic(),
                query=req.query,
                stream=found is not None and found.group(3) == "streamGenerateContent",
                connection_id=conn.cid,
            )
            self._attempts.append(attempt)
            conn.attempts.append(attempt)
            self._cond.notify_all()
        return attempt

    def error_body(
        self, status: int, scenario: Scenario | None, *, mid_stream: bool = False
    ) -> dict[str, Any]:
        gstatus, message = _ERRORS.get(
            status, ("INTERNAL" if status >= 500 else "FAILED_PRECONDITION", "Request failed.")
        )
        details: list[dict[str, Any]] = []
        if scenario is not None:
            gstatus = scenario.error_type or gstatus
            message = scenario.error_message or message
            if scenario.error_code is not None:
                details.append(
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": scenario.error_code,
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                )
            if status == 429 and scenario.retry_after is not None:
                details.append(
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{scenario.retry_after}s",
                    }
                )
        error: dict[str, Any] = {"code": status, "message": message, "status": gstatus}
        if details:
            error["details"] = details
        return {"error": error}

    def malformed_event(self) -> bytes:
        return b'data: {"candidates": [{"content": {"parts": [{"te\r\n\r\n'

    def error_event(self, scenario: Scenario) -> bytes:
        return sse(self.error_body(500, scenario, mid_stream=True))

    async def _refuse(
        self, conn: _Conn, req: Request, attempt: Attempt, message: str, reason: str | None = None
    ) -> bool:
        error: dict[str, Any] = {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}
        if reason is not None:
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": reason,
                    "domain": "googleapis.com",
                }
            ]
        return await self.send_json(conn, req, attempt, 400, {"error": error})

    def _key_refused(self, req: Request) -> bool:
        return self.api_key is not None and req.headers.get("x-goog-api-key") != self.api_key

    # -- handlers -------------------------------------------------------------------------
    async def _models(self, conn: _Conn, req: Request, attempt: Attempt) -> bool:
        if self._key_refused(req):
            return await self._refuse(
                conn,
                req,
                attempt,
                "API key not valid. Please pass a valid API key.",
                "API_KEY_INVALID",
            )
        names = list(dict.fromkeys([*MODELS, *self.for_model]))
        models: list[dict[str, Any]] = [
            {
                "name": f"models/{m}",
                "version": "001",
                "displayName": m,
                "inputTokenLimit": 1048576,
                "outputTokenLimit": 65536,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            }
            for m in names
        ]
        models.append(
            {
                "name": f"models/{EMBEDDING_MODEL}",
                "version": "004",
                "displayName": "Text Embedding 004",
                "supportedGenerationMethods": ["embedContent"],
            }
        )
        return await self.send_json(conn, req, attempt, 200, {"models": models})

    async def _generate(self, conn: _Conn, req: Request, attempt: Attempt) -> bool:
        if self._key_refused(req):
            return await self._refuse(
                conn,
                req,
                attempt,
                "API key not valid. Please pass a valid API key.",
                "API_KEY_INVALID",
            )
        problem = _check(attempt.body)
        if problem is None and attempt.stream and parse_qs(req.query).get("alt") != ["sse"]:
            problem = "this fake streams only with alt=sse"
        if problem is not None:
            return await self._refuse(conn, req, attempt, problem)
        sc = attempt.scenario
        model = sc.model or attempt.model or MODELS[0]
        rid = random_id("", 22)
        prompt = {
            "promptTokenCount": sc.input_tokens,
            "totalTokenCount": sc.input_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": sc.input_tokens}],
        }
        final_usage = {
            "promptTokenCount": sc.input_tokens,
            "candidatesTokenCount": sc.completion_tokens,
            "totalTokenCount": sc.input_tokens + sc.completion_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": sc.input_tokens}],
        }
        calls: list[dict[str, Any]] = []
        for t in sc.tool_calls:
            raw = "".join(t.arguments)
            call: dict[str, Any] = {"name": t.name}
            if raw:  # Gemini leaves "args" out of a call without arguments
                call["args"] = json.loads(raw)
            calls.append({"functionCall": call})
        reason = finish_reason(sc.finish_reason)

        def response(parts: list[dict[str, Any]], usage: dict[str, Any], finish: bool) -> Any:
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
            if finish:
                candidate["finishReason"] = reason
            candidate["index"] = 0
            return {
                "candidates": [candidate],
                "usageMetadata": usage,
                "modelVersion": model,
                "responseId": rid,
            }

        if not attempt.stream:
            parts = ([{"text": sc.text}] if sc.chunks or not calls else []) + calls
            return await self.send_body_nonstream(
                conn, req, attempt, response(parts, final_usage, True)
            )
        items: list[tuple[str, bytes]] = [
            ("c", sse(response([{"text": text}], prompt, False))) for text in sc.chunks
        ]
        if calls:  # parallel calls arrive together, one part each
            items.append(("c", sse(response(calls, prompt, False))))
        items.append(("f", b""))
        items.append(("s", sse(response([{"text": ""}], final_usage, True))))
        return await self.stream_items(conn, req, attempt, items)
