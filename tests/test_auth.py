"""Client keys: Bearer on every route but health; access_token on GET streams only."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from tests.harness import read_sse

KEY = "gw-client-key-4f9a8b7c"


@pytest.fixture
def gw(make_gateway, openai_fake):
    return make_gateway(
        openai_fake=openai_fake,
        default_model="openai/gpt-4o-mini",
        api_keys=[KEY, "second-key-123"],
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/chat/stream"),
        ("GET", "/chat/stream?prompt=hi"),
    ],
)
def test_routes_need_a_key(gw, openai_fake, method, path):
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.request(
            method, gw.url + path, json=body if method == "POST" else None, headers=headers
        )
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert KEY not in r.text
    assert openai_fake.attempts == []


def test_health_is_open(gw):
    assert httpx.get(gw.url + "/healthz").status_code == 200
    assert httpx.get(gw.url + "/readyz").status_code == 200


def test_bearer_key_works_with_the_sdk(gw):
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="second-key-123") as client:
        r = client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert r.choices[0].message.content == "Hello world"


def test_access_token_only_on_get_streams(gw):
    events = read_sse(
        httpx.get(gw.url + "/chat/stream", params={"prompt": "hi", "access_token": KEY})
    )
    assert events[-1].data == "[DONE]"
    r = httpx.post(gw.url + f"/chat/stream?access_token={KEY}", json={"prompt": "hi"})
    assert r.status_code == 401


def test_keys_never_reach_the_logs(gw, caplog):
    caplog.set_level(logging.DEBUG)
    read_sse(httpx.get(gw.url + "/chat/stream", params={"prompt": "hi", "access_token": KEY}))
    httpx.post(
        gw.url + "/chat/stream",
        json={"prompt": "hi"},
        headers={"Authorization": "Bearer wrong-key-xyz"},
    )
    # The gateway's own loggers (the test's HTTP client logs its URLs itself).
    ours = [r for r in caplog.records if r.name.startswith(("app", "uvicorn"))]
    assert any("/chat/stream" in r.getMessage() for r in ours)
    text = "\n".join(r.getMessage() for r in ours)
    assert KEY not in text and "wrong-key-xyz" not in text
    assert "sk-test-upstream-key" not in text
