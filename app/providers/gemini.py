"""Google Gemini (``streamGenerateContent`` with ``alt=sse``) -> ProviderEvents.

The wire, from the Gemini API reference (v1beta):

- ``POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse`` with the
  key in the ``x-goog-api-key`` header, never in the URL (URLs get logged).
  ``{base}`` is ``GEMINI_BASE_URL`` (a base ending in ``/v1beta`` or ``/v1``
  is used as it is), else ``https://generativelanguage.googleapis.com``.
- The body: ``contents`` (roles ``user`` / ``model``; parts ``text``,
  ``inlineData``, ``fileData``, ``functionCall``, ``functionResponse``),
  ``systemInstruction``, ``generationConfig``, ``tools`` (function
  declarations), ``toolConfig``. ``build_body`` maps OpenAI's shape onto it.
- The answer: SSE ``data: {...}`` events separated by CRLF CRLF, each a whole
  ``GenerateContentResponse``. A function call arrives whole, in one part:
  it becomes one ``ToolCallDelta`` with a made-up id (``call_<hex>``), its
  name and all of its arguments (``"{}"`` for none, as OpenAI sends). The
  candidate's ``finishReason`` ends the answer; there is no ``[DONE]``, so a
  body that ends without one is a truncation (the relay reports it).
- Errors: ``{"error": {"code", "message", "status", "details"}}`` with the
  HTTP status; ``gemini_status`` reads them (a 400 ``API_KEY_INVALID`` is the
  gateway's key refused, ``RetryInfo`` stands in for a missing Retry-After).

Not supported, on purpose: continuing a partial answer. Gemini has no
documented prefill, so ``accepts_continuation`` stays False for it (a broken
Gemini answer can still be continued by another target). Gemini's thought
signatures cannot travel through OpenAI-shaped history: function calls sent
back carry Google's documented placeholder instead (``SKIP_SIGNATURE``).

No SDK is involved (google-genai is not a dependency): the request is built
here and sent by the shared ``UpstreamSession``; chunks are decoded with our
SSE decoder and orjson, and normalised by ``GeminiNormaliser`` (pure).
"""

from __future__ import annotations

import mimetypes
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from app.config import ProviderConfig, Settings
from app.errors import GatewayError, InvalidRequest, UpstreamAuthFailed, UpstreamStatus
from app.events import Finish, FinishReason, ProviderEvent, Start, TextDelta, ToolCallDelta, Usage
from app.providers.errors import (
    GENERIC,
    Scrubber,
    parse_retry_after,
    reject_reason,
    truncated,
    untranslatable,
)
from app.providers.http import HTTPProvider, UpstreamSession, read_chunks, release
from app.providers.sse import SSEDecoder
from app.requests import ChatRequest

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
API_VERSION = "v1beta"

FINISH_REASONS: dict[str, FinishReason] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
}

# Gemini 3 refuses a function call in the history without the thought signature
# it came with (400 "Function call is missing a thought_signature"). OpenAI-shaped
# history cannot carry one, so calls sent back carry the placeholder Google
# documents for calls it did not sign (ai.google.dev/gemini-api/docs/thought-signatures,
# FAQ); the model's reasoning between tool turns is not kept.
SKIP_SIGNATURE = "skip_thought_signature_validator"


# -- the request -----------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def _data_url(url: str) -> dict[str, Any] | None:
    """``data:<mime>;base64,<data>`` -> an ``inlineData`` part."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    mime, data = url[5:].split(";base64,", 1)
    return {"inlineData": {"mimeType": mime or "application/octet-stream", "data": data}}


def _file_part(url: str) -> dict[str, Any]:
    part = _data_url(url)
    if part is not None:
        return part
    # A URL Gemini fetches itself (File API, YouTube, public HTTP); it says so when it cannot.
    ref: dict[str, Any] = {"fileUri": url}
    mime = mimetypes.guess_type(url.split("?", 1)[0])[0]
    if mime:
        ref["mimeType"] = mime
    return {"fileData": ref}


def _parts(content: Any) -> list[dict[str, Any]]:
    """OpenAI content (text or parts) -> Gemini parts; unknown part types are left out."""
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for part in content or ():
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            parts.append(_file_part((part.get("image_url") or {}).get("url", "")))
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            mime = f"audio/{audio.get('format') or 'wav'}"
            parts.append({"inlineData": {"mimeType": mime, "data": audio.get("data", "")}})
        elif kind == "file":
            found = _data_url((part.get("file") or {}).get("file_data") or "")
            if found is not None:
                parts.append(found)
    return parts


def _args(arguments: Any) -> dict[str, Any]:
    """A call's arguments (JSON text) -> the object Gemini's ``args`` must be."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _response(content: Any) -> dict[str, Any]:
    """A tool message's content -> ``functionResponse.response`` (an object)."""
    text = _text_of(content)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"output": text}
    # Google's convention: the result under "output" (or a failure under "error").
    return value if isinstance(value, dict) else {"output": value}


def to_gemini(messages: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """OpenAI-shaped messages -> (systemInstruction, contents). Pure.

    Consecutive turns of one role are merged (Gemini wants them alternating);
    a tool result is a ``functionResponse`` in a user turn, named after the
    call it answers (Gemini matches results to calls by name, not by id).
    """
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for msg in messages:
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content))
        elif role == "assistant":
            parts = _parts(content)
            for i, call in enumerate(msg.get("tool_calls") or ()):
                fn = call.get("function") or {}
                name = fn.get("name") or ""
                if call.get("id"):
                    names[call["id"]] = name
                part: dict[str, Any] = {
                    "functionCall": {"name": name, "args": _args(fn.get("arguments"))}
                }
                if i == 0:  # parallel calls: only the first is signed
                    part["thoughtSignature"] = SKIP_SIGNATURE
                parts.append(part)
            add("model", parts)
        elif role in ("tool", "function"):  # "function": the legacy form, named
            name = names.get(msg.get("tool_call_id") or "") or msg.get("name")
            if not name:
                raise InvalidRequest(
                    "a tool message answers a tool_call_id that no earlier assistant "
                    "message called (Gemini needs the function's name)",
                    code="untranslatable_request",
                    param="messages",
                )
            add("user", [{"functionResponse": {"name": name, "response": _response(content)}}])
        else:
            add("user", _parts(content))
    text = "\n\n".join(s for s in system if s)
    return ({"parts": [{"text": text}]} if text else None), contents


def _declaration(fn: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": fn.get("name")}
    if fn.get("description"):
        out["description"] = fn["description"]
    params = fn.get("parameters")
    # A function without parameters leaves them unset (Gemini refuses an object
    # schema with no properties in some versions); JSON Schema is taken as is.
    if isinstance(params, dict) and (
        params.get("properties") or params.get("type", "object") != "object"
    ):
        out["parametersJsonSchema"] = params
    return out


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice == "auto":
        mode: dict[str, Any] = {"mode": "AUTO"}
    elif choice == "none":
        mode = {"mode": "NONE"}
    elif choice == "required":
        mode = {"mode": "ANY"}
    elif isinstance(choice, dict) and (choice.get("function") or {}).get("name"):
        mode = {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    else:
        return None
    return {"functionCallingConfig": mode}


def build_body(request: ChatRequest) -> dict[str, Any]:
    """The ``GenerateContentRequest`` for ``request``. Pure."""
    system, contents = to_gemini(request.messages)
    body: dict[str, Any] = {"contents": contents}
    if system is not None:
        body["systemInstruction"] = system
    config: dict[str, Any] = {}
    if request.max_tokens is not None:
        config["maxOutputTokens"] = request.max_tokens
    if request.temperature is not None:
        config["temperature"] = request.temperature  # 0..2, as OpenAI's
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.stop:
        config["stopSequences"] = request.stop
    fmt = request.response_format or {}
    if fmt.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema")
        if fmt["type"] == "json_schema" and isinstance(schema, dict):
            # JSON Schema as the client wrote it (responseSchema takes only an OpenAPI subset).
            config["responseJsonSchema"] = schema
    if config:
        body["generationConfig"] = config
    functions = [
        _declaration(t["function"])
        for t in request.tools or ()
        if t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
    ]
    if functions:
        body["tools"] = [{"functionDeclarations": functions}]
        tool_config = _tool_config(request.tool_choice)
        if tool_config is not None:
            body["toolConfig"] = tool_config
    return body


def model_path(model: str) -> str:
    """``models/<id>`` (or ``tunedModels/<id>``), the id one escaped path segment.

    Model ids come from clients: a ``/``, ``?`` or ``:`` in one must not reach
    another path or method of the API.
    """
    name = model.removeprefix("models/")
    prefix = "models/"
    if name.startswith("tunedModels/"):
        prefix, name = "tunedModels/", name[len("tunedModels/") :]
    return prefix + quote(name, safe="")


# -- errors ------------------------------------------------------------------------------

# "The input token count (1234567) exceeds the maximum number of tokens allowed (1048576)."
_CONTEXT_TEXT = re.compile(r"token count.*exceeds the maximum", re.IGNORECASE | re.DOTALL)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def _error_object(body: Any) -> dict[str, Any]:
    # Without alt=sse Google wraps everything in a JSON array, errors included.
    if isinstance(body, list) and body:
        body = body[0]
    err = body.get("error") if isinstance(body, dict) else None
    return err if isinstance(err, dict) else {}


def gemini_error(
    status: int,
    err: dict[str, Any],
    retry_after: str | None,
    provider: str,
    scrubber: Scrubber = GENERIC,
) -> GatewayError:
    """Google's error object (``{"code", "message", "status", "details"}``) -> GatewayError."""
    details = [d for d in err.get("details") or () if isinstance(d, dict)]
    reasons = {d.get("reason") for d in details}
    raw = err.get("message")
    if (
        status in (401, 403)
        or "API_KEY_INVALID" in reasons
        or "api key not valid" in str(raw or "").lower()
    ):
        # Gemini answers a bad key with a 400: still the gateway's key, not the client's fault.
        return UpstreamAuthFailed(
            f"provider '{provider}' refused the gateway's credentials (HTTP {status}); "
            "check its API key setting",
            code="upstream_auth_failed",
        )
    message = scrubber(str(raw)) if raw else None
    code = scrubber(str(err["status"]).lower())[:200] if err.get("status") else None
    if message and _CONTEXT_TEXT.search(message) and 400 <= status < 500:
        code = "context_length_exceeded"
    reason, code = reject_reason(status, code, message)
    param = None
    delay = None
    for d in details:
        for violation in d.get("fieldViolations") or ():
            if param is None and isinstance(violation, dict) and violation.get("field"):
                param = scrubber(str(violation["field"]))[:200]
        found = _DURATION.match(str(d.get("retryDelay") or ""))
        if found:
            delay = found.group(1)
    return UpstreamStatus(
        message or f"provider '{provider}' answered HTTP {status}",
        upstream_status=status,
        error_type="rate_limit_error" if status == 429 else None,
        code=code,
        param=param,
        # The header when there is one; Google usually says it in RetryInfo only.
        retry_after=parse_retry_after(retry_after or delay),
        reason=reason,
    )


def gemini_status(
    status: int, body: bytes, retry_after: str | None, provider: str, scrubber: Scrubber = GENERIC
) -> GatewayError:
    """An error status before the stream (``UpstreamSession``'s ``status_mapper``)."""
    try:
        parsed: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    return gemini_error(status, _error_object(parsed), retry_after, provider, scrubber)


# -- the answer --------------------------------------------------------------------------


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class GeminiNormaliser:
    """Feed decoded ``GenerateContentResponse`` objects in order; get ProviderEvents. No I/O."""

    __slots__ = ("_calls", "_input_known", "provider", "scrub")

    def __init__(self, provider: str = "gemini", scrubber: Scrubber = GENERIC) -> None:
        self._calls = 0  # function calls so far: the next one's index
        self._input_known = False
        self.provider = provider
        self.scrub = scrubber

    def feed(self, obj: dict[str, Any]) -> list[ProviderEvent]:
        events: list[ProviderEvent] = []
        reason: str | None = None
        candidates = obj.get("candidates")
        if candidates:
            cand = candidates[0]  # one candidate asked for (candidateCount unset)
            content = cand.get("content")
            if content:
                for part in content.get("parts") or ():
                    text = part.get("text")
                    if text:
                        if not part.get("thought"):  # thought summaries are not the answer
                            events.append(TextDelta(text))
                        continue
                    call = part.get("functionCall")
                    if call is not None:
                        args = call.get("args")
                        events.append(
                            ToolCallDelta(
                                index=self._calls,
                                id=new_call_id(),
                                name=call.get("name"),
                                arguments=orjson.dumps(args).decode() if args else "{}",
                            )
                        )
                        self._calls += 1
            reason = cand.get("finishReason")
        elif "error" in obj:
            err = obj["error"] if isinstance(obj["error"], dict) else {}
            code = err.get("code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            raise gemini_error(status, err, None, self.provider, self.scrub)
        else:
            # A prompt refused before any candidate: no finishReason, only this.
            feedback = obj.get("promptFeedback")
            if feedback and feedback.get("blockReason"):
                reason = "SAFETY"
        usage = obj.get("usageMetadata")
        if reason:
            if usage:
                events.append(_usage(usage, final=True))
            finish = FINISH_REASONS.get(reason, "stop")
            events.append(Finish("tool_calls" if finish == "stop" and self._calls else finish))
        elif usage and not self._input_known and usage.get("promptTokenCount") is not None:
            # Every chunk repeats the usage: the prompt's count is taken once, early
            # (a cut later still reports it), the rest with the finish.
            self._input_known = True
            events.append(_usage(usage, final=False))
        return events


def _usage(usage: dict[str, Any], *, final: bool) -> Usage:
    inputs = usage.get("promptTokenCount")
    if inputs is not None:
        inputs += usage.get("toolUsePromptTokenCount") or 0
    if not final:
        return Usage(inputs, None)
    # Thinking is output the model was paid for, as OpenAI counts reasoning tokens.
    output = (usage.get("candidatesTokenCount") or 0) + (usage.get("thoughtsTokenCount") or 0)
    return Usage(inputs, output)


def model_ids(listing: Any) -> list[str]:
    """``{"models": [{"name": "models/<id>", "supportedGenerationMethods"}]}`` -> the ids
    that can generate content (embedding models are listed too)."""
    models = listing.get("models") if isinstance(listing, dict) else None
    if not isinstance(models, list):
        return []
    ids = []
    for m in models:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            continue
        methods = m.get("supportedGenerationMethods")
        if isinstance(methods, list) and "generateContent" not in methods:
            continue
        ids.append(m["name"].removeprefix("models/"))
    return ids


# -- the provider ------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RestIdentity:
    """What ``UpstreamSession`` takes from an SDK client: where to call, with which headers."""

    base_url: str
    default_headers: dict[str, str]
    auth_headers: dict[str, str]


def api_base(base_url: str | None) -> str:
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    return base if base.endswith(("/v1beta", "/v1")) else f"{base}/{API_VERSION}"


class GeminiProvider(HTTPProvider):
    def __init__(self, name: str, config: ProviderConfig, settings: Settings) -> None:
        self.name = name
        connect = config.connect_timeout_s or settings.connect_timeout_s
        auth = {"x-goog-api-key": config.api_key.get_secret_value()} if config.api_key else {}
        identity = RestIdentity(
            api_base(config.base_url), {"Content-Type": "application/json"}, auth
        )
        self._http = UpstreamSession(
            name,
            identity,
            connect,
            Scrubber.for_settings(settings),
            status_mapper=gemini_status,
        )

    async def list_models(self) -> list[str]:
        # One page of up to 1000 holds every model Google serves.
        return model_ids(await self._http.get_json("/models?pageSize=1000"))

    async def stream(self, request: ChatRequest) -> AsyncIterator[list[ProviderEvent]]:
        body = untranslatable(self.name, build_body, request)
        path = f"/{model_path(request.model)}:streamGenerateContent?alt=sse"
        resp = await self._http.post_stream(path, body)
        complete = False
        try:
            yield [Start()]
            decoder = SSEDecoder()
            norm = GeminiNormaliser(self.name, self._http.scrub)
            async for chunk in read_chunks(resp, self.name):
                events: list[ProviderEvent] = []
                failure: GatewayError | None = None
                for _name, data in decoder.feed(chunk):
                    try:
                        events += norm.feed(orjson.loads(data))
                    except GatewayError as exc:  # an error object inside the stream
                        failure = exc
                        break
                    except (ValueError, AttributeError, TypeError, KeyError, IndexError):
                        # Not JSON, or not a response's shape: what it carried is
                        # unknown, so skipping it could hide lost text: a cut.
                        failure = truncated(self.name, "an unparseable chunk")
                        break
                if events:  # what came before the failure in this read is still relayed
                    yield events
                if failure is not None:
                    raise failure
            complete = True
        finally:
            release(resp, complete)
