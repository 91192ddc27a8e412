"""Bad input gets a 4xx JSON error naming the problem; never a 500."""

from __future__ import annotations

import httpx
import pytest

OK_MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gw(make_gateway, openai_fake):
    return make_gateway(
        openai_fake=openai_fake, default_model="openai/gpt-4o-mini", max_body_bytes=2048
    )


CASES = [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"", 400, "empty"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", {"model": "openai/gpt-4o-mini"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": OK_MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": OK_MSG, "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": OK_MSG, "temperature": 2.5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": OK_MSG, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": OK_MSG, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": OK_MSG, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": OK_MSG, "model": "nope/x"}, 404, "unknown provider"),
    ("/v1/chat/completions", {"messages": OK_MSG, "model": "mystery"}, 404, "unknown model"),
    ("/chat/stream", {}, 400, "prompt or messages"),
    ("/chat/stream", {"prompt": ""}, 400, "prompt"),
    ("/chat/stream", {"prompt": "   "}, 400, "prompt"),
    ("/chat/stream", {"prompt": 5}, 400, "prompt"),
    ("/chat/stream", {"prompt": "hi", "messages": OK_MSG}, 400, "not both"),
    ("/chat/stream", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/chat/stream", {"prompt": "hi", "model": "nope/x"}, 404, "available models"),
]


@pytest.mark.parametrize(("path", "body", "status", "words"), CASES)
def test_bad_bodies(gw, openai_fake, path, body, status, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(gw.url + path, headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"]
    assert "Traceback" not in r.text
    assert openai_fake.attempts == []


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"prompt": ""},
        {"prompt": "x", "max_tokens": "many"},
        {"prompt": "x", "temperature": "warm"},
    ],
)
def test_bad_get_queries(gw, query):
    r = httpx.get(gw.url + "/chat/stream", params=query)
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_body_over_the_limit(gw, openai_fake):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    r = httpx.post(gw.url + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and "2048" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds for chunked bodies too
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}]}'

    r = httpx.post(
        gw.url + "/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert openai_fake.attempts == []


def test_unknown_route_and_method(gw):
    r = httpx.get(gw.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.delete(gw.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
