"""Request bodies, validated strictly: a wrong type is the client's bug, not ours to guess.

Unknown fields are ignored (OpenAI SDKs send parameters the gateway does not
use); known ones are checked for type and range so that a bad value gets a
400 naming the field instead of an upstream's error or a 500.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.relay.structured import check_schema
from app.requests import ChatRequest

MAX_TOKENS_LIMIT = 1_000_000
MAX_STOP = 4  # OpenAI's own limit


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str = Field(min_length=1)  # https:// or data:<type>;base64,...
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class ToolCallFunction(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.role == "assistant":
            if self.content is None and not self.tool_calls:
                raise ValueError("an assistant message needs content or tool_calls")
        elif self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        # A field validator, so that the error's param is "stop".
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} sequences")
        return value

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else self.stop


# Passed through to OpenAI-kind upstreams as they are.
_PASSTHROUGH = (
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "parallel_tool_calls",
    "logit_bias",
)


def check_response_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's shape: ``{"type": "text" | "json_object"}`` or ``{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}`` with a schema that is itself valid."""
    if value is None:
        return None
    kind = value.get("type")
    if kind in ("text", "json_object"):
        return value
    if kind != "json_schema":
        raise ValueError("type must be 'text', 'json_object' or 'json_schema'")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError("json_schema must be an object with a 'name' and a 'schema'")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise ValueError("json_schema.schema must be a JSON Schema object")
    check_schema(schema)
    return value


class ChatCompletionBody(_Sampling):
    model: str | None = Field(default=None, min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    parallel_tool_calls: bool | None = None
    logit_bias: dict[str, int] | None = None

    _format = field_validator("response_format")(check_response_format)

    def to_request(self, request_id: str, endpoint: str) -> ChatRequest:
        return ChatRequest(
            model="",
            messages=[m.model_dump(exclude_none=True) for m in self.messages],
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop_list(),
            tools=[t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None,
            tool_choice=self.tool_choice,
            response_format=self.response_format,
            extra={k: v for k in _PASSTHROUGH if (v := getattr(self, k)) is not None},
            request_id=request_id,
            endpoint=endpoint,
        )


class SimpleChatBody(_Sampling):
    """The simple protocol: ``prompt`` or ``messages``, plus optional knobs."""

    prompt: str | None = None
    messages: list[Message] | None = None
    model: str | None = Field(default=None, min_length=1)
    system: str | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    _format = field_validator("response_format")(check_response_format)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> SimpleChatBody:
        if self.prompt is None and self.messages is None:
            raise ValueError("prompt or messages is required")
        if self.prompt is not None and self.messages is not None:
            raise ValueError("send prompt or messages, not both")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self

    def to_request(self, request_id: str, endpoint: str) -> ChatRequest:
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        if self.prompt is not None:
            messages.append({"role": "user", "content": self.prompt})
        else:
            messages += [m.model_dump(exclude_none=True) for m in self.messages or ()]
        return ChatRequest(
            model="",
            messages=messages,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            stop=self.stop_list(),
            tools=[t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None,
            tool_choice=self.tool_choice,
            response_format=self.response_format,
            request_id=request_id,
            endpoint=endpoint,
        )


class FanoutBody(SimpleChatBody):
    """``/chat/fanout``: the simple protocol's body with ``models`` (2 or more) for ``model``."""

    models: list[Annotated[str, Field(min_length=1)]] = Field(min_length=2)

    @model_validator(mode="after")
    def _no_model(self) -> FanoutBody:
        if self.model is not None:
            raise ValueError("model: not used here; name the models to compare in 'models'")
        return self
