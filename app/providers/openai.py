"""OpenAI and OpenAI-compatible upstreams (vLLM, Ollama, llama.cpp's server, ...).

The official SDK builds and sends the request (auth, base URL, headers) over
aiohttp (``DefaultAioHttpClient``: httpx 0.28's pool does not scale to a
thousand upstream connections). The body is read raw: parsing every chunk
into the SDK's pydantic models costs ~100 µs a chunk, so chunks are decoded
with our SSE decoder and orjson and normalised by a pure function.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson

from app.config import ProviderConfig, Settings
from app.errors import UpstreamStatus
from app.events import Finish, FinishReason, ProviderEvent, Start, TextDelta, ToolCallDelta, Usage
from app.providers.errors import Scrubber, in_band_error, truncated, untranslatable
from app.providers.http import HTTPProvider, UpstreamSession, read_chunks, release
from app.providers.sse import SSEDecoder
from app.requests import ChatRequest

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def normalise_chunk(obj: dict[str, Any]) -> list[ProviderEvent]:
    """One ``chat.completion.chunk`` (already JSON-decoded) -> events. Pure."""
    if "error" in obj:
        raise in_band_error(obj["error"])
    events: list[ProviderEvent] = []
    for choice in obj.get("choices") or ():
        if choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        if delta:
            text = delta.get("content")
            if text:
                events.append(TextDelta(text))
            calls = delta.get("tool_calls")
            if calls:
                for call in calls:
                    fn = call.get("function") or {}
                    events.append(
                        ToolCallDelta(
                            index=call.get("index", 0),
                            id=call.get("id"),
                            name=fn.get("name"),
                            arguments=fn.get("arguments") or "",
                        )
                    )
        reason = choice.get("finish_reason")
        if reason:
            events.append(Finish(_FINISH.get(reason, "stop")))
    usage = obj.get("usage")
    if usage:
        events.append(Usage(usage.get("prompt_tokens"), usage.get("completion_tokens")))
    return events


def build_params(request: ChatRequest) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model": request.model,
        "messages": request.messages,
        "stream": True,
        # Usage arrives in a last chunk; the gateway always wants it (end event,
        # metrics) and drops it for clients that did not ask.
        "stream_options": {"include_usage": True},
    }
    if request.max_tokens is not None:
        params["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        params["temperature"] = request.temperature
    if request.top_p is not None:
        params["top_p"] = request.top_p
    if request.stop:
        params["stop"] = request.stop
    if request.tools:
        params["tools"] = request.tools
    if request.tool_choice is not None:
        params["tool_choice"] = request.tool_choice
    if request.response_format is not None:
        params["response_format"] = request.response_format
    params.update(request.extra)
    return params


# vLLM's (and SGLang's) switches for continuing the final assistant message
# rather than answering it; other servers ignore unknown fields or reject them,
# which is why continuation is opt-in per provider.
CONTINUE_PARAMS = {"continue_final_message": True, "add_generation_prompt": False}


class OpenAIProvider(HTTPProvider):
    def __init__(self, name: str, config: ProviderConfig, settings: Settings) -> None:
        self.name = name
        self.kind = config.kind
        connect = config.connect_timeout_s or settings.connect_timeout_s
        api_key = config.api_key.get_secret_value() if config.api_key else "none"
        # The SDK client only lends its base URL and headers (see http.py).
        self._http = UpstreamSession(
            name,
            openai.AsyncOpenAI(api_key=api_key, base_url=config.base_url),
            connect,
            Scrubber.for_settings(settings),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[list[ProviderEvent]]:
        params = untranslatable(self.name, build_params, request)
        if request.continuation and self.kind == "openai-compatible":
            params.update(CONTINUE_PARAMS)
        resp = await self._http.post_stream("/chat/completions", params)
        del params  # sent: not held for the stream's whole life
        complete = False
        try:
            yield [Start()]
            decoder = SSEDecoder()
            body = read_chunks(resp, self.name)
            done = False
            async for chunk in body:
                if done:
                    continue  # drain to the end so the connection can be reused
                events: list[ProviderEvent] = []
                bad = False
                for _name, data in decoder.feed(chunk):
                    if data == b"[DONE]":
                        done = True
                        break
                    try:
                        obj = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        bad = True
                        break
                    try:
                        events += normalise_chunk(obj)
                    except UpstreamStatus:
                        # An in-band error: mapped again with the configured
                        # secrets known (free in the loop until it raises).
                        raise in_band_error(obj["error"], self.name, self._http.scrub) from None
                if events:
                    yield events
                if bad:
                    # We cannot know what it carried, so skipping it could
                    # hide lost text: treat it like a cut.
                    raise truncated(self.name, "an unparseable chunk")
            complete = True
        finally:
            release(resp, complete)
