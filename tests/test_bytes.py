"""Byte-level edge cases survive the whole trip exactly, on both wire formats."""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest

from tests.fakes import Scenario
from tests.harness import read_sse

TRICKY = ["\n", "\r\n", "a\u2028b", "\u2029", "data: fake\n\n", "\r", "é😀", ""]


@pytest.fixture
def gw(make_gateway, openai_fake, anthropic_fake):
    return make_gateway(
        openai_fake=openai_fake, anthropic_fake=anthropic_fake, default_model="openai/gpt-4o-mini"
    )


def _simple_text(gw, model):
    events = read_sse(httpx.post(gw.url + "/chat/stream", json={"prompt": "x", "model": model}))
    return [e.json()["content"] for e in events if e.event == "message" and e.data != "[DONE]"]


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"])
def test_tricky_tokens_on_the_simple_protocol(gw, openai_fake, anthropic_fake, model):
    openai_fake.default = anthropic_fake.default = Scenario(chunks=TRICKY)
    assert _simple_text(gw, model) == [t for t in TRICKY if t]


def test_tricky_tokens_through_the_openai_sdk(gw, openai_fake):
    openai_fake.default = Scenario(chunks=TRICKY)
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x") as client:
        chunks = client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
        )
        texts = [c.choices[0].delta.content for c in chunks if c.choices]
    assert [t for t in texts if t] == [t for t in TRICKY if t]


def test_line_separators_are_sent_escaped(gw, openai_fake):
    """U+2028 stays inside one data line even for clients that split on it."""
    openai_fake.default = Scenario(chunks=["a\u2028b\u2029c"])
    raw = httpx.post(gw.url + "/chat/stream", json={"prompt": "x"}).content
    assert "\u2028".encode() not in raw and b'"a\\u2028b\\u2029c"' in raw


def _chunk_event(content_json: bytes) -> bytes:
    return (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
        b'"model":"m","choices":[{"index":0,"delta":{"content":'
        + content_json
        + b'},"finish_reason":null}]}\n\n'
    )


def test_emoji_split_across_two_upstream_writes(gw, openai_fake):
    emoji = "😀".encode()  # four bytes: split after the second
    body = (
        _chunk_event(b'"smile ' + emoji + b' ok"')
        + b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    cut = body.index(emoji) + 2
    openai_fake.default = Scenario(raw_parts=[body[:cut], body[cut:]], interval=0.1)
    assert _simple_text(gw, "openai/gpt-4o-mini") == ["smile 😀 ok"]


def test_crlf_framed_upstream(gw, openai_fake):
    """An upstream that frames with CRLF, with the CR and LF in different writes."""
    body = (
        _chunk_event(orjson.dumps("one"))
        + _chunk_event(orjson.dumps("two"))
        + b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    body = body.replace(b"\n", b"\r\n")
    first = body.index(b"\r\n") + 1
    openai_fake.default = Scenario(raw_parts=[body[:first], body[first:]], interval=0.05)
    assert _simple_text(gw, "openai/gpt-4o-mini") == ["one", "two"]
