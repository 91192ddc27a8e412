"""``POST /v1/responses``: OpenAI's Responses API, stateless, for every provider.

The body becomes a ``ChatRequest`` in OpenAI's chat shape, so every provider
serves it: ``instructions`` -> a system message first; ``input`` (a string, or a
list of items) -> messages: message items by role (``developer`` as ``system``),
consecutive ``function_call`` items -> one assistant message's ``tool_calls``,
``function_call_output`` -> a ``tool`` message; function ``tools`` -> chat tools;
``tool_choice``; ``max_output_tokens``; ``text.format`` -> ``response_format``.
The answer is ``app.wire.responses``' (its events, or one ``response`` object).

Stateless (``store: false`` semantics whatever the client sends): what would need
stored state is refused with a 400 naming the field (``previous_response_id``,
``conversation``, ``background``, ``prompt``, ``item_reference`` items, file
ids), as are built-in tools (``tools[i].type``). Errors name the field the way
OpenAI does (``input[2].call_id``); ``reasoning`` items are dropped, since no
provider behind the gateway can use another's reasoning.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.background import BackgroundTask

from app.api.deps import (
    authed,
    client_id,
    collected,
    describe,
    json_body,
    start_generation,
    validate,
    while_connected,
)
from app.api.schemas import MAX_TOKENS_LIMIT, _Body, check_response_format
from app.errors import InvalidRequest
from app.requests import ChatRequest
from app.wire.responses import ResponsesStreamEncoder, collect_response
from app.wire.sse import dumps, sse_response

router = APIRouter()

ENDPOINT = "/v1/responses"
M = TypeVar("M", bound=BaseModel)

# Passed through to OpenAI-kind upstreams as they are (``ChatRequest.extra``).
_PASSTHROUGH = ("parallel_tool_calls", "user")


def _bad(param: str, message: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param, code=code)


def _check(model: type[M], data: Any, where: str) -> M:
    """``model`` validated from one element of a list; errors name it as ``where.field``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field = describe(exc)
        param = f"{where}.{field}" if field else where
        raise _bad(param, message.removeprefix(f"{field}: ") if field else message) from None


# -- input items ---------------------------------------------------------------


class InputText(_Body):
    type: Literal["input_text", "output_text"]
    text: str


class Refusal(_Body):
    type: Literal["refusal"]
    refusal: str


class InputImage(_Body):
    type: Literal["input_image"]
    image_url: str | None = Field(default=None, min_length=1)  # https:// or data:
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[dict[str, Any]]


def _text_parts(parts: list[dict[str, Any]], where: str) -> str:
    """Parts that can only be text (system messages, tool outputs), joined."""
    texts = []
    for j, raw in enumerate(parts):
        at = f"{where}[{j}]"
        if isinstance(raw, dict) and raw.get("type") == "refusal":
            texts.append(_check(Refusal, raw, at).refusal)
            continue
        if isinstance(raw, dict) and raw.get("type") not in ("input_text", "output_text"):
            raise _bad(f"{at}.type", f"{raw.get('type')!r} is not supported here; send text")
        texts.append(_check(InputText, raw, at).text)
    return "".join(texts)


def _user_parts(parts: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for j, raw in enumerate(parts):
        at = f"{where}[{j}]"
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind == "input_image":
            image = _check(InputImage, raw, at)
            if image.image_url is None:
                raise _bad(
                    f"{at}.image_url",
                    "required: the gateway keeps no files (file_id); send an https or data: URL",
                )
            url: dict[str, Any] = {"url": image.image_url}
            if image.detail:
                url["detail"] = image.detail
            out.append({"type": "image_url", "image_url": url})
        elif kind == "input_file":
            raise _bad(f"{at}.type", "input_file is not supported; send input_text or input_image")
        else:
            out.append({"type": "text", "text": _check(InputText, raw, at).text})
    return out


def _message(item: MessageItem, where: str) -> dict[str, Any]:
    content = item.content
    at = f"{where}.content"
    if item.role == "user":
        return {
            "role": "user",
            "content": content if isinstance(content, str) else _user_parts(content, at),
        }
    # Text only; "developer" is OpenAI's newer name for "system", which every provider takes.
    text = content if isinstance(content, str) else _text_parts(content, at)
    return {"role": "system" if item.role == "developer" else item.role, "content": text}


def to_messages(instructions: str | None, input_: str | list[Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` -> chat messages (OpenAI's shape). Pure."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(input_, str):
        messages.append({"role": "user", "content": input_})
        return messages
    calls: set[str] = set()
    for i, raw in enumerate(input_):
        where = f"input[{i}]"
        if not isinstance(raw, dict):
            raise _bad(where, "must be an object: a message, function_call or function_call_output")
        kind = raw.get("type", "message")
        if kind == "message":
            messages.append(_message(_check(MessageItem, raw, where), where))
        elif kind == "function_call":
            fc = _check(FunctionCallItem, raw, where)
            calls.add(fc.call_id)
            call = {
                "id": fc.call_id,
                "type": "function",
                "function": {"name": fc.name, "arguments": fc.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # one turn: text, then calls
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = _check(FunctionCallOutputItem, raw, where)
            if out.call_id not in calls:
                # Stateless: the call it answers must come with it, or no provider
                # can pair them.
                raise _bad(
                    f"{where}.call_id",
                    f"no function_call with call_id {out.call_id!r} earlier in input "
                    "(the gateway is stateless: send the function_call item too)",
                )
            output = out.output
            text = output if isinstance(output, str) else _text_parts(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": out.call_id, "content": text})
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _bad(
                f"{where}.type",
                "item_reference needs stored items and the gateway is stateless: send the "
                "items themselves (with the AI SDK: providerOptions.openai.store = false)",
                "unsupported_value",
            )
        else:
            raise _bad(
                f"{where}.type",
                f"unsupported input item type {kind!r}; "
                "expected message, function_call or function_call_output",
                "unsupported_value",
            )
    if not any(m["role"] != "system" for m in messages):
        raise _bad("input", "needs at least one message or function_call_output")
    return messages


# -- tools ---------------------------------------------------------------------


class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


def to_tools(tools: list[Any]) -> list[FunctionTool]:
    out = []
    for i, raw in enumerate(tools):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind != "function":
            raise _bad(
                f"tools[{i}].type",
                f"{kind!r} is not supported: the gateway serves function tools only "
                "(built-in tools such as web_search or file_search are OpenAI's own)",
                "unsupported_value",
            )
        out.append(_check(FunctionTool, raw, f"tools[{i}]"))
    return out


def chat_tool(tool: FunctionTool) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        fn["description"] = tool.description
    if tool.parameters is not None:
        fn["parameters"] = tool.parameters
    if tool.strict is not None:
        fn["strict"] = tool.strict
    return {"type": "function", "function": fn}


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice["name"]}}


def to_response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` (flat) -> chat's ``response_format`` (``json_schema`` nested)."""
    if fmt is None or fmt.get("type") != "json_schema":
        return fmt
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}


# -- the body ------------------------------------------------------------------


def _stateless(value: Any) -> Any:
    if value is not None:
        raise ValueError(
            "not supported: the gateway is stateless (store: false); "
            "send the whole conversation in input"
        )
    return value


class TextConfig(_Body):
    format: dict[str, Any] | None = None

    @field_validator("format")
    @classmethod
    def _format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        kind = value.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("type must be 'text', 'json_object' or 'json_schema'")
        if kind == "json_schema":
            # Flat here ({"type", "name", "schema", "strict"}), nested in chat's response_format.
            if not isinstance(value.get("name"), str) or not isinstance(value.get("schema"), dict):
                raise ValueError("a json_schema format needs a 'name' and a 'schema' object")
            try:
                check_response_format(to_response_format(value))
            except ValueError as exc:
                raise ValueError(str(exc).replace("json_schema.schema", "schema")) from None
        return value


class ResponsesBody(_Body):
    model: str | None = Field(default=None, min_length=1)
    input: str | list[Any]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None  # accepted; nothing is stored either way
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    background: bool | None = None

    _no_state = field_validator("previous_response_id", "conversation", "prompt")(_stateless)

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list[Any]) -> str | list[Any]:
        if not value or (isinstance(value, str) and not value.strip()):
            raise ValueError("must not be empty")
        return value

    @field_validator("background")
    @classmethod
    def _foreground(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("not supported: the gateway is stateless; stream instead")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, dict) and (
            value.get("type") != "function" or not isinstance(value.get("name"), str)
        ):
            raise ValueError(
                "'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}"
            )
        return value

    def format(self) -> dict[str, Any] | None:
        return self.text.format if self.text else None

    def to_request(self, request_id: str) -> tuple[ChatRequest, dict[str, Any]]:
        """The gateway's request, and the settings the response object repeats."""
        tools = to_tools(self.tools) if self.tools else []
        chat = ChatRequest(
            model="",
            messages=to_messages(self.instructions, self.input),
            max_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            tools=[chat_tool(t) for t in tools] or None,
            tool_choice=chat_tool_choice(self.tool_choice),
            response_format=to_response_format(self.format()),
            extra={k: v for k in _PASSTHROUGH if (v := getattr(self, k)) is not None},
            request_id=request_id,
            endpoint=ENDPOINT,
        )
        echo: dict[str, Any] = {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "temperature": self.temperature,
            "tool_choice": self.tool_choice or "auto",
            "tools": [t.model_dump() for t in tools],
            "top_p": self.top_p,
            "user": self.user,
        }
        if self.parallel_tool_calls is not None:
            echo["parallel_tool_calls"] = self.parallel_tool_calls
        if self.format() is not None:
            echo["text"] = {"format": self.format()}
        return chat, echo


# -- the route -----------------------------------------------------------------


@router.post(ENDPOINT)
async def create_response(request: Request) -> Response:
    call = await authed(request)
    state, rid = call.state, call.rid
    body = validate(ResponsesBody, await json_body(request))
    chat, echo = body.to_request(rid)
    route = state.router.resolve(body.model)
    if not body.stream:
        opening = state.dispatch.start(client_id(request), route, chat)
        result = await while_connected(
            request,
            collected(
                opening, lambda events, model: collect_response(events, model=model, echo=echo)
            ),
        )
        return Response(dumps(result), media_type="application/json", headers={"X-Request-ID": rid})
    gen = await start_generation(request, state, route, chat)
    encoder = ResponsesStreamEncoder(model=gen.model, echo=echo)
    return sse_response(
        encoder.stream(gen.events()),
        request_id=rid,
        ping_interval=state.settings.ping_interval_s,
        background=BackgroundTask(gen.aclose),
    )
