"""The simple protocol (``/chat/stream``) through httpx + httpx-sse, and once with ``curl -N``."""

from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import pytest

from tests.fakes import Scenario, ToolCallSpec
from tests.harness import read_sse


@pytest.fixture
def gw(make_gateway, openai_fake, anthropic_fake):
    return make_gateway(
        openai_fake=openai_fake, anthropic_fake=anthropic_fake, default_model="openai/gpt-4o-mini"
    )


def test_post_stream_event_sequence(gw, openai_fake):
    openai_fake.default = Scenario(chunks=["One", " two"], input_tokens=4, output_tokens=2)
    with httpx.stream(
        "POST",
        gw.url + "/chat/stream",
        json={"prompt": "count", "system": "terse", "max_tokens": 5},
        headers={"X-Request-ID": "req-abc.123"},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["x-request-id"] == "req-abc.123"
        events = read_sse(r)
    names = [e.event for e in events]
    assert names == ["start", "message", "message", "end", "message"]
    start = events[0].json()
    assert start["model"] == "openai/gpt-4o-mini" and start["provider"] == "openai"
    assert 2000 <= events[0].retry <= 4000
    assert [e.json()["content"] for e in events[1:3]] == ["One", " two"]
    end = events[3].json()
    assert end["finish_reason"] == "stop"
    assert end["usage"] == {"input_tokens": 4, "output_tokens": 2}
    assert end["model"] == "openai/gpt-4o-mini" and end["provider"] == "openai"
    assert isinstance(end["ttft_ms"], int) and end["duration_ms"] >= end["ttft_ms"]
    assert events[-1].data == "[DONE]"
    ids = [e.id for e in events]
    assert ids == [f"{start['id']}:{n}" for n in range(5)]
    sent = openai_fake.attempts[0].body
    assert sent["messages"] == [
        {"role": "system", "content": "terse"},
        {"role": "user", "content": "count"},
    ]
    assert sent["max_tokens"] == 5


def test_get_stream_with_query_parameters(gw, openai_fake):
    r = httpx.get(
        gw.url + "/chat/stream",
        params={"prompt": "hi", "max_tokens": "3", "temperature": "0.2", "stop": ["x", "y"]},
    )
    events = read_sse(r)
    assert (
        "".join(e.json()["content"] for e in events if e.event == "message" and e.data != "[DONE]")
        == "Hello world"
    )
    sent = openai_fake.attempts[0].body
    assert (sent["max_tokens"], sent["temperature"], sent["stop"]) == (3, 0.2, ["x", "y"])


def test_messages_and_tool_call_events_from_anthropic(gw, anthropic_fake):
    anthropic_fake.default = Scenario(
        chunks=[],
        finish_reason="tool_calls",
        tool_calls=[ToolCallSpec(id="toolu_1", name="lookup", arguments=['{"q":', '"x"}'])],
    )
    r = httpx.post(
        gw.url + "/chat/stream",
        json={
            "model": "anthropic/claude-haiku-4-5",
            "messages": [{"role": "user", "content": "look it up"}],
        },
    )
    events = read_sse(r)
    calls = [e.json() for e in events if e.event == "tool_call"]
    assert calls[0] == {"index": 0, "id": "toolu_1", "name": "lookup", "arguments": ""}
    assert "".join(c["arguments"] for c in calls) == '{"q":"x"}'
    end = next(e.json() for e in events if e.event == "end")
    assert end["finish_reason"] == "tool_calls" and end["provider"] == "anthropic"


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"])
def test_an_empty_answer_still_starts_and_ends(gw, openai_fake, anthropic_fake, model):
    empty = Scenario(chunks=[], output_tokens=0)
    openai_fake.default = anthropic_fake.default = empty
    events = read_sse(httpx.post(gw.url + "/chat/stream", json={"prompt": "hi", "model": model}))
    assert [e.event for e in events] == ["start", "end", "message"]
    assert events[0].json()["model"] == model and events[-1].data == "[DONE]"
    assert events[1].json()["finish_reason"] == "stop"


def test_reconnect_with_last_event_id_never_starts_a_second_generation(gw, openai_fake):
    r = httpx.get(
        gw.url + "/chat/stream", params={"prompt": "hi"}, headers={"Last-Event-ID": "gen_0123:4"}
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "stream_not_found"
    assert openai_fake.attempts == []


def test_pings_keep_the_connection_alive_before_the_first_token(make_gateway, openai_fake):
    gw = make_gateway(
        openai_fake=openai_fake, default_model="openai/gpt-4o-mini", ping_interval_s=0.1
    )
    openai_fake.default = Scenario(chunks=["late"], first_token_delay=0.6)
    raw = b""
    with httpx.stream("POST", gw.url + "/chat/stream", json={"prompt": "hi"}) as r:
        for chunk in r.iter_raw():
            raw += chunk
    before_token = raw.split(b'{"content":"late"}')[0]
    assert before_token.count(b": ping\n\n") >= 3
    assert raw.endswith(b"data: [DONE]\n\n")


def test_curl_sees_tokens_arrive_over_time(gw, openai_fake):
    openai_fake.default = Scenario(chunks=[f"t{i} " for i in range(6)], interval=0.15)
    seen: list[tuple[float, str]] = []
    with subprocess.Popen(
        ["curl", "-sN", gw.url + "/chat/stream?prompt=hi"], stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(b'data: {"content"'):
                seen.append((time.monotonic(), json.loads(line[6:])["content"]))
        assert proc.wait(timeout=10) == 0
    assert [t for _, t in seen] == [f"t{i} " for i in range(6)]
    # Six tokens 150 ms apart arrive spread out, not in one late lump.
    assert seen[-1][0] - seen[0][0] >= 0.5


def test_event_ids_are_unique_per_stream(gw):
    a = read_sse(httpx.post(gw.url + "/chat/stream", json={"prompt": "a"}))
    b = read_sse(httpx.post(gw.url + "/chat/stream", json={"prompt": "b"}))
    assert a[0].json()["id"] != b[0].json()["id"]
    assert all(re.fullmatch(r"gen_[0-9a-f]+:\d+", e.id) for e in a + b)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/stream", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ],
)
def test_nothing_follows_the_terminator_while_the_upstream_tail_drains(
    make_gateway, openai_fake, path, body
):
    """The end is sent as soon as the finish and usage are known; the response stays
    open while the upstream's tail is read (here it never comes: the tail wait), and
    no keep-alive ping may follow the [DONE] meanwhile."""
    gw = make_gateway(
        openai_fake=openai_fake, default_model="openai/gpt-4o-mini", ping_interval_s=0.05
    )
    openai_fake.default = Scenario(chunks=["a", "b"], fault="no_done")
    raw = b""
    with httpx.stream("POST", gw.url + path, json=body, timeout=10) as r:
        for chunk in r.iter_raw():
            raw += chunk
    assert raw.count(b"data: [DONE]\n\n") == 1
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
