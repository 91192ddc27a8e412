"""``POST /v1/messages``: Anthropic's Messages API, for every provider behind the gateway.

Auth is a Bearer key or Anthropic's ``x-api-key`` header; ``anthropic-version``
is accepted whatever its value, ``anthropic-beta`` ignored. The body is
validated as Anthropic's (``max_tokens`` required, content blocks by
``type``; a bad value is a 400 naming its field) and translated into the
gateway's OpenAI-shaped ``ChatRequest``:

- ``system`` (text or text blocks) -> a system message;
- ``text`` and ``image`` blocks (base64 -> a ``data:`` URL, or a URL) -> content parts;
- an assistant's ``tool_use`` -> ``tool_calls`` (its ``input`` as the arguments' JSON);
- a user's ``tool_result`` -> a ``tool`` message (before the turn's other content, as
  OpenAI needs it after the call); its text is the result (``is_error``: prefixed
  "Error: "), its images go to the user turn that follows;
- ``thinking``/``redacted_thinking`` blocks of earlier turns are dropped: they mean
  nothing to another model (the gateway never sends them);
- ``tools`` -> function tools; ``tool_choice`` auto/any/tool/none -> auto/required/
  the function/none (``disable_parallel_tool_use`` -> ``parallel_tool_calls: false``);
- ``stop_sequences`` -> ``stop``; ``temperature`` (0..1), ``top_p``;
  ``output_config.format`` (JSON schema) -> ``response_format``;
  ``top_k`` and ``metadata`` are accepted and not used.

The answer is ``app.wire.anthropic``'s: the streamed events, or one ``message``.
Errors before the stream are raised as ``GatewayError``; every refusal on this
path renders through ``app.wire.errors.error_body``, in Anthropic's shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Discriminator, Field, Tag, field_validator, model_validator
from starlette.background import BackgroundTask

from app.api.deps import (
    authed_x_api_key,
    client_id,
    collected,
    json_body,
    start_generation,
    validate,
    while_connected,
)
from app.api.schemas import MAX_TOKENS_LIMIT, _Body, check_response_format
from app.requests import ChatRequest
from app.wire.anthropic import MessagesStreamEncoder, collect_message
from app.wire.sse import dumps, sse_response

ENDPOINT = "/v1/messages"

router = APIRouter()


def _tag(value: Any) -> str | None:
    """A block's union member, by its ``type`` in brackets: ``deps.describe`` leaves bracketed
    steps out of an error's path (``content.0.id``, not ``content.0.tool_use.id``)."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind == "redacted_thinking":
        kind = "thinking"
    return f"[{kind}]" if isinstance(kind, str) else None


def _choose(expected: str) -> Discriminator:
    return Discriminator(
        _tag,
        custom_error_type="invalid_type",
        custom_error_message=f"type must be {expected}",
    )


class TextBlock(_Body):
    type: Literal["text"]
    text: str


class Base64Source(_Body):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class URLSource(_Body):
    type: Literal["url"]
    url: str = Field(min_length=1)


class ImageBlock(_Body):
    type: Literal["image"]
    source: Annotated[
        Annotated[Base64Source, Tag("[base64]")] | Annotated[URLSource, Tag("[url]")],
        _choose("'base64' or 'url'"),
    ]

    def part(self) -> dict[str, Any]:
        src = self.source
        url = src.url if isinstance(src, URLSource) else f"data:{src.media_type};base64,{src.data}"
        return {"type": "image_url", "image_url": {"url": url}}


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


ResultPart = Annotated[
    Annotated[TextBlock, Tag("[text]")] | Annotated[ImageBlock, Tag("[image]")],
    _choose("'text' or 'image'"),
]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ResultPart] = ""
    is_error: bool = False


class ThinkingBlock(_Body):
    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[
    Annotated[TextBlock, Tag("[text]")]
    | Annotated[ImageBlock, Tag("[image]")]
    | Annotated[ToolUseBlock, Tag("[tool_use]")]
    | Annotated[ToolResultBlock, Tag("[tool_result]")]
    | Annotated[ThinkingBlock, Tag("[thinking]")],
    _choose("'text', 'image', 'tool_use', 'tool_result' or 'thinking'"),
]
# Which blocks each role may send (Anthropic's own rule).
_ALLOWED = {
    "user": (TextBlock, ImageBlock, ToolResultBlock),
    "assistant": (TextBlock, ToolUseBlock, ThinkingBlock),
}


class InMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> InMessage:
        if isinstance(self.content, list):
            for i, block in enumerate(self.content):
                if not isinstance(block, _ALLOWED[self.role]):
                    raise ValueError(f"content.{i}: a {self.role} message cannot hold {block.type}")
        return self

    def to_openai(self) -> list[dict[str, Any]]:
        """This turn as OpenAI-shaped messages (none for a turn with nothing to say)."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        if self.role == "assistant":
            return self._assistant(self.content)
        out: list[dict[str, Any]] = []
        parts: list[dict[str, Any]] = []
        for block in self.content:
            if isinstance(block, TextBlock):
                parts.append({"type": "text", "text": block.text})
            elif isinstance(block, ImageBlock):
                parts.append(block.part())
            elif isinstance(block, ToolResultBlock):
                text, images = _result(block)
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": text})
                parts += images
        if parts:
            only_text = len(parts) == 1 and parts[0]["type"] == "text"
            out.append({"role": "user", "content": parts[0]["text"] if only_text else parts})
        return out

    @staticmethod
    def _assistant(blocks: list[Any]) -> list[dict[str, Any]]:
        text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
        calls = [
            {
                "id": b.id,
                "type": "function",
                "function": {"name": b.name, "arguments": orjson.dumps(b.input).decode()},
            }
            for b in blocks
            if isinstance(b, ToolUseBlock)
        ]
        if not text and not calls:
            return []
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = calls
        return [message]


def _result(block: ToolResultBlock) -> tuple[str, list[dict[str, Any]]]:
    """A tool result's text, and its images (a tool message holds text only)."""
    if isinstance(block.content, str):
        text, images = block.content, []
    else:
        text = "\n".join(p.text for p in block.content if isinstance(p, TextBlock))
        images = [p.part() for p in block.content if isinstance(p, ImageBlock)]
    return ("Error: " + text if block.is_error else text), images


class ToolDef(_Body):
    # Server tools (web search, code execution, ...) have their own types: not served here.
    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    input_schema: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, min_length=1)
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _tool_has_a_name(self) -> ToolChoice:
        if self.type == "tool" and self.name is None:
            raise ValueError("name: required when type is 'tool'")
        return self

    def to_openai(self) -> str | dict[str, Any]:
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class OutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    format: OutputFormat | None = None  # ``effort`` and the rest: not used


def _response_format(config: OutputConfig | None) -> dict[str, Any] | None:
    if config is None or config.format is None:
        return None
    spec = {"name": "output", "schema": config.format.schema_, "strict": True}
    return {"type": "json_schema", "json_schema": spec}


class MessagesBody(_Body):
    model: str | None = Field(default=None, min_length=1)  # none: the gateway's default
    max_tokens: int = Field(ge=1, le=MAX_TOKENS_LIMIT)
    messages: list[InMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # accepted, not used
    metadata: dict[str, Any] | None = None  # accepted, not used
    stream: bool = False
    output_config: OutputConfig | None = None

    @field_validator("output_config")
    @classmethod
    def _schema_is_valid(cls, value: OutputConfig | None) -> OutputConfig | None:
        # A field validator, so that the error's param is "output_config".
        check_response_format(_response_format(value))
        return value

    def to_request(self, request_id: str) -> ChatRequest:
        messages: list[dict[str, Any]] = []
        system = self.system
        if isinstance(system, list):
            system = "\n\n".join(b.text for b in system)
        if system:
            messages.append({"role": "system", "content": system})
        for message in self.messages:
            messages += message.to_openai()
        extra: dict[str, Any] = {}
        choice = self.tool_choice
        if self.tools and choice is not None and choice.disable_parallel_tool_use:
            extra["parallel_tool_calls"] = False
        return ChatRequest(
            model="",
            messages=messages,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop_sequences or None,
            tools=[t.to_openai() for t in self.tools] if self.tools else None,
            # Without tools there is nothing to choose (OpenAI refuses a choice alone).
            tool_choice=choice.to_openai() if self.tools and choice is not None else None,
            response_format=_response_format(self.output_config),
            extra=extra,
            request_id=request_id,
            endpoint=ENDPOINT,
        )


@router.post(ENDPOINT)
async def create_message(request: Request) -> Response:
    call = await authed_x_api_key(request)
    state, rid = call.state, call.rid
    body = validate(MessagesBody, await json_body(request))
    route = state.router.resolve(body.model)
    chat = body.to_request(rid)
    if not body.stream:
        opening = state.dispatch.start(client_id(request), route, chat)
        result = await while_connected(
            request, collected(opening, lambda events, model: collect_message(events, model=model))
        )
        # ``request-id``: where Anthropic's SDKs look for it (``_request_id``).
        headers = {"X-Request-ID": rid, "request-id": rid}
        return Response(dumps(result), media_type="application/json", headers=headers)
    gen = await start_generation(request, state, route, chat)
    encoder = MessagesStreamEncoder(model=gen.model, input_tokens=lambda: gen.input_tokens)
    return sse_response(
        encoder.stream(gen.events()),
        request_id=rid,
        ping_interval=state.settings.ping_interval_s,
        background=BackgroundTask(gen.aclose),
        headers={"request-id": rid},
    )
