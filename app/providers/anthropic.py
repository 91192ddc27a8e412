"""Anthropic Messages streaming -> ProviderEvents.

The request is sent by the official SDK; the event stream is decoded raw
(see ``app.providers.openai`` for why) and normalised by ``AnthropicNormaliser``,
a small state machine: Anthropic numbers content blocks, OpenAI numbers tool
calls, so block indexes are mapped to tool-call indexes as blocks start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import orjson

from app.config import ProviderConfig, Settings
from app.events import Finish, FinishReason, ProviderEvent, Start, TextDelta, ToolCallDelta, Usage
from app.providers.errors import GENERIC, Scrubber, in_band_error, truncated, untranslatable
from app.providers.http import HTTPProvider, UpstreamSession, read_chunks, release
from app.providers.sse import SSEDecoder
from app.requests import ChatRequest

DEFAULT_MAX_TOKENS = 4096
STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


# The tool that carries structured output (``response_format``): Anthropic has no
# JSON mode, so the schema becomes this tool's input schema and the model is made
# to call it; its input is relayed as the answer's text, as OpenAI sends JSON.
ANSWER_TOOL = "json_answer"


class AnthropicNormaliser:
    """Feed decoded stream events in order; get ProviderEvents out. No I/O.

    ``answer_tool``: the forced tool of structured output, whose input is text."""

    __slots__ = ("_answer", "_answer_tool", "_empty", "_tools", "done", "provider", "scrub")

    def __init__(
        self,
        provider: str = "anthropic",
        scrubber: Scrubber = GENERIC,
        answer_tool: str | None = None,
    ) -> None:
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        # Tool blocks with no argument piece yet: a call without arguments is "{}", as OpenAI's.
        self._empty: set[int] = set()
        self._answer_tool = answer_tool
        self._answer: int | None = None  # the block carrying structured output
        self.done = False
        self.provider = provider
        self.scrub = scrubber

    def feed(self, obj: dict[str, Any]) -> list[ProviderEvent]:
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj["delta"]
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = delta.get("text")
                return [TextDelta(text)] if text else []
            if dtype == "input_json_delta":
                block = obj.get("index", 0)
                piece = delta.get("partial_json") or ""
                if not piece:
                    return []
                self._empty.discard(block)
                if block == self._answer:
                    return [TextDelta(piece)]
                index = self._tools.get(block)
                if index is None:
                    return []
                return [ToolCallDelta(index=index, arguments=piece)]
            return []  # thinking, signatures, citations: not relayed
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            btype = block.get("type")
            if btype == "tool_use":
                at = obj.get("index", 0)
                self._empty.add(at)
                if self._answer_tool is not None and block.get("name") == self._answer_tool:
                    self._answer = at
                    return []
                index = self._tools[at] = len(self._tools)
                return [ToolCallDelta(index=index, id=block.get("id"), name=block.get("name"))]
            if btype == "text" and block.get("text"):
                return [TextDelta(block["text"])]
            return []
        if kind == "message_delta":
            events: list[ProviderEvent] = []
            usage = obj.get("usage")
            if usage:
                events.append(Usage(usage.get("input_tokens"), usage.get("output_tokens")))
            reason = (obj.get("delta") or {}).get("stop_reason")
            if reason:
                finish = STOP_REASONS.get(reason, "stop")
                if finish == "tool_calls" and self._answer is not None and not self._tools:
                    finish = "stop"  # only the structured-output tool was called: an answer
                events.append(Finish(finish))
            return events
        if kind == "message_start":
            usage = (obj.get("message") or {}).get("usage") or {}
            inputs = usage.get("input_tokens")
            if inputs is None:
                return []
            # Cached prompt tokens are still input tokens of this request.
            inputs += (usage.get("cache_read_input_tokens") or 0) + (
                usage.get("cache_creation_input_tokens") or 0
            )
            return [Usage(inputs, usage.get("output_tokens"))]
        if kind == "content_block_stop":
            block = obj.get("index", 0)
            if block in self._empty:
                self._empty.discard(block)
                if block == self._answer:
                    return [TextDelta("{}")]
                index = self._tools.get(block)
                if index is not None:
                    return [ToolCallDelta(index=index, arguments="{}")]
            return []
        if kind == "message_stop":
            self.done = True
            return []
        if kind == "error":
            raise in_band_error(obj, self.provider, self.scrub)
        return []  # ping, unknown future types


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content or ():
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                source = {"type": "base64", "media_type": media, "data": data}
            else:
                source = {"type": "url", "url": url}
            blocks.append({"type": "image", "source": source})
    return blocks


def to_anthropic(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """OpenAI-shaped messages -> (system, Anthropic messages). Pure."""
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for msg in messages:
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content))
        elif role == "assistant":
            blocks = _blocks(content)
            for call in msg.get("tool_calls") or ():
                fn = call.get("function") or {}
                try:
                    args = orjson.loads(fn.get("arguments") or "{}")
                except orjson.JSONDecodeError:
                    args = {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": fn.get("name"),
                        "input": args,
                    }
                )
            add("assistant", blocks)
        elif role == "tool":
            add(
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": msg.get("tool_call_id"),
                        "content": _text_of(content),
                    }
                ],
            )
        else:
            add("user", _blocks(content))
    return ("\n\n".join(s for s in system if s) or None), out


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        fn = tool.get("function") or {}
        entry = {
            "name": fn.get("name"),
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            entry["description"] = fn["description"]
        out.append(entry)
    return out


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice in (None, "auto"):
        return {"type": "auto"} if choice else None
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name:
            return {"type": "tool", "name": name}
    return None


def build_params(request: ChatRequest) -> dict[str, Any]:
    system, messages = to_anthropic(request.messages)
    params: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
        "stream": True,
    }
    if system:
        params["system"] = system
    if request.temperature is not None:
        # Anthropic's range is 0..1; OpenAI's 0..2.
        params["temperature"] = min(request.temperature, 1.0)
    if request.top_p is not None:
        params["top_p"] = request.top_p
    if request.stop:
        params["stop_sequences"] = request.stop
    if request.tools:
        params["tools"] = _tools(request.tools)
        choice = _tool_choice(request.tool_choice)
        if choice:
            params["tool_choice"] = choice
    schema = answer_schema(request.response_format)
    if schema is not None:
        # Structured output: one tool whose input is the answer, and the model must call it.
        tool = {
            "name": ANSWER_TOOL,
            "description": "Give the answer as this tool's input.",
            "input_schema": schema,
        }
        params["tools"] = [*params.get("tools", ()), tool]
        params["tool_choice"] = {"type": "tool", "name": ANSWER_TOOL}
    return params


def answer_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for (any object for ``json_object``)."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        # Anthropic refuses a tool input schema that is not an object, with a 400 that says so.
        return schema if isinstance(schema, dict) else {"type": "object"}
    if kind == "json_object":
        return {"type": "object"}
    return None


class AnthropicProvider(HTTPProvider):
    models_path = "/v1/models"

    def __init__(self, name: str, config: ProviderConfig, settings: Settings) -> None:
        self.name = name
        connect = config.connect_timeout_s or settings.connect_timeout_s
        api_key = config.api_key.get_secret_value() if config.api_key else "none"
        # The SDK client only lends its base URL and headers (see http.py).
        self._http = UpstreamSession(
            name,
            anthropic.AsyncAnthropic(api_key=api_key, base_url=config.base_url),
            connect,
            Scrubber.for_settings(settings),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[list[ProviderEvent]]:
        params = untranslatable(self.name, build_params, request)
        resp = await self._http.post_stream("/v1/messages", params)
        del params  # sent: not held for the stream's whole life
        complete = False
        try:
            yield [Start()]
            decoder = SSEDecoder()
            answer = ANSWER_TOOL if answer_schema(request.response_format) is not None else None
            norm = AnthropicNormaliser(self.name, self._http.scrub, answer)
            async for chunk in read_chunks(resp, self.name):
                if norm.done:
                    continue  # drain to the end so the connection can be reused
                events: list[ProviderEvent] = []
                bad = False
                for _name, data in decoder.feed(chunk):
                    try:
                        obj = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        bad = True
                        break
                    events += norm.feed(obj)
                if events:
                    yield events
                if bad:
                    # We cannot know what it carried, so skipping it could
                    # hide lost text: treat it like a cut.
                    raise truncated(self.name, "an unparseable chunk")
            complete = True
        finally:
            release(resp, complete)
