"""Tests of the fake upstream servers, over real sockets and through the official SDKs."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from tests.fakes import AnthropicFake, OpenAIFake, Scenario, ToolCallSpec

MSGS: list[Any] = [{"role": "user", "content": "hi"}]
WEATHER = ToolCallSpec("call_abc", "get_weather", ['{"city"', ': "Paris"', "}"])
TOOLU = ToolCallSpec("toolu_01", "get_weather", ['{"city"', ': "Paris"', "}"])


def oai(fake: OpenAIFake, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0, **kw)


def ant(fake: AnthropicFake, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="x", max_retries=0, **kw)


async def raw_request(
    port: int, path: str, body: dict[str, Any] | None = None, method: str = "POST"
) -> tuple[int, dict[str, str], list[bytes]]:
    """Minimal HTTP/1.1 client that returns the chunked body chunk by chunk."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        payload = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n"
            f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        raw_head = await reader.readuntil(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        chunks: list[bytes] = []
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunks.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
        else:
            chunks.append(await reader.readexactly(int(headers["content-length"])))
        return status, headers, chunks
    finally:
        writer.close()
        await writer.wait_closed()


# --------------------------------------------------------------------------- OpenAI


async def test_openai_stream_text_and_usage(openai_fake: OpenAIFake) -> None:
    async with oai(openai_fake) as client:
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=MSGS,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 2)
    assert chunks[-1].usage.total_tokens == 13
    assert {c.model for c in chunks} == {"gpt-test"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")

    (a,) = openai_fake.attempts
    assert (a.index, a.method, a.path, a.model, a.stream) == (
        0,
        "POST",
        "/v1/chat/completions",
        "gpt-test",
        True,
    )
    assert a.body["messages"] == MSGS and a.body["stream_options"] == {"include_usage": True}
    assert a.headers["authorization"] == "Bearer x"
    assert a.completed and not a.closed_by_client
    assert a.scenario is openai_fake.default


async def test_openai_wire_bytes_one_event_per_chunk(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(chunks=["a", "b"], model="upstream-model")
    body = {"model": "m", "messages": MSGS, "stream": True}
    status, headers, chunks = await raw_request(openai_fake.port, "/v1/chat/completions", body)
    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["x-request-id"].startswith("req_")
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks)
    assert chunks[-1] == b"data: [DONE]\n\n"
    events = [json.loads(c[6:]) for c in chunks[:-1]]
    # no usage key at all without stream_options.include_usage
    assert all("usage" not in e for e in events)
    assert events[0]["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": "", "refusal": None},
        "logprobs": None,
        "finish_reason": None,
    }
    assert events[0]["model"] == "upstream-model"
    assert events[0]["system_fingerprint"].startswith("fp_")
    assert [e["choices"][0]["delta"] for e in events[1:]] == [
        {"content": "a"},
        {"content": "b"},
        {},
    ]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert openai_fake.attempts[0].completed


async def test_openai_tool_calls_assembled(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(
        chunks=["Let me check."], tool_calls=[WEATHER], finish_reason="tool_calls"
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async with oai(openai_fake) as client:
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        async for chunk in stream:
            choice = chunk.choices[0]
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.function and tc.function.name:
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
        # non-streaming answer carries the same tool call
        completion = await client.chat.completions.create(model="m", messages=MSGS)
    assert finish == "tool_calls"
    assert calls == {0: {"id": "call_abc", "name": "get_weather", "arguments": '{"city": "Paris"}'}}
    msg = completion.choices[0].message
    assert msg.content == "Let me check."
    assert (
        msg.tool_calls is not None and msg.tool_calls[0].function.arguments == '{"city": "Paris"}'
    )
    assert completion.choices[0].finish_reason == "tool_calls"
    # the SDK reused one keep-alive connection for both requests
    a0, a1 = openai_fake.attempts
    assert a0.connection_id == a1.connection_id


async def test_openai_cut_raises(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(chunks=["a", "b", "c"], fault="cut", fault_after=2)
    got: list[str] = []
    async with oai(openai_fake) as client:
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        with pytest.raises(openai.APIConnectionError):
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "ab"
    a = openai_fake.attempts[0]
    assert openai_fake.wait_closed(a, timeout=1) and not a.completed and not a.closed_by_client


async def test_openai_status_429_with_retry_after(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(fault="status", status=429, retry_after="7")
    async with oai(openai_fake) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=MSGS, stream=True)
    err = info.value
    assert err.status_code == 429
    assert err.response.headers["retry-after"] == "7"
    assert err.code == "rate_limit_exceeded"
    assert err.body == {
        "message": "Rate limit reached. Please try again later.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert err.request_id is not None and err.request_id.startswith("req_")
    assert openai_fake.attempts[0].completed


async def test_openai_status_custom_error_fields(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(
        fault="status", status=400, error_code="context_length_exceeded", error_message="too long"
    )
    async with oai(openai_fake) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=MSGS)
    assert info.value.code == "context_length_exceeded"
    assert info.value.type == "invalid_request_error"
    assert "too long" in info.value.message


async def test_openai_reset_and_never_answer(openai_fake: OpenAIFake) -> None:
    openai_fake.enqueue(Scenario(fault="reset"), Scenario(fault="never_answer"))
    async with oai(openai_fake, timeout=0.3) as client:
        with pytest.raises(openai.APIConnectionError) as info:
            await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        assert not isinstance(info.value, openai.APITimeoutError)
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        assert time.monotonic() - t0 < 2
    reset, never = await openai_fake.wait_for_attempts_async(2)
    assert reset.closed_at is not None and not reset.closed_by_client
    await openai_fake.wait_closed_async(never, timeout=1)
    assert never.closed_by_client and not never.completed


async def test_openai_malformed_raises_in_parsing(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(chunks=["a", "b"], fault="malformed", fault_after=1)
    got: list[str] = []
    async with oai(openai_fake) as client:
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        with pytest.raises(json.JSONDecodeError):
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
    assert got == ["", "a"]
    # the server carried on and finished the stream
    _, _, chunks = await raw_request(
        openai_fake.port, "/v1/chat/completions", {"model": "m", "stream": True}
    )
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert len(chunks) == 6  # role, a, malformed, b, finish, [DONE]


async def test_openai_error_event(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(
        fault="error_event", fault_after=1, error_type="server_error", error_message="boom"
    )
    async with oai(openai_fake) as client:
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                pass
    assert info.value.message == "boom"
    assert info.value.body == {"message": "boom", "type": "server_error", "code": None}
    assert openai_fake.attempts[0].completed


async def test_openai_no_done_keeps_connection_open(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(fault="no_done")
    finish = None
    async with oai(openai_fake, timeout=0.3) as client:
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        with pytest.raises(openai.APITimeoutError):
            async for chunk in stream:
                finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    a = openai_fake.attempts[0]
    await openai_fake.wait_closed_async(a, timeout=1)
    assert not a.completed and a.closed_by_client


async def test_client_close_mid_stall_recorded(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(chunks=["a", "b"], fault="stall", fault_after=1)
    async with oai(openai_fake) as client:
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        got = [await stream.__anext__(), await stream.__anext__()]
        assert got[1].choices[0].delta.content == "a"
        a = (await openai_fake.wait_for_attempts_async(1))[0]
        await asyncio.sleep(0.1)
        assert a.closed_at is None
        closed = time.monotonic()
        await stream.close()
        closed_at = await openai_fake.wait_closed_async(a, timeout=1)
    assert 0 <= closed_at - closed < 1.0
    assert a.closed_by_client and not a.completed


async def test_raw_parts_arrive_exactly(openai_fake: OpenAIFake) -> None:
    emoji = "😀".encode()
    head = b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
    first = head + b'"choices":[{"index":0,"delta":{"content":"' + emoji[:2]
    second = emoji[2:] + b'"},"finish_reason":null}]}\n\n'
    parts = [first, second, b"data: [DONE]\n\n"]
    openai_fake.default = Scenario(raw_parts=parts)
    status, headers, chunks = await raw_request(
        openai_fake.port, "/v1/chat/completions", {"model": "m", "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert chunks == parts
    async with oai(openai_fake) as client:
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        texts = [c.choices[0].delta.content async for c in stream]
    assert texts == ["😀"]


async def test_delays(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(
        chunks=["a", "b", "c"], headers_delay=0.3, first_token_delay=0.3, interval=0.3
    )
    stamps: list[float] = []
    async with oai(openai_fake) as client:
        t0 = time.monotonic()
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        t_headers = time.monotonic() - t0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.monotonic() - t0)
    # Lower bounds are the contract; upper bounds are generous for a loaded machine.
    assert 0.29 <= t_headers < 0.55
    assert 0.59 <= stamps[0] < 0.85
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(0.28 <= g < 0.55 for g in gaps)


async def test_enqueue_for_model_default_order(openai_fake: OpenAIFake) -> None:
    openai_fake.default = Scenario(chunks=["default"])
    openai_fake.for_model["special"] = Scenario(chunks=["special"])
    openai_fake.enqueue(Scenario(chunks=["q1"]), Scenario(chunks=["q2"]))
    assert openai_fake.queued == 2
    out = []
    async with oai(openai_fake) as client:
        for model in ["special", "m", "special", "m"]:
            r = await client.chat.completions.create(model=model, messages=MSGS)
            out.append(r.choices[0].message.content)
        models = [m.id async for m in client.models.list()]
    assert out == ["q1", "q2", "special", "default"]
    assert "gpt-4o-mini" in models and "special" in models
    attempts = openai_fake.attempts
    assert [a.path for a in attempts][-1] == "/v1/models"
    assert [a.body["model"] for a in attempts[:4]] == ["special", "m", "special", "m"]
    openai_fake.reset_record()
    assert openai_fake.attempts == []


def test_sync_sdk_and_unknown_path(openai_fake: OpenAIFake) -> None:
    with openai.OpenAI(base_url=openai_fake.base_url, api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(model="m", messages=MSGS, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream)
        assert text == "Hello world"
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="m", input="x")
    assert openai_fake.wait_for_attempts(2)[1].path == "/v1/embeddings"
    with pytest.raises(AssertionError):
        openai_fake.wait_for_attempts(3, timeout=0.05)


def test_stop_closes_open_connections() -> None:
    fake = OpenAIFake(Scenario(fault="stall", fault_after=0)).start()
    try:

        async def run() -> None:
            async with oai(fake) as client:
                stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
                await stream.__anext__()  # role chunk
                await asyncio.to_thread(fake.stop)
                with pytest.raises(openai.APIConnectionError):
                    await stream.__anext__()

        asyncio.run(run())
    finally:
        fake.stop()
    a = fake.attempts[0]
    assert a.closed_at is not None and not a.closed_by_client and not a.completed


async def test_aiohttp_transport(openai_fake: OpenAIFake) -> None:
    openai_fake.enqueue(Scenario(), Scenario(chunks=["x", "y"], fault="cut", fault_after=1))
    client = oai(openai_fake, http_client=openai.DefaultAioHttpClient())
    async with client:
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "Hello world"
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        with pytest.raises(openai.APIConnectionError):
            async for _ in stream:
                pass


# ------------------------------------------------------------------------ Anthropic


async def test_anthropic_stream_text_and_tool_use(anthropic_fake: AnthropicFake) -> None:
    anthropic_fake.default = Scenario(
        chunks=["Checking", "..."], tool_calls=[TOOLU], finish_reason="tool_calls"
    )
    async with (
        ant(anthropic_fake) as client,
        client.messages.stream(model="claude-test", max_tokens=100, messages=MSGS) as stream,
    ):
        types = [event.type async for event in stream]
        message = await stream.get_final_message()
    assert message.model == "claude-test"
    assert message.stop_reason == "tool_use"
    assert message.usage.input_tokens == 11 and message.usage.output_tokens == 2
    text, tool = message.content
    assert text.type == "text" and text.text == "Checking..."
    assert tool.type == "tool_use" and tool.id == "toolu_01" and tool.name == "get_weather"
    assert tool.input == {"city": "Paris"}
    assert types[0] == "message_start" and types[-1] == "message_stop"
    a = anthropic_fake.attempts[0]
    assert a.path == "/v1/messages" and a.body["max_tokens"] == 100 and a.completed
    assert "anthropic-version" in a.headers


async def test_anthropic_wire_bytes(anthropic_fake: AnthropicFake) -> None:
    anthropic_fake.default = Scenario(chunks=["a"], finish_reason="length", output_tokens=5)
    body = {"model": "c", "max_tokens": 5, "messages": MSGS, "stream": True}
    status, headers, chunks = await raw_request(anthropic_fake.port, "/v1/messages", body)
    assert status == 200 and headers["request-id"].startswith("req_")
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    events = []
    for c in chunks:
        ev, data = c.decode().removesuffix("\n\n").split("\n")
        events.append((ev.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    assert [e for e, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(ev == data["type"] for ev, data in events)
    start = events[0][1]["message"]
    assert start["usage"] == {"input_tokens": 11, "output_tokens": 1}
    assert (start["stop_reason"], start["content"], start["model"]) == (None, [], "c")
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "a"}
    assert events[5][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"output_tokens": 5},
    }


async def test_anthropic_non_stream_and_count_tokens(anthropic_fake: AnthropicFake) -> None:
    async with ant(anthropic_fake) as client:
        msg = await client.messages.create(model="c", max_tokens=5, messages=MSGS)
        count = await client.messages.count_tokens(model="c", messages=MSGS)
    assert msg.content[0].type == "text" and msg.content[0].text == "Hello world"
    assert msg.stop_reason == "end_turn" and msg.id.startswith("msg_")
    assert count.input_tokens == 11


async def test_anthropic_faults(anthropic_fake: AnthropicFake) -> None:
    anthropic_fake.enqueue(
        Scenario(fault="status", status=529),
        Scenario(fault="status", status=429, retry_after="2"),
        Scenario(fault="error_event", fault_after=1),
        Scenario(chunks=["a", "b"], fault="malformed", fault_after=1),
        Scenario(chunks=["a", "b"], fault="cut", fault_after=1),
    )
    async with ant(anthropic_fake) as client:
        with pytest.raises(anthropic.OverloadedError) as over:
            await client.messages.create(model="c", max_tokens=5, messages=MSGS, stream=True)
        assert over.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model="c", max_tokens=5, messages=MSGS, stream=True)
        assert limited.value.response.headers["retry-after"] == "2"
        assert limited.value.request_id is not None

        stream = await client.messages.create(model="c", max_tokens=5, messages=MSGS, stream=True)
        seen: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as mid:
            async for event in stream:
                seen.append(event.type)
        assert mid.value.body == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"},
        }
        assert seen.count("content_block_delta") == 1

        stream = await client.messages.create(model="c", max_tokens=5, messages=MSGS, stream=True)
        with pytest.raises(json.JSONDecodeError):
            async for _ in stream:
                pass

        stream = await client.messages.create(model="c", max_tokens=5, messages=MSGS, stream=True)
        # anthropic's stream does not wrap transport errors: the raw httpx2 error escapes
        with pytest.raises(httpx2.RemoteProtocolError, match="incomplete chunked read"):
            async for _ in stream:
                pass
    cut_attempt = anthropic_fake.attempts[-1]
    assert cut_attempt.closed_at is not None and not cut_attempt.completed


async def test_anthropic_stall_close_and_never_answer(anthropic_fake: AnthropicFake) -> None:
    anthropic_fake.enqueue(Scenario(fault="stall", fault_after=1), Scenario(fault="never_answer"))
    async with ant(anthropic_fake, timeout=0.3) as client:
        async with client.messages.stream(model="c", max_tokens=5, messages=MSGS) as stream:
            async for event in stream:
                if event.type == "text":
                    break
            t_close = time.monotonic()
        closed_at = await anthropic_fake.wait_closed_async(0, timeout=1)
        assert closed_at - t_close < 1.0 and anthropic_fake.attempts[0].closed_by_client
        with pytest.raises(anthropic.APITimeoutError):
            await client.messages.create(model="c", max_tokens=5, messages=MSGS, stream=True)
    await anthropic_fake.wait_closed_async(1, timeout=1)
    assert anthropic_fake.attempts[1].closed_by_client


async def test_anthropic_no_done(anthropic_fake: AnthropicFake) -> None:
    anthropic_fake.default = Scenario(fault="no_done")
    types: list[str] = []
    async with ant(anthropic_fake, timeout=0.3) as client:
        stream = await client.messages.create(model="c", max_tokens=5, messages=MSGS, stream=True)
        with pytest.raises(httpx2.ReadTimeout):  # unwrapped mid-stream, unlike openai
            async for event in stream:
                types.append(event.type)
    assert types[-1] == "message_delta"
