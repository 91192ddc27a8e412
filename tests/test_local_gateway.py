"""The default set-up end to end: no configuration, the embedded model answers."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.harness import read_sse

pytestmark = pytest.mark.local_model


@pytest.fixture(scope="module")
def gw():
    from tests.harness import GatewayServer, make_settings

    server = GatewayServer(make_settings(local_enabled=True)).start()
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the embedded model did not load"
        time.sleep(0.1)
    yield server
    server.stop()


def test_simple_stream_from_the_embedded_model(gw):
    events = read_sse(
        httpx.get(
            gw.url + "/chat/stream", params={"prompt": "The sea is", "max_tokens": 8}, timeout=60
        )
    )
    start = events[0].json()
    assert start["model"] == "local/gemma-3-270m" and start["provider"] == "local"
    texts = [e.json()["content"] for e in events if e.event == "message" and e.data != "[DONE]"]
    assert len(texts) >= 2 and "".join(texts).strip()
    end = next(e.json() for e in events if e.event == "end")
    assert end["finish_reason"] in ("length", "stop")
    assert end["usage"]["input_tokens"] > 0 and 0 < end["usage"]["output_tokens"] <= 8
    assert events[-1].data == "[DONE]"


def test_openai_sdk_against_the_embedded_model(gw):
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x") as client:
        models = [m.id for m in client.models.list()]
        assert "local/gemma-3-270m" in models
        result = client.chat.completions.create(
            messages=[{"role": "user", "content": "Hello"}],
            model="local/gemma-3-270m",
            max_tokens=6,
            temperature=0,
        )
    assert result.choices[0].message.content
    assert result.usage.completion_tokens <= 6
