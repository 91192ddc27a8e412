"""``POST /v1/messages`` (Anthropic's Messages API) through the official Anthropic SDK.

The SDK's own helpers (``messages.stream`` with ``text_stream`` and
``get_final_message``, ``messages.create``) run unchanged against models of
every kind: the OpenAI fake, the Anthropic fake, the embedded model. The event
sequence is also checked byte by byte, and every failure ending must be
Anthropic's ``error`` event with nothing that looks like success after it.
"""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from pydantic import BaseModel

from app.errors import InvalidRequest, NotFound, UpstreamTimeout
from app.events import End, Error, RelayEvent, Start, TextDelta, ToolCallDelta
from app.wire.anthropic import MessagesStreamEncoder, collect_message, error_body
from tests.fakes import Scenario, ToolCallSpec

GPT = "openai/gpt-4o-mini"
CLAUDE = "anthropic/claude-haiku-4-5"
MSG = [{"role": "user", "content": "hi"}]
TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
]
# The second call has no arguments at all: its input must still be {}.
CALLS = [
    ToolCallSpec(id="call_1", name="get_weather", arguments=['{"ci', 'ty": "Par', 'is"}']),
    ToolCallSpec(id="call_2", name="get_time", arguments=[]),
]


@pytest.fixture
def gw(make_gateway, openai_fake, anthropic_fake):
    return make_gateway(
        openai_fake=openai_fake,
        anthropic_fake=anthropic_fake,
        first_token_timeout_s=1.0,
        idle_timeout_s=0.5,
        total_timeout_s=5.0,
        connect_timeout_s=1.0,
        max_retries=0,
    )


@pytest.fixture
def client(gw):
    with anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0) as c:
        yield c


def fake_for(model, openai_fake, anthropic_fake):
    return openai_fake if model.startswith("openai/") else anthropic_fake


def frames(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each SSE frame; comment lines (keep-alive pings) skipped."""
    out = []
    for block in raw.split(b"\n\n"):
        lines = [ln for ln in block.split(b"\n") if ln and not ln.startswith(b":")]
        if not lines:
            continue
        assert len(lines) == 2, block
        assert lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), block
        event, data = lines[0][7:].decode(), orjson.loads(lines[1][6:])
        assert data["type"] == event  # Anthropic's rule: the data names its own event
        out.append((event, data))
    return out


def post(gw, body, *, stream=True, **kw):
    return httpx.post(
        gw.url + "/v1/messages",
        json={"model": GPT, "max_tokens": 64, "messages": MSG, "stream": stream, **body},
        timeout=10,
        **kw,
    )


# -- the SDK, streamed and not ------------------------------------------------------------


def test_sdk_stream_text_usage_and_stop_reason(client, openai_fake):
    openai_fake.default = Scenario(chunks=["Hel", "lo", " there"], input_tokens=21, output_tokens=3)
    with client.messages.stream(
        model=GPT,
        max_tokens=50,
        system="Be brief.",
        messages=MSG,
        stop_sequences=["END"],
        # Sampling is no longer among this SDK's keywords; older SDKs and clients send it.
        extra_body={"temperature": 0.5, "top_p": 0.9},
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert texts == ["Hel", "lo", " there"]
    assert final.content[0].type == "text" and final.content[0].text == "Hello there"
    assert final.stop_reason == "end_turn" and final.stop_sequence is None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (21, 3)
    assert final.model == GPT and final.role == "assistant" and final.id.startswith("msg_")
    sent = openai_fake.attempts[0].body
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, *MSG]
    assert sent["max_tokens"] == 50 and sent["stop"] == ["END"]
    assert sent["temperature"] == 0.5 and sent["top_p"] == 0.9


def test_sdk_create_not_streamed(client, openai_fake):
    openai_fake.default = Scenario(
        chunks=["Bon", "jour"], finish_reason="length", input_tokens=9, output_tokens=2
    )
    message = client.messages.create(model=GPT, max_tokens=2, messages=MSG)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Bonjour"
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 2)
    assert message.model == GPT and message.type == "message"
    assert message._request_id  # the SDK reads Anthropic's request-id header


def test_anthropic_model_behind_the_gateway(client, anthropic_fake):
    anthropic_fake.default = Scenario(chunks=["Hi", "!"], input_tokens=7, output_tokens=2)
    system = [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]
    with client.messages.stream(
        model=CLAUDE, max_tokens=20, system=system, messages=MSG, extra_body={"top_k": 5}
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "Hi!" and final.model == CLAUDE
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 2)
    sent = anthropic_fake.attempts[0].body
    assert sent["system"] == "One.\n\nTwo." and sent["max_tokens"] == 20
    assert "top_k" not in sent  # accepted, not used


def test_structured_output_with_the_sdks_parse(client, openai_fake):
    class City(BaseModel):
        name: str
        population: int

    openai_fake.default = Scenario(chunks=['{"name": "Pa', 'ris", "population": 2100000}'])
    message = client.messages.parse(model=GPT, max_tokens=50, messages=MSG, output_format=City)
    assert message.parsed_output == City(name="Paris", population=2100000)
    sent = openai_fake.attempts[0].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"]["required"] == [
        "name",
        "population",
    ]


# -- tool use ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [GPT, CLAUDE])
def test_tool_use_round_trip(client, openai_fake, anthropic_fake, model):
    fake = fake_for(model, openai_fake, anthropic_fake)
    fake.default = Scenario(chunks=["Checking."], tool_calls=CALLS, finish_reason="tool_calls")
    with client.messages.stream(
        model=model,
        max_tokens=100,
        messages=[{"role": "user", "content": "Weather and time in Paris?"}],
        tools=TOOLS,
        tool_choice={"type": "auto"},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    weather, clock = final.content[1], final.content[2]
    assert weather.name == "get_weather" and weather.input == {"city": "Paris"}
    assert clock.name == "get_time" and clock.input == {}
    assert weather.id and clock.id and weather.id != clock.id

    # The same call, not streamed.
    message = client.messages.create(model=model, max_tokens=100, messages=MSG, tools=TOOLS)
    assert [(b.type, getattr(b, "input", None)) for b in message.content] == [
        ("text", None),
        ("tool_use", {"city": "Paris"}),
        ("tool_use", {}),
    ]

    # The results go back, and the upstream gets the whole exchange in its own shape.
    fake.default = Scenario(chunks=["Sunny, noon."])
    follow_up = [
        {"role": "user", "content": "Weather and time in Paris?"},
        final.to_param(),
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": weather.id, "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": clock.id,
                    "content": [{"type": "text", "text": "no clock"}],
                    "is_error": True,
                },
                {"type": "text", "text": "Summarise."},
            ],
        },
    ]
    answer = client.messages.create(model=model, max_tokens=100, messages=follow_up, tools=TOOLS)
    assert answer.content[0].text == "Sunny, noon." and answer.stop_reason == "end_turn"
    sent = fake.attempts[-1].body
    if model == GPT:
        assistant, r1, r2, user = sent["messages"][1:]
        assert assistant["role"] == "assistant" and assistant["content"] == "Checking."
        assert [
            (c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
            for c in assistant["tool_calls"]
        ] == [(weather.id, "get_weather", {"city": "Paris"}), (clock.id, "get_time", {})]
        assert r1 == {"role": "tool", "tool_call_id": weather.id, "content": "sunny"}
        assert r2 == {"role": "tool", "tool_call_id": clock.id, "content": "Error: no clock"}
        assert user == {"role": "user", "content": "Summarise."}
        assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "get_time"]
        assert sent["tools"][0]["function"]["parameters"] == TOOLS[0]["input_schema"]
    else:
        assistant, results = sent["messages"][1:]
        assert [b["type"] for b in assistant["content"]] == ["text", "tool_use", "tool_use"]
        assert assistant["content"][1]["input"] == {"city": "Paris"}
        kinds = [(b["type"], b.get("tool_use_id")) for b in results["content"]]
        assert kinds == [("tool_result", weather.id), ("tool_result", clock.id), ("text", None)]
        assert [t["name"] for t in sent["tools"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize(
    ("choice", "expect"),
    [
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "get_time"},
            {"type": "function", "function": {"name": "get_time"}},
        ),
    ],
)
def test_tool_choice_maps_to_openais(client, openai_fake, choice, expect):
    client.messages.create(model=GPT, max_tokens=10, messages=MSG, tools=TOOLS, tool_choice=choice)
    assert openai_fake.attempts[0].body["tool_choice"] == expect


def test_disable_parallel_tool_use(client, openai_fake):
    choice = {"type": "auto", "disable_parallel_tool_use": True}
    client.messages.create(model=GPT, max_tokens=10, messages=MSG, tools=TOOLS, tool_choice=choice)
    sent = openai_fake.attempts[0].body
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False


def test_images_become_openai_image_parts(gw, openai_fake):
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    r = post(gw, {"messages": [{"role": "user", "content": content}]}, stream=False)
    assert r.status_code == 200, r.text
    assert openai_fake.attempts[0].body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]


# -- the bytes -----------------------------------------------------------------------------


def test_event_sequence_byte_for_byte(gw, openai_fake):
    openai_fake.default = Scenario(
        chunks=["Hi", " \u2028there\n"],
        tool_calls=CALLS[:1],
        finish_reason="tool_calls",
        input_tokens=12,
        output_tokens=9,
    )
    r = post(gw, {"tools": TOOLS})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["request-id"]
    got = frames(r.content)
    assert [e for e, _ in got] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = got[0][1]["message"]
    assert start["id"].startswith("msg_") and start["model"] == GPT
    assert start["content"] == [] and start["stop_reason"] is None and start["role"] == "assistant"
    # OpenAI counts at the end: 0 unless its usage came in the same read as the first text.
    assert start["usage"] in (
        {"input_tokens": 0, "output_tokens": 0},
        {"input_tokens": 12, "output_tokens": 0},
    )
    assert got[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert got[6][1]["index"] == 1 and got[6][1]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "get_weather",
        "input": {},
    }
    assert [d["delta"]["partial_json"] for _, d in got[7:10]] == ['{"ci', 'ty": "Par', 'is"}']
    assert got[11][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 12, "output_tokens": 9},
    }
    # One frame per delta; newlines and U+2028 escaped inside the JSON line.
    assert (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":" \\u2028there\\n"}}\n\n'
    ) in r.content
    assert r.content.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_message_start_carries_input_tokens_when_known(gw, anthropic_fake):
    anthropic_fake.default = Scenario(chunks=["a", "b"], input_tokens=33, output_tokens=2)
    got = frames(post(gw, {"model": CLAUDE}).content)
    assert got[0][1]["message"]["usage"]["input_tokens"] == 33
    assert got[-2][1]["usage"] == {"input_tokens": 33, "output_tokens": 2}


# -- failure endings -----------------------------------------------------------------------


def failed(raw: bytes) -> dict[str, Any]:
    """The error of a stream that must end with Anthropic's error event and nothing else."""
    got = frames(raw)
    names = [e for e, _ in got]
    assert names[-1] == "error" and names.count("error") == 1
    assert not {"message_delta", "message_stop"} & set(names)
    assert names[-2] != "content_block_stop"  # an open block is not closed as if whole
    error = got[-1][1]
    assert set(error) == {"type", "error"} and set(error["error"]) == {"type", "message"}
    return error["error"]


@pytest.mark.parametrize("model", [GPT, CLAUDE])
@pytest.mark.parametrize(
    ("scenario", "etype", "words"),
    [
        (Scenario(chunks=["a", "b", "c"], fault="cut", fault_after=2), "api_error", "ended early"),
        (Scenario(chunks=["a", "b", "c"], fault="stall", fault_after=2), "timeout_error", "idle"),
        (
            Scenario(
                chunks=["a", "b"],
                fault="error_event",
                fault_after=1,
                error_type="overloaded_error",
                error_message="Overloaded",
            ),
            "overloaded_error",
            "Overloaded",
        ),
    ],
    ids=["cut", "stall", "upstream-error"],
)
def test_failure_after_the_start_is_an_error_event(
    gw, openai_fake, anthropic_fake, model, scenario, etype, words
):
    fake = fake_for(model, openai_fake, anthropic_fake)
    fake.enqueue(scenario)
    r = post(gw, {"model": model})
    assert r.status_code == 200
    error = failed(r.content)
    assert error["type"] == etype and words in error["message"]
    texts = [d["delta"]["text"] for e, d in frames(r.content) if e == "content_block_delta"]
    # What was relayed is a prefix of what was sent (a fault may take what came in its read).
    assert "ab".startswith("".join(texts))
    assert frames(r.content)[0][0] == "message_start"


def test_failure_before_any_content_is_an_error_event(gw, openai_fake):
    openai_fake.enqueue(Scenario(first_token_delay=5))
    r = post(gw, {})
    assert r.status_code == 200
    error = failed(r.content)
    assert error["type"] == "timeout_error" and "first token" in error["message"]
    assert "content_block_start" not in [e for e, _ in frames(r.content)]
    openai_fake.wait_closed(0, timeout=2)


def test_the_sdk_raises_on_a_failed_stream(client, openai_fake):
    openai_fake.enqueue(Scenario(chunks=["a", "b", "c"], fault="cut", fault_after=2))
    texts = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        client.messages.stream(model=GPT, max_tokens=10, messages=MSG) as stream,
    ):
        for text in stream.text_stream:
            texts.append(text)
    assert "ended early" in str(info.value)
    assert texts == ["a", "b"][: len(texts)]


def test_not_streamed_failure_is_an_http_error(client, openai_fake):
    openai_fake.enqueue(Scenario(chunks=["a", "b"], fault="cut", fault_after=1))
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(model=GPT, max_tokens=10, messages=MSG)
    assert info.value.status_code == 502


@pytest.mark.parametrize(("status", "expect"), [(429, 429), (503, 503), (500, 502)])
def test_upstream_error_before_the_stream_is_a_status(gw, openai_fake, status, expect):
    openai_fake.enqueue(Scenario(fault="status", status=status))
    r = post(gw, {})
    assert r.status_code == expect
    if expect in (429, 503):
        assert int(r.headers["retry-after"]) >= 1


# -- the client goes away ------------------------------------------------------------------


@pytest.mark.parametrize("model", [GPT, CLAUDE])
def test_leaving_mid_stream_closes_the_upstream(client, openai_fake, anthropic_fake, model):
    fake = fake_for(model, openai_fake, anthropic_fake)
    fake.default = Scenario(chunks=[f"t{i}" for i in range(200)], interval=0.05)
    with client.messages.stream(model=model, max_tokens=500, messages=MSG) as stream:
        for i, _text in enumerate(stream.text_stream):
            if i == 3:
                break
    left = time.monotonic()
    assert fake.wait_closed(0, timeout=3) - left < 1.0
    assert fake.attempts[0].closed_by_client and not fake.attempts[0].completed


# -- auth ----------------------------------------------------------------------------------


@pytest.fixture
def keyed(make_gateway, openai_fake):
    return make_gateway(openai_fake=openai_fake, api_keys=["k-good"])


def test_x_api_key_and_bearer_are_accepted(keyed):
    with anthropic.Anthropic(base_url=keyed.url, api_key="k-good", max_retries=0) as c:
        assert c.messages.create(model=GPT, max_tokens=5, messages=MSG).content[0].text
    with anthropic.Anthropic(base_url=keyed.url, auth_token="k-good", max_retries=0) as c:
        assert c.messages.create(model=GPT, max_tokens=5, messages=MSG).content[0].text
    # Any anthropic-version, and a beta header, are fine.
    headers = {"x-api-key": "k-good", "anthropic-version": "1999-01-01", "anthropic-beta": "x"}
    assert post(keyed, {}, stream=False, headers=headers).status_code == 200


def test_a_wrong_or_missing_key_is_401(keyed, openai_fake):
    with (
        anthropic.Anthropic(base_url=keyed.url, api_key="k-bad", max_retries=0) as c,
        pytest.raises(anthropic.AuthenticationError),
    ):
        c.messages.create(model=GPT, max_tokens=5, messages=MSG)
    assert post(keyed, {}).status_code == 401
    assert openai_fake.attempts == []


def test_errors_before_the_stream_are_in_anthropics_shape(keyed):
    r = post(keyed, {}, headers={"x-api-key": "k-bad"})
    assert r.status_code == 401
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "authentication_error"


def anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    return str(body["error"]["message"])


def test_every_refusal_layer_answers_in_anthropics_shape(make_gateway, openai_fake):
    """Not only the route's own errors: the guard (Host, Content-Type), the body-size
    limit, a 405 and an unknown sub-path all speak Anthropic's shape under /v1/messages,
    and the Anthropic SDK reads their message."""
    gw = make_gateway(openai_fake=openai_fake, max_body_bytes=2048)
    url = gw.url + "/v1/messages"
    r = httpx.post(url, content=b"{}", headers={"content-type": "text/plain"})
    assert "Content-Type" in anthropic_error(r, 415, "invalid_request_error")
    r = httpx.post(url, json={"model": GPT, "messages": [{"role": "user", "content": "x" * 4096}]})
    assert "GATEWAY_MAX_BODY_BYTES" in anthropic_error(r, 413, "request_too_large")
    r = httpx.post(url, json={}, headers={"host": "evil.example"})
    assert "evil.example" in anthropic_error(r, 421, "invalid_request_error")
    assert "GET" in anthropic_error(httpx.get(url), 405, "invalid_request_error")
    r = httpx.post(url + "/count_tokens", json={})
    assert "/v1/messages/count_tokens" in anthropic_error(r, 404, "not_found_error")
    # Other paths keep OpenAI's shape.
    r = httpx.post(gw.url + "/v1/chat/completions", content=b"{}", headers={"content-type": "x"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    with (
        anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0) as c,
        pytest.raises(anthropic.APIStatusError) as info,
    ):
        c.messages.create(
            model=GPT, max_tokens=5, messages=[{"role": "user", "content": "x" * 4096}]
        )
    assert info.value.status_code == 413 and "GATEWAY_MAX_BODY_BYTES" in info.value.message
    assert openai_fake.attempts == []


# -- bad input -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unreachable():
    """One gateway for the refusals: its provider is a closed port."""
    from tests.harness import GatewayServer, make_settings

    down = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-x"}
    server = GatewayServer(make_settings(providers={"openai": down}, max_retries=0)).start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages.0.content.0"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}],
                    }
                ]
            },
            "messages.0",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]},
            "messages.0.content.0.id",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/bmp",
                                    "data": "x",
                                },
                            }
                        ],
                    }
                ]
            },
            "messages.0.content.0.source.media_type",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice"),
        ({"temperature": 1.5}, "temperature"),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": {"type": 5}}}},
            "output_config",
        ),
    ],
)
def test_bad_input_is_400_naming_the_field(unreachable, body, field):
    data = {"model": GPT, "max_tokens": 10, "messages": MSG, **body}
    data = {k: v for k, v in data.items() if v is not None}
    r = httpx.post(unreachable.url + "/v1/messages", json=data)
    # Refused before any upstream is tried (this one cannot be reached: that would be a 502).
    assert r.status_code == 400, r.text
    message = r.content.decode()
    assert f"{field}:" in message, message


def test_the_sdk_gets_bad_request_and_not_found(client, openai_fake):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=GPT,
            max_tokens=10,
            messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}],
        )
    assert "messages.0.content.0" in str(info.value)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="compat/nope", max_tokens=10, messages=MSG)
    assert "compat/Qwen3-8B" in str(missing.value)
    assert openai_fake.attempts == []


# -- the encoder alone ---------------------------------------------------------------------


def encode(batches: list[list[RelayEvent]]) -> list[tuple[str, dict[str, Any]]]:
    enc = MessagesStreamEncoder(model="m/x")
    return frames(b"".join(enc.encode(b) for b in batches))


def end(reason: Any = "stop") -> End:
    return End(reason, 3, 4, "m/x", "m", 10, 20)


def test_a_cancelled_ending_is_an_error_not_a_stop():
    got = encode([[Start(model="m/x"), TextDelta("a")], [end("cancelled")]])
    assert [e for e, _ in got][-1] == "error"
    assert got[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in [e for e, _ in got]


def test_nothing_follows_the_error_event():
    enc = MessagesStreamEncoder(model="m/x")
    first = enc.encode([Start(model="m/x"), TextDelta("a")])
    last = enc.encode([Error(UpstreamTimeout("idle", phase="idle")), end("timeout")])
    assert frames(last) == [
        ("error", {"type": "error", "error": {"type": "timeout_error", "message": "idle"}})
    ]
    assert enc.encode([TextDelta("late")]) == b"" and first


def test_interleaved_tool_call_pieces_end_with_an_error():
    got = encode(
        [
            [Start(model="m/x"), ToolCallDelta(0, "c0", "f", "{")],
            [ToolCallDelta(1, "c1", "g", "{}"), ToolCallDelta(0, arguments="}")],
            [end("tool_calls")],
        ]
    )
    assert [e for e, _ in got][-1] == "error" and "interleaved" in got[-1][1]["error"]["message"]


def test_an_empty_answer_is_a_whole_message():
    got = encode([[Start(model="m/x"), end()]])
    assert [e for e, _ in got] == ["message_start", "message_delta", "message_stop"]


async def test_collect_refuses_tool_arguments_that_are_not_an_object():
    async def events():
        yield [Start(model="m/x"), ToolCallDelta(0, "c0", "f", '{"a": ')]
        yield [end("tool_calls")]

    with pytest.raises(Exception, match="not a JSON object"):
        await collect_message(events(), model="m/x")


def test_error_body_is_anthropics_shape():
    assert orjson.loads(error_body(InvalidRequest("max_tokens: Field required"))) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    assert orjson.loads(error_body(NotFound("no model")))["error"]["type"] == "not_found_error"


# -- the embedded model --------------------------------------------------------------------


@pytest.mark.local_model
def test_the_sdk_streams_from_the_local_model(make_gateway):
    gw = make_gateway(local_enabled=True)
    deadline = time.monotonic() + 60
    while httpx.get(gw.url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the embedded model did not load"
        time.sleep(0.1)
    with (
        anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0) as client,
        client.messages.stream(
            model="local/smollm2-135m-instruct",
            max_tokens=40,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        ) as stream,
    ):
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(texts) >= 2 and "Paris" in "".join(texts)
    assert final.content[0].text == "".join(texts)
    assert final.stop_reason == "end_turn" and final.model == "local/smollm2-135m-instruct"
    assert final.usage.input_tokens > 0 and 0 < final.usage.output_tokens < 40
