"""``/v1/chat/completions`` and ``/v1/models`` through the official OpenAI SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.fakes import Scenario, ToolCallSpec

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gw(make_gateway, openai_fake, anthropic_fake):
    return make_gateway(
        openai_fake=openai_fake,
        anthropic_fake=anthropic_fake,
        aliases={"fast": {"targets": ["openai/gpt-4o-mini"]}},
    )


@pytest.fixture
def client(gw):
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_stream_relays_tokens_and_names_the_model(client, openai_fake):
    openai_fake.default = Scenario(chunks=["Hel", "lo", " there"])
    chunks = list(
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=MSG, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there"
    assert {c.model for c in chunks} == {"openai/gpt-4o-mini"}
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    sent = openai_fake.attempts[0].body
    assert sent["model"] == "gpt-4o-mini" and sent["messages"] == MSG and sent["stream"] is True
    # The SDK's identity: our provider key, never the client's.
    headers = openai_fake.attempts[0].headers
    assert headers["authorization"] == "Bearer sk-test-upstream-key-0123456789"
    assert headers["user-agent"].startswith("AsyncOpenAI/Python")


def test_include_usage_adds_the_usage_chunk(client, openai_fake):
    openai_fake.default = Scenario(chunks=["a", "b", "c"], input_tokens=21, output_tokens=3)
    chunks = list(
        client.chat.completions.create(
            model="openai/gpt-4o-mini",
            messages=MSG,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        21,
        3,
        24,
    )


def test_non_stream_completion(client, openai_fake):
    openai_fake.default = Scenario(chunks=["Hello", " world"], input_tokens=5, output_tokens=2)
    result = client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=MSG, max_tokens=50, temperature=0.5
    )
    assert result.choices[0].message.content == "Hello world"
    assert result.choices[0].finish_reason == "stop"
    assert result.model == "openai/gpt-4o-mini"
    assert result.usage.total_tokens == 7
    sent = openai_fake.attempts[0].body
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.5


def _assemble(chunks):
    calls: dict[int, dict] = {}
    finish = None
    for c in chunks:
        if not c.choices:
            continue
        for tc in c.choices[0].delta.tool_calls or ():
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                call["id"] = tc.id
            if tc.function and tc.function.name:
                call["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                call["arguments"] += tc.function.arguments
        finish = c.choices[0].finish_reason or finish
    return calls, finish


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALLS = [
    ToolCallSpec(id="call_1", name="get_weather", arguments=['{"ci', 'ty": "Par', 'is"}']),
    ToolCallSpec(id="call_2", name="get_time", arguments=["{}"]),
]


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5"])
def test_tool_call_deltas_in_openai_shape(client, openai_fake, anthropic_fake, model):
    scenario = Scenario(chunks=["Let me check."], tool_calls=CALLS, finish_reason="tool_calls")
    openai_fake.default = anthropic_fake.default = scenario
    chunks = list(
        client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, stream=True)
    )
    calls, finish = _assemble(chunks)
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == '{"city": "Paris"}'
    assert calls[1]["name"] == "get_time" and calls[1]["arguments"] == "{}"
    assert calls[0]["id"] and calls[1]["id"]
    # Arguments arrive in pieces, as the upstream sent them, not in one lump.
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert len(pieces) >= 5


def test_anthropic_upstream_text_usage_and_stop_reason(client, anthropic_fake):
    anthropic_fake.default = Scenario(
        chunks=["Bon", "jour"], finish_reason="length", input_tokens=9, output_tokens=2
    )
    messages = [{"role": "system", "content": "Be brief."}, *MSG]
    chunks = list(
        client.chat.completions.create(
            model="anthropic/claude-sonnet-4-5",
            messages=messages,
            stream=True,
            max_tokens=2,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Bonjour"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (9, 2)
    sent = anthropic_fake.attempts[0].body
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 2
    assert anthropic_fake.attempts[0].headers["anthropic-version"]
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def test_alias_and_compatible_provider(client, openai_fake):
    result = client.chat.completions.create(model="fast", messages=MSG)
    assert result.model == "openai/gpt-4o-mini"
    result = client.chat.completions.create(model="compat/Qwen3-8B", messages=MSG)
    assert result.model == "compat/Qwen3-8B"
    assert [a.body["model"] for a in openai_fake.attempts] == ["gpt-4o-mini", "Qwen3-8B"]


def test_models_lists_configured_models_and_aliases(client):
    ids = [m.id for m in client.models.list()]
    assert "compat/Qwen3-8B" in ids and "fast" in ids


def test_unknown_model_is_404_listing_the_available(client, openai_fake):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="compat/nope", messages=MSG)
    assert "compat/Qwen3-8B" in info.value.message
    assert openai_fake.attempts == []


def test_failure_after_start_raises_in_the_sdk(client, openai_fake):
    openai_fake.default = Scenario(chunks=["a", "b", "c"], fault="cut", fault_after=2)
    got = []
    with pytest.raises(openai.APIError) as info:
        for c in client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=MSG, stream=True
        ):
            got.append(c.choices[0].delta.content if c.choices else None)
    assert "ended early" in str(info.value)
    assert got[-2:] == ["a", "b"]


def test_non_stream_failure_is_an_http_error(gw, openai_fake):
    openai_fake.default = Scenario(chunks=["a", "b"], fault="cut", fault_after=1)
    r = httpx.post(
        gw.url + "/v1/chat/completions", json={"model": "openai/gpt-4o-mini", "messages": MSG}
    )
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_truncated"
