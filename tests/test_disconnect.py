"""A client that goes away closes the upstream request at once (within 1 s)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.fakes import Scenario

DRIP = Scenario(chunks=[f"t{i}" for i in range(200)], interval=0.05)


@pytest.fixture
def gw(make_gateway, openai_fake, anthropic_fake):
    return make_gateway(
        openai_fake=openai_fake, anthropic_fake=anthropic_fake, default_model="openai/gpt-4o-mini"
    )


def _leave_after(gw, model, n_events):
    """Read n content events of a simple stream, then drop the connection."""
    with httpx.stream(
        "POST", gw.url + "/chat/stream", json={"prompt": "hi", "model": model}, timeout=10
    ) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith('data: {"content"'):
                seen += 1
                if seen >= n_events:
                    break
    return time.monotonic()


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"])
def test_leaving_mid_stream_closes_the_upstream(gw, openai_fake, anthropic_fake, model):
    fake = openai_fake if model.startswith("openai") else anthropic_fake
    fake.default = DRIP
    left = _leave_after(gw, model, 3)
    closed = fake.wait_closed(0, timeout=3)
    attempt = fake.attempts[0]
    assert closed - left < 1.0
    assert attempt.closed_by_client and not attempt.completed


def test_leaving_while_the_upstream_stalls(gw, openai_fake):
    openai_fake.default = Scenario(chunks=["a", "b"], fault="stall", fault_after=1)
    left = _leave_after(gw, "openai/gpt-4o-mini", 1)
    assert openai_fake.wait_closed(0, timeout=3) - left < 1.0


def test_leaving_before_the_first_token(gw, openai_fake):
    openai_fake.default = Scenario(chunks=["late"], first_token_delay=30)
    # The response starts once the upstream accepted; `start` itself waits for
    # the first token (it names the model that answers).
    with httpx.stream("POST", gw.url + "/chat/stream", json={"prompt": "hi"}) as r:
        assert r.status_code == 200
        openai_fake.wait_for_attempts(1, timeout=3)
    left = time.monotonic()
    assert openai_fake.wait_closed(0, timeout=3) - left < 1.0


def test_openai_sdk_client_closing_the_stream(gw, openai_fake):
    openai_fake.default = DRIP
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        for i, _chunk in enumerate(stream):
            if i == 3:
                break
        stream.close()
    left = time.monotonic()
    assert openai_fake.wait_closed(0, timeout=3) - left < 1.0
    assert openai_fake.attempts[0].closed_by_client
