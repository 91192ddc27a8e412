"""Tool calls as OpenAI's clients expect them, on every route, and model lists that say
what open-ended providers serve."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pydantic
from websockets.sync.client import connect

from tests.fakes.scenario import Scenario, ToolCallSpec
from tests.harness import read_sse

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


class GetTime(pydantic.BaseModel):
    """The current time; takes no arguments."""


def sdk(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def test_a_zero_argument_tool_call_is_an_empty_object(make_gateway, anthropic_fake):
    """Anthropic sends no argument piece for {}; OpenAI's clients need "{}" to parse."""
    gw = make_gateway(anthropic_fake=anthropic_fake)
    call = Scenario(
        chunks=[], tool_calls=[ToolCallSpec("toolu_1", "GetTime", [])], finish_reason="tool_calls"
    )
    anthropic_fake.enqueue(call, call)
    messages = [{"role": "user", "content": "What time is it?"}]
    tools = [openai.pydantic_function_tool(GetTime)]
    with sdk(gw) as client:
        # The SDK's own helper parses the arguments with the tool's model.
        with client.chat.completions.stream(
            model="anthropic/claude-haiku-4-5",
            messages=messages,
            tools=tools,  # type: ignore[arg-type]
        ) as stream:
            final = stream.get_final_completion()
        calls = final.choices[0].message.tool_calls or []
        assert calls[0].function.arguments == "{}"
        assert calls[0].function.parsed_arguments == GetTime()  # type: ignore[union-attr]
        done = client.chat.completions.create(
            model="anthropic/claude-haiku-4-5",
            messages=messages,
            tools=tools,  # type: ignore[arg-type]
        )
    assert (done.choices[0].message.tool_calls or [])[0].function.arguments == "{}"


def test_a_tool_only_answer_opens_with_null_content(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    openai_fake.enqueue(
        Scenario(
            chunks=[],
            tool_calls=[ToolCallSpec("call_1", "get_weather", ['{"city":', '"Oslo"}'])],
            finish_reason="tool_calls",
        )
    )
    body = {
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [WEATHER],
        "stream": True,
    }
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as r:
        chunks = [json.loads(e.data) for e in read_sse(r) if e.data != "[DONE]"]
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    assert "content" not in json.dumps([c["choices"][0]["delta"] for c in chunks[1:]])


def test_text_answers_still_open_with_empty_content(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    body = {
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as r:
        first = json.loads(next(e for e in read_sse(r)).data)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def _weather_call() -> Scenario:
    return Scenario(
        chunks=[],
        tool_calls=[ToolCallSpec("call_1", "get_weather", ['{"city":"Oslo"}'])],
        finish_reason="tool_calls",
    )


def test_tools_reach_the_upstream_on_every_simple_route(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    body = {
        "model": "openai/gpt-4o-mini",
        "prompt": "Weather in Oslo?",
        "tools": [WEATHER],
        "tool_choice": "required",
    }

    openai_fake.enqueue(_weather_call())
    with httpx.stream("POST", gw.url + "/chat/stream", json=body, timeout=10) as r:
        events = read_sse(r)
    calls = [e.json() for e in events if e.event == "tool_call"]
    assert calls[0]["name"] == "get_weather"
    assert "".join(c["arguments"] for c in calls) == '{"city":"Oslo"}'
    assert next(e for e in events if e.event == "end").json()["finish_reason"] == "tool_calls"

    openai_fake.enqueue(_weather_call())
    created = httpx.post(gw.url + "/chat/streams", json=body, timeout=10).json()
    with httpx.stream("GET", gw.url + created["events_url"], timeout=10) as r:
        assert any(e.event == "tool_call" for e in read_sse(r))

    openai_fake.enqueue(_weather_call(), _weather_call())
    fan = {
        **{k: v for k, v in body.items() if k != "model"},
        "models": ["openai/gpt-4o-mini", "openai/gpt-4o"],
    }
    with httpx.stream("POST", gw.url + "/chat/fanout", json=fan, timeout=10) as r:
        calls = [e.json() for e in read_sse(r) if e.event == "tool_call"]
    assert sorted(c["index"] for c in calls if "name" in c) == [0, 1]  # one call per model

    openai_fake.enqueue(_weather_call())
    with connect(gw.url.replace("http", "ws") + "/ws/chat") as ws:
        ws.send(json.dumps(body))
        frames = []
        while not frames or frames[-1]["type"] != "end":
            frames.append(json.loads(ws.recv(timeout=5)))
    assert any(f["type"] == "tool_call" for f in frames)

    sent = [a.body for a in openai_fake.attempts if a.path.endswith("/chat/completions")]
    assert len(sent) == 5
    assert all(b["tools"] == [WEATHER] and b["tool_choice"] == "required" for b in sent)


def _model_ids(gw) -> list[str]:
    r = httpx.get(gw.url + "/v1/models", timeout=10)
    assert r.status_code == 200
    return [m["id"] for m in r.json()["data"]]


def test_models_of_an_open_provider_come_from_its_upstream(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    ids = _model_ids(gw)
    assert "compat/Qwen3-8B" in ids  # configured list
    assert {"openai/gpt-4o-mini", "openai/gpt-4o"} <= set(ids)  # the upstream's own list
    asked = [a for a in openai_fake.attempts if a.path.endswith("/models")]
    assert len(asked) == 1 and "authorization" in {k.lower() for k in asked[0].headers}
    _model_ids(gw)  # cached: the upstream is not asked again within the TTL
    assert len([a for a in openai_fake.attempts if a.path.endswith("/models")]) == 1
    with sdk(gw) as client:
        assert "openai/gpt-4o" in [m.id for m in client.models.list()]


def test_a_failing_or_silent_upstream_never_fails_the_listing(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    openai_fake.default = Scenario(fault="status", status=500)  # what GET /models gets
    assert "compat/Qwen3-8B" in _model_ids(gw)

    gw2 = make_gateway(openai_fake=openai_fake)
    openai_fake.default = Scenario(fault="never_answer")
    started = time.monotonic()
    ids = _model_ids(gw2)
    assert "compat/Qwen3-8B" in ids and time.monotonic() - started < 8
