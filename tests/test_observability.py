"""/metrics and the structured logs: what operators see, and what they never see."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest

from app.logs import JsonFormatter
from tests.fakes import Scenario
from tests.harness import read_sse

PROMPT = "a secret prompt 7f3a"
CLIENT_KEY = "client-key-5d1e0c9b"


@pytest.fixture
def gw(make_gateway, openai_fake):
    return make_gateway(
        openai_fake=openai_fake, default_model="openai/gpt-4o-mini", api_keys=[CLIENT_KEY]
    )


def metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_count_requests_streams_latency_tokens_and_active(gw, openai_fake):
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    openai_fake.default = Scenario(chunks=["a", "b", "c"], interval=0.2, input_tokens=9)
    seen_active: list[float | None] = []

    def scrape_midway() -> None:
        openai_fake.wait_for_attempts(1, timeout=5)
        seen_active.append(metric(httpx.get(gw.url + "/metrics").text, "gateway_active_streams"))

    t = threading.Thread(target=scrape_midway)
    t.start()
    r = httpx.post(gw.url + "/chat/stream", json={"prompt": PROMPT}, headers=auth, timeout=10)
    t.join()
    assert r.status_code == 200
    openai_fake.default = Scenario(fault="status", status=400)
    bad = httpx.post(gw.url + "/chat/stream", json={"prompt": PROMPT}, headers=auth)
    assert bad.status_code == 400

    text = httpx.get(gw.url + "/metrics").text
    model = "openai/gpt-4o-mini"
    assert seen_active == [1.0] and metric(text, "gateway_active_streams") == 0.0
    assert (
        metric(
            text,
            "gateway_streams_total",
            route="/chat/stream",
            model=model,
            provider="openai",
            outcome="stop",
        )
        == 1.0
    )
    assert metric(text, "gateway_http_requests_total", route="/chat/stream", status="200") == 1
    assert metric(text, "gateway_http_requests_total", route="/chat/stream", status="400") == 1
    assert metric(text, "gateway_time_to_first_token_seconds_count", model=model) == 1.0
    assert metric(text, "gateway_stream_duration_seconds_count", model=model) == 1.0
    assert 0.3 < metric(text, "gateway_stream_duration_seconds_sum", model=model) < 3  # type: ignore[operator]
    assert metric(text, "gateway_tokens_total", model=model, direction="input") == 9.0
    assert metric(text, "gateway_tokens_total", model=model, direction="output") == 3.0
    assert metric(text, "gateway_upstream_attempts_total", target=model) == 2.0


def test_logs_are_json_with_one_summary_per_stream_and_no_secrets(gw, openai_fake, caplog):
    with caplog.at_level(logging.INFO, logger="app"):
        r = httpx.get(
            gw.url + "/chat/stream",
            params={"prompt": PROMPT, "access_token": CLIENT_KEY},
            timeout=10,
        )
        events = read_sse(r)
        assert events[-1].data == "[DONE]"
        openai_fake.default = Scenario(chunks=["a", "b"], fault="cut", fault_after=1)
        httpx.get(gw.url + "/chat/stream", params={"prompt": PROMPT, "access_token": CLIENT_KEY})
    lines = [JsonFormatter().format(rec) for rec in caplog.records]
    records = [json.loads(line) for line in lines]
    rid = r.headers["x-request-id"]
    (summary,) = [x for x in records if x["logger"] == "app.stream" and x.get("request_id") == rid]
    assert summary["model"] == "openai/gpt-4o-mini" and summary["outcome"] == "stop"
    assert summary["output_tokens"] == 2 and summary["ttft_ms"] is not None
    access = [x for x in records if x["logger"] == "app.access" and x.get("request_id") == rid]
    assert access and access[0]["status"] == 200 and access[0]["path"] == "/chat/stream"
    assert any(x["logger"] == "app.stream" and x["outcome"] == "error" for x in records)
    everything = "\n".join(lines)
    for secret in (PROMPT, CLIENT_KEY, "sk-test-upstream-key", "access_token"):
        assert secret not in everything


# -- a bug's 500 --------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _boom(*_args: object, **_kw: object) -> object:
    raise Boom("an internal detail 93c1")


class _BrokenResponse:
    async def __call__(self, scope: object, receive: object, send: object) -> None:
        raise Boom("an internal detail 93c1")


UNHANDLED = "unhandled Boom"


def _unhandled_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(UNHANDLED)]


def _check_500(r: httpx.Response, caplog: pytest.LogCaptureFixture, *, anthropic: bool = False):
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    body = r.json()
    message = body["error"]["message"]
    assert message == "internal error" and "93c1" not in r.text
    assert (body.get("type") == "error") is anthropic
    lines = _unhandled_lines(caplog)
    assert len(lines) == 1, [x.getMessage() for x in lines]  # once, whichever layer caught it
    assert lines[0].getMessage() == f"{UNHANDLED} rid={r.headers['x-request-id']}"
    assert not lines[0].exc_info  # no traceback at info level
    everything = "".join(JsonFormatter().format(x) for x in caplog.records)
    assert "93c1" not in everything and "Traceback" not in everything


CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),  # a direct route
        ("POST", "/v1/messages", {**CHAT, "max_tokens": 5, "stream": True}),  # direct, Anthropic's
        ("GET", "/chat/stream?prompt=hi", None),  # FastAPI's path
    ],
)
def test_a_bug_in_a_route_is_a_json_500_and_one_log_line(
    gw, caplog, monkeypatch, method, path, body
):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(gw.app.state.gateway.router, "resolve", _boom)
    r = httpx.request(method, gw.url + path, json=body, headers=AUTH, timeout=10)
    _check_500(r, caplog, anthropic=path == "/v1/messages")


def test_a_bug_in_a_response_before_it_starts_is_a_json_500(gw, caplog, monkeypatch):
    """Raised by the response itself, outside every route's handler (a direct route's
    response runs in front of FastAPI's error layer): the gateway's middleware answers."""
    import app.api.chat

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(app.api.chat, "sse_response", lambda *a, **k: _BrokenResponse())
    r = httpx.post(gw.url + "/chat/stream", json={"prompt": "hi"}, headers=AUTH, timeout=10)
    _check_500(r, caplog)
    assert httpx.get(gw.url + "/healthz").status_code == 200  # and the server is fine
