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

import httpx2
import openai
import orjson

from app.config import ProviderConfig, Settings
from app.events import ChatEvent, Finish, FinishReason, Start, TextDelta, ToolCallDelta, Usage
from app.providers.base import ChatRequest
from app.providers.errors import in_band_error, map_sdk_error, truncated
from app.providers.sse import SSEDecoder

_JSON: Any = {"headers": {"Content-Type": "application/json"}}

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def normalise_chunk(obj: dict[str, Any]) -> list[ChatEvent]:
    """One ``chat.completion.chunk`` (already JSON-decoded) -> events. Pure."""
    if "error" in obj:
        raise in_band_error(obj["error"])
    events: list[ChatEvent] = []
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
    params.update(request.extra)
    return params


class OpenAIProvider:
    def __init__(self, name: str, config: ProviderConfig, settings: Settings) -> None:
        self.name = name
        connect = config.connect_timeout_s or settings.connect_timeout_s
        api_key = config.api_key.get_secret_value() if config.api_key else "none"
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=config.base_url,
            max_retries=0,
            # Read timeouts are the relay's (first token, idle, total).
            timeout=httpx2.Timeout(connect=connect, read=None, write=connect, pool=connect),
            http_client=openai.DefaultAioHttpClient(
                limits=httpx2.Limits(max_connections=100_000, max_keepalive_connections=1_000),
            ),
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(self, request: ChatRequest) -> AsyncIterator[list[ChatEvent]]:
        params = build_params(request)
        try:
            # The SDK's typed create() walks every parameter through its
            # TypedDict transform (milliseconds per request); the params are
            # already plain JSON, so they go as bytes through the same client.
            upstream = await self._client.post(
                "/chat/completions",
                cast_to=object,
                content=orjson.dumps(params),
                options=_JSON,
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
        except openai.OpenAIError as exc:
            raise map_sdk_error(exc, self.name) from None
        try:
            yield [Start()]
            decoder = SSEDecoder()
            body = upstream.response.aiter_bytes()
            done = False
            try:
                async for chunk in body:
                    if done:
                        continue  # drain to the end so the connection can be reused
                    events: list[ChatEvent] = []
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
                        events += normalise_chunk(obj)
                    if events:
                        yield events
                    if bad:
                        # We cannot know what it carried, so skipping it could
                        # hide lost text: treat it like a cut.
                        raise truncated(self.name, "an unparseable chunk")
            except httpx2.HTTPError:
                raise truncated(self.name, "the connection was cut") from None
        finally:
            await upstream.close()
