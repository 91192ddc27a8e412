"""Every upstream fault ends honestly: a status before the stream, error + end + [DONE] after."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.fakes import Scenario
from tests.harness import read_sse

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gw(make_gateway, openai_fake, anthropic_fake):
    return make_gateway(
        openai_fake=openai_fake,
        anthropic_fake=anthropic_fake,
        default_model="openai/gpt-4o-mini",
        first_token_timeout_s=1.0,
        idle_timeout_s=0.5,
        total_timeout_s=5.0,
        connect_timeout_s=1.0,
        max_retries=0,  # retries have their own tests (test_resilience.py)
    )


def simple(gw, model="openai/gpt-4o-mini"):
    with httpx.stream(
        "POST", gw.url + "/chat/stream", json={"prompt": "hi", "model": model}, timeout=10
    ) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, read_sse(r)


def ending(events):
    """(error payload or None, end payload) and the stream's shape checked."""
    assert events[-1].data == "[DONE]"
    assert [e.event for e in events].count("end") == 1
    assert events[-2].event == "end"
    error = events[-3].json()["error"] if events[-3].event == "error" else None
    return error, events[-2].json()


def healthy_after(gw):
    r, events = simple(gw)
    assert r.status_code == 200
    error, end = ending(events)
    assert error is None and end["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("status", "retry_after", "expect"),
    [
        (429, "7", 429),
        (429, None, 429),
        (500, None, 502),
        (503, None, 503),
        (502, None, 502),
    ],
)
def test_upstream_error_status_before_the_stream(gw, openai_fake, status, retry_after, expect):
    openai_fake.enqueue(Scenario(fault="status", status=status, retry_after=retry_after))
    r, _ = simple(gw)
    assert r.status_code == expect
    body = r.json()["error"]
    assert set(body) >= {"message", "type", "code"}
    if expect in (429, 503):
        # The upstream's Retry-After, or the gateway's own estimate (API.md).
        assert r.headers["retry-after"] == (retry_after or r.headers["retry-after"])
        assert int(r.headers["retry-after"]) >= 1
    else:
        assert "retry-after" not in r.headers
    healthy_after(gw)


def test_upstream_400_is_passed_on_with_its_message(gw, openai_fake):
    openai_fake.enqueue(
        Scenario(
            fault="status",
            status=400,
            error_code="context_length_exceeded",
            error_message="This model's maximum context length is 8192.",
        )
    )
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "openai/gpt-4o-mini", "messages": MSG, "stream": True},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "8192" in err["message"]


def test_upstream_auth_failure_hides_the_key(gw, openai_fake):
    openai_fake.enqueue(
        Scenario(
            fault="status",
            status=401,
            error_message=("Incorrect API key provided: sk-test-upstream-key-0123456789."),
        )
    )
    r, _ = simple(gw)
    assert r.status_code == 502
    assert "sk-test" not in r.text and r.json()["error"]["type"] == "upstream_auth_error"


def test_reset_before_headers(gw, openai_fake):
    openai_fake.enqueue(Scenario(fault="reset"))
    r, _ = simple(gw)
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_unavailable"
    healthy_after(gw)


def test_upstream_that_never_answers_times_out_before_the_stream(gw, openai_fake):
    openai_fake.enqueue(Scenario(fault="never_answer"))
    started = time.monotonic()
    r, _ = simple(gw)
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "timeout"
    assert time.monotonic() - started < 3
    openai_fake.wait_closed(0, timeout=2)
    healthy_after(gw)


def test_no_first_token_after_headers(gw, openai_fake):
    openai_fake.enqueue(Scenario(first_token_delay=5))
    r, events = simple(gw)
    assert r.status_code == 200
    error, end = ending(events)
    assert error["type"] == "timeout" and end["finish_reason"] == "timeout"
    assert end["ttft_ms"] is None
    openai_fake.wait_closed(0, timeout=2)


def test_stall_mid_stream(gw, openai_fake):
    openai_fake.enqueue(Scenario(chunks=["a", "b", "c"], fault="stall", fault_after=2))
    _r, events = simple(gw)
    error, end = ending(events)
    assert [e.json()["content"] for e in events[1:3]] == ["a", "b"]
    assert error["type"] == "timeout" and error["retryable"] is True
    assert end["finish_reason"] == "timeout"
    openai_fake.wait_closed(0, timeout=2)
    healthy_after(gw)


def test_a_stall_right_after_the_first_token_hits_the_idle_timeout(make_gateway, openai_fake):
    """The idle deadline replaces a later first-token deadline as soon as content arrives."""
    gw = make_gateway(
        openai_fake=openai_fake,
        default_model="openai/gpt-4o-mini",
        first_token_timeout_s=30,
        idle_timeout_s=0.5,
    )
    openai_fake.enqueue(Scenario(chunks=["a", "b"], fault="stall", fault_after=1))
    started = time.monotonic()
    _r, events = simple(gw)
    error, end = ending(events)
    assert error["type"] == "timeout" and "idle" in error["message"]
    assert end["finish_reason"] == "timeout" and time.monotonic() - started < 3


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"])
@pytest.mark.parametrize("fault", ["cut", "malformed"])
def test_cut_or_unparseable_chunk_is_never_success(gw, openai_fake, anthropic_fake, model, fault):
    scenario = Scenario(chunks=["a", "b", "c"], fault=fault, fault_after=2)
    (openai_fake if model.startswith("openai") else anthropic_fake).enqueue(scenario)
    _r, events = simple(gw, model)
    error, end = ending(events)
    assert error["type"] == "upstream_truncated"
    assert end["finish_reason"] == "error"
    texts = [e.json()["content"] for e in events if e.event == "message" and e.data != "[DONE]"]
    # A cut may also take bytes already received but not yet read (aiohttp
    # raises the connection error ahead of buffered data); what was sent is
    # always a prefix, and the stream never ends as a success.
    assert texts == ["a", "b"] if fault == "malformed" else ["a", "b"][: len(texts)]
    healthy_after(gw)


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"])
def test_finish_without_done_ends_at_once(gw, openai_fake, anthropic_fake, model):
    scenario = Scenario(chunks=["x", "y"], fault="no_done", output_tokens=2)
    (openai_fake if model.startswith("openai") else anthropic_fake).enqueue(scenario)
    started = time.monotonic()
    _r, events = simple(gw, model)
    error, end = ending(events)
    assert error is None and end["finish_reason"] == "stop"
    assert end["usage"]["output_tokens"] == 2
    assert time.monotonic() - started < 2.5  # the tail wait, not the idle timeout
    (openai_fake if model.startswith("openai") else anthropic_fake).wait_closed(0, timeout=3)


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"])
def test_error_event_from_the_upstream(gw, openai_fake, anthropic_fake, model):
    scenario = Scenario(
        chunks=["a", "b"],
        fault="error_event",
        fault_after=1,
        error_type="overloaded_error",
        error_message="Overloaded",
    )
    (openai_fake if model.startswith("openai") else anthropic_fake).enqueue(scenario)
    _r, events = simple(gw, model)
    error, end = ending(events)
    assert error["message"] == "Overloaded" and end["finish_reason"] == "error"


def test_total_timeout(make_gateway, openai_fake):
    gw = make_gateway(
        openai_fake=openai_fake,
        default_model="openai/gpt-4o-mini",
        total_timeout_s=0.8,
        idle_timeout_s=5,
    )
    openai_fake.enqueue(Scenario(chunks=[str(i) for i in range(20)], interval=0.1))
    _r, events = simple(gw)
    error, end = ending(events)
    assert error["type"] == "timeout" and "total" in error["message"]
    assert end["finish_reason"] == "timeout" and 700 <= end["duration_ms"] < 2000


def test_usage_is_reported_as_far_as_known_on_failure(gw, anthropic_fake):
    anthropic_fake.enqueue(Scenario(chunks=["a", "b"], fault="cut", fault_after=1, input_tokens=33))
    _, events = simple(gw, "anthropic/claude-haiku-4-5")
    _, end = ending(events)
    assert end["usage"]["input_tokens"] == 33


def test_unreachable_provider(make_gateway):
    gw = make_gateway(
        default_model="down/m",
        providers={"down": {"kind": "openai-compatible", "base_url": "http://127.0.0.1:9/v1"}},
    )
    r, _ = simple(gw, "down/m")
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_unavailable"
