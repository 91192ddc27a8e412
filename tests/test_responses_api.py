"""``POST /v1/responses`` (OpenAI's Responses API, stateless) through the official SDK,
against the fake OpenAI and Anthropic upstreams; byte-level checks of the event
sequence with httpx; failure endings, disconnects and bad input."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import EventSource

from tests.fakes import Scenario, ToolCallSpec

OPENAI = "openai/gpt-4o-mini"
ANTHROPIC = "anthropic/claude-haiku-4-5"
MODELS = [OPENAI, ANTHROPIC]

TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}},
]
CALLS = [
    ToolCallSpec(id="call_1", name="get_weather", arguments=['{"ci', 'ty": "Par', 'is"}']),
    ToolCallSpec(id="call_2", name="get_time", arguments=["{}"]),
]
# get_time takes no arguments: OpenAI sends "{}", Anthropic no argument piece at all.
ANTHROPIC_CALLS = [CALLS[0], ToolCallSpec(id="call_2", name="get_time", arguments=[])]
TEXT_SEQUENCE = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
CALL_SEQUENCE = [
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
]


@pytest.fixture
def gw(make_gateway, openai_fake, anthropic_fake):
    return make_gateway(
        openai_fake=openai_fake,
        anthropic_fake=anthropic_fake,
        first_token_timeout_s=1.0,
        idle_timeout_s=0.5,
        total_timeout_s=10.0,
        connect_timeout_s=1.0,
        max_retries=0,
    )


@pytest.fixture
def client(gw):
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def fake_for(model, openai_fake, anthropic_fake):
    return openai_fake if model.startswith("openai/") else anthropic_fake


def events(gw, body: dict[str, Any]) -> tuple[httpx.Response, list[dict[str, Any]], str]:
    """A streamed response's events (``event:`` name checked against ``type``) and raw text."""
    with httpx.stream("POST", gw.url + "/v1/responses", json={"stream": True, **body}) as r:
        if r.status_code != 200:
            r.read()
            return r, [], r.text
        raw = []
        out = []
        for sse in EventSource(r).iter_sse():
            raw.append(f"event: {sse.event}\ndata: {sse.data}\n\n")
            data = sse.json()
            assert sse.event == data["type"]  # every event is named, as OpenAI sends them
            out.append(data)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return r, out, "".join(raw)


def types(evs: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evs]


# -- the SDK, text and usage -------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_sdk_stream_text_and_usage(client, openai_fake, anthropic_fake, model):
    fake = fake_for(model, openai_fake, anthropic_fake)
    fake.default = Scenario(chunks=["Hel", "lo", " there"], input_tokens=12, output_tokens=3)
    deltas = []
    with client.responses.stream(
        model=model, input="hi", instructions="Be brief.", max_output_tokens=50
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
                assert event.snapshot == "".join(deltas)  # the SDK accumulates as it goes
        final = stream.get_final_response()
    assert deltas == ["Hel", "lo", " there"]
    assert final.status == "completed" and final.output_text == "Hello there"
    assert final.model == model and final.id.startswith("resp_")
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 3)
    assert final.usage.total_tokens == 15
    assert final.instructions == "Be brief." and final.max_output_tokens == 50
    body = fake.attempts[0].body
    if fake is openai_fake:
        assert body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ]
        assert body["max_tokens"] == 50 and body["stream"] is True
    else:
        assert body["system"] == "Be brief." and body["max_tokens"] == 50


@pytest.mark.parametrize("model", MODELS)
def test_sdk_create_not_streamed(client, openai_fake, anthropic_fake, model):
    fake = fake_for(model, openai_fake, anthropic_fake)
    fake.default = Scenario(chunks=["Hello", " world"], input_tokens=5, output_tokens=2)
    result = client.responses.create(model=model, input="hi", temperature=0.5)
    assert result.object == "response" and result.status == "completed"
    assert result.output_text == "Hello world" and result.model == model
    [item] = result.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert (result.usage.input_tokens, result.usage.output_tokens) == (5, 2)
    assert result.usage.total_tokens == 7 and result.temperature == 0.5


# -- tool calls --------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_sdk_stream_tool_calls(client, openai_fake, anthropic_fake, model):
    fake = fake_for(model, openai_fake, anthropic_fake)
    calls = CALLS if fake is openai_fake else ANTHROPIC_CALLS
    fake.default = Scenario(chunks=["Let me check."], tool_calls=calls, finish_reason="tool_calls")
    arg_deltas = []
    with client.responses.stream(model=model, input="weather?", tools=TOOLS) as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                arg_deltas.append(event.delta)
        final = stream.get_final_response()
    text, weather, clock = final.output
    assert text.type == "message" and final.output_text == "Let me check."
    assert (weather.type, weather.name, weather.call_id) == (
        "function_call",
        "get_weather",
        "call_1",
    )
    assert weather.arguments == '{"city": "Paris"}' and weather.status == "completed"
    assert (clock.name, clock.call_id) == ("get_time", "call_2")
    assert clock.arguments == "{}"  # a call without arguments, from either provider
    assert "".join(arg_deltas) == '{"city": "Paris"}{}'
    assert len(arg_deltas) >= 3  # in pieces, as the upstream sent them
    sent = fake.attempts[0].body
    if fake is openai_fake:
        assert sent["tools"][0] == {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": TOOLS[0]["parameters"],
            },
        }
    else:
        assert [t["name"] for t in sent["tools"]] == ["get_weather", "get_time"]


def test_tool_call_event_sequence_bytes(gw, openai_fake):
    openai_fake.default = Scenario(chunks=["Hi"], tool_calls=CALLS, finish_reason="tool_calls")
    r, evs, raw = events(gw, {"model": OPENAI, "input": "x", "tools": TOOLS})
    assert r.headers["content-type"].startswith("text/event-stream")
    calls = CALL_SEQUENCE[:1] + ["response.function_call_arguments.delta"] * 2 + CALL_SEQUENCE[1:]
    assert types(evs) == [
        *TEXT_SEQUENCE[:5],
        *TEXT_SEQUENCE[6:9],
        *calls,
        *CALL_SEQUENCE,
        "response.completed",
    ]
    added = evs[8]["item"]
    assert added["type"] == "function_call" and added["status"] == "in_progress"
    assert (added["name"], added["call_id"], added["arguments"]) == ("get_weather", "call_1", "")
    assert added["id"].startswith("fc_") and evs[8]["output_index"] == 1
    assert evs[9]["delta"] == '{"ci' and all(e["item_id"] == added["id"] for e in evs[9:13])
    assert evs[12]["arguments"] == '{"city": "Paris"}' and evs[12]["output_index"] == 1
    assert evs[13]["item"] == {**added, "status": "completed", "arguments": '{"city": "Paris"}'}
    assert evs[14]["item"]["name"] == "get_time" and evs[14]["output_index"] == 2
    assert evs[16]["arguments"] == "{}"
    done = evs[-1]["response"]
    assert [o["type"] for o in done["output"]] == ["message", "function_call", "function_call"]
    assert done["tools"][0]["name"] == "get_weather" and done["tool_choice"] == "auto"
    assert raw.startswith('event: response.created\ndata: {"type":"response.created",')


def test_input_items_become_chat_messages(client, openai_fake):
    """A second turn: the function_call comes back with its output, statelessly."""
    openai_fake.default = Scenario(chunks=["Sunny."])
    result = client.responses.create(
        model=OPENAI,
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Use metric units."},
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "noon"},
        ],
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        parallel_tool_calls=False,
    )
    assert result.output_text == "Sunny."
    assert result.text.format.type == "json_schema" and result.parallel_tool_calls is False
    sent = openai_fake.attempts[0].body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use metric units."},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "noon"},
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}},
    }
    assert sent["parallel_tool_calls"] is False


# -- the event sequence, byte level --------------------------------------------------------


def test_text_event_sequence_bytes(gw, openai_fake):
    openai_fake.default = Scenario(chunks=["a\n", "\u2028b"], input_tokens=4, output_tokens=2)
    r, evs, raw = events(gw, {"model": OPENAI, "input": "hi", "metadata": {"k": "v"}})
    assert types(evs) == TEXT_SEQUENCE
    created, progress = evs[0]["response"], evs[1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and not created["usage"]
    assert created["id"] == progress["id"] == evs[-1]["response"]["id"]
    item = evs[2]["item"]
    assert item == {
        "id": item["id"],
        "type": "message",
        "status": "in_progress",
        "content": [],
        "role": "assistant",
    }
    assert item["id"].startswith("msg_")
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    assert evs[3]["part"] == {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    assert [e["delta"] for e in evs[4:6]] == ["a\n", "\u2028b"]
    assert all(evs[i].items() >= where.items() for i in (3, 4, 5, 6, 7))
    assert evs[6]["text"] == "a\n\u2028b" and evs[7]["part"]["text"] == "a\n\u2028b"
    assert evs[8]["item"]["status"] == "completed"
    final = evs[-1]["response"]
    assert final["status"] == "completed" and final["error"] is None
    assert final["output"] == [evs[8]["item"]] and final["metadata"] == {"k": "v"}
    assert final["usage"] == {
        "input_tokens": 4,
        "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 6,
    }
    assert "\u2028" not in raw and "\\u2028" in raw  # escaped, as everywhere (app.wire.sse)
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-request-id"]


@pytest.mark.parametrize("model", MODELS)
def test_length_ends_incomplete(gw, client, openai_fake, anthropic_fake, model):
    fake = fake_for(model, openai_fake, anthropic_fake)
    fake.default = Scenario(chunks=["Once", " upon"], finish_reason="length")
    _r, evs, _raw = events(gw, {"model": model, "input": "story", "max_output_tokens": 2})
    assert types(evs) == [*TEXT_SEQUENCE[:-1], "response.incomplete"]
    assert evs[8]["item"]["status"] == "incomplete"
    last = evs[-1]["response"]
    assert last["status"] == "incomplete"
    assert last["incomplete_details"] == {"reason": "max_output_tokens"}
    result = client.responses.create(model=model, input="story", max_output_tokens=2)
    assert result.status == "incomplete" and result.output_text == "Once upon"
    assert result.incomplete_details.reason == "max_output_tokens"


# -- failures ----------------------------------------------------------------------------


def failed(evs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The error event and the failed response: always the last two, never a completion."""
    assert types(evs)[-2:] == ["error", "response.failed"]
    assert "response.completed" not in types(evs)
    error, response = evs[-2], evs[-1]["response"]
    assert error["error"]["code"] == error["code"] and error["error"]["message"] == error["message"]
    assert response["status"] == "failed"
    assert response["error"] == {"code": error["code"], "message": error["message"]}
    return error, response


@pytest.mark.parametrize("model", MODELS)
def test_cut_mid_stream_fails(gw, client, openai_fake, anthropic_fake, model):
    fake = fake_for(model, openai_fake, anthropic_fake)
    fake.default = Scenario(chunks=["a", "b", "c"], fault="cut", fault_after=2, input_tokens=9)
    _r, evs, _raw = events(gw, {"model": model, "input": "hi"})
    error, response = failed(evs)
    assert error["code"] == "upstream_truncated" and error["error"]["type"] == "upstream_truncated"
    texts = [e["delta"] for e in evs if e["type"] == "response.output_text.delta"]
    assert texts == ["a", "b"][: len(texts)]  # a prefix (see test_faults)
    if texts:  # the open item is not "done": it is listed as incomplete
        assert "response.output_item.done" not in types(evs)
        assert response["output"][0]["status"] == "incomplete"
    if fake is anthropic_fake:  # usage as far as known: Anthropic tells it at the start
        assert response["usage"]["input_tokens"] == 9
    # The SDK raises on the error event rather than end as if it had succeeded.
    got: list[str] = []
    with (
        pytest.raises(openai.APIError) as info,
        client.responses.stream(model=model, input="hi") as stream,
    ):
        got.extend(e.type for e in stream)
    assert "ended early" in str(info.value) or "truncat" in str(info.value)
    assert "response.completed" not in got


def test_stall_hits_the_idle_timeout(gw, openai_fake):
    openai_fake.default = Scenario(chunks=["a", "b", "c"], fault="stall", fault_after=2)
    started = time.monotonic()
    _r, evs, _raw = events(gw, {"model": OPENAI, "input": "hi"})
    error, _response = failed(evs)
    assert error["code"] == "timeout" and "idle" in error["message"]
    assert time.monotonic() - started < 3
    openai_fake.wait_closed(0, timeout=2)


def test_no_first_token_fails_like_openai(gw, openai_fake):
    """Accepted upstream, then silence: OpenAI's own failure shape, with no item at all."""
    openai_fake.default = Scenario(first_token_delay=5)
    _r, evs, _raw = events(gw, {"model": OPENAI, "input": "hi"})
    assert types(evs) == ["response.created", "response.in_progress", "error", "response.failed"]
    error, response = failed(evs)
    assert error["code"] == "timeout" and response["output"] == []
    openai_fake.wait_closed(0, timeout=2)


@pytest.mark.parametrize("model", MODELS)
def test_upstream_error_event_after_start(gw, openai_fake, anthropic_fake, model):
    fake = fake_for(model, openai_fake, anthropic_fake)
    fake.default = Scenario(
        chunks=["a", "b"],
        fault="error_event",
        fault_after=1,
        error_type="overloaded_error",
        error_message="Overloaded",
    )
    _r, evs, _raw = events(gw, {"model": model, "input": "hi"})
    error, _response = failed(evs)
    assert error["message"] == "Overloaded"


@pytest.mark.parametrize(("status", "expect"), [(500, 502), (503, 503), (429, 429)])
def test_upstream_status_before_the_stream(gw, client, openai_fake, status, expect):
    openai_fake.default = Scenario(fault="status", status=status)
    r, evs, _raw = events(gw, {"model": OPENAI, "input": "hi"})
    assert r.status_code == expect and evs == []
    assert set(r.json()["error"]) >= {"message", "type", "code"}
    with pytest.raises(openai.APIStatusError) as info:
        client.responses.create(model=OPENAI, input="hi", stream=True)
    assert info.value.status_code == expect
    with pytest.raises(openai.APIStatusError) as info:
        client.responses.create(model=OPENAI, input="hi")
    assert info.value.status_code == expect


def test_not_streamed_failure_is_an_http_error(gw, openai_fake):
    openai_fake.default = Scenario(chunks=["a", "b"], fault="cut", fault_after=1)
    r = httpx.post(gw.url + "/v1/responses", json={"model": OPENAI, "input": "hi"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_truncated"


def test_client_leaving_closes_the_upstream(gw, openai_fake):
    openai_fake.default = Scenario(chunks=[f"t{i}" for i in range(200)], interval=0.05)
    body = {"model": OPENAI, "input": "hi", "stream": True}
    with httpx.stream("POST", gw.url + "/v1/responses", json=body) as r:
        seen = 0
        for sse in EventSource(r).iter_sse():
            seen += sse.event == "response.output_text.delta"
            if seen == 3:
                break
    left = time.monotonic()
    assert openai_fake.wait_closed(0, timeout=3) - left < 1.0
    assert openai_fake.attempts[0].closed_by_client and not openai_fake.attempts[0].completed


# -- bad input ---------------------------------------------------------------------------


BAD: list[tuple[dict[str, Any], str]] = [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": ""}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    (
        {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
        "input[0].call_id",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
        "input[0].content[0].type",
    ),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "hi", "tools": [*TOOLS, {"type": "file_search"}]}, "tools[2].type"),
    ({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "hi", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice"),
]


def test_bad_input_is_400_naming_the_field(client, openai_fake):
    # One gateway for all the cases: each is a separate request, checked on its own.
    for body, param in BAD:
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=OPENAI, **body)
        err = info.value.body
        assert err["param"] == param, (body, err)
        assert err["message"].startswith(param + ":"), err
    assert openai_fake.attempts == []


def test_unknown_model_is_404_listing_the_available(client, openai_fake):
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="compat/nope", input="hi", stream=True)
    assert "compat/Qwen3-8B" in info.value.message and openai_fake.attempts == []
