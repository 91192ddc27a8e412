"""Server side of the browser features: fan-out, the WebSocket route, CORS, the page's headers."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.sync.client import connect

from tests.fakes import Scenario
from tests.harness import read_sse

A, B = "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"


@pytest.fixture
def gw(make_gateway, openai_fake, anthropic_fake):
    return make_gateway(
        openai_fake=openai_fake,
        anthropic_fake=anthropic_fake,
        default_model=A,
        max_retries=0,
        first_token_timeout_s=2.0,
        idle_timeout_s=1.0,
    )


def fanout(gw, models, **body):
    with httpx.stream(
        "POST", gw.url + "/chat/fanout", json={"prompt": "hi", "models": models, **body}, timeout=15
    ) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, read_sse(r)


# -- fan-out ----------------------------------------------------------------------------------


def test_fanout_streams_every_model_concurrently(gw, openai_fake, anthropic_fake):
    openai_fake.default = Scenario(chunks=["a1 ", "a2 ", "a3"], interval=0.4)
    anthropic_fake.default = Scenario(chunks=["b1 ", "b2 ", "b3"], interval=0.4)
    started = time.monotonic()
    r, events = fanout(gw, [A, B])
    assert r.status_code == 200
    # Concurrent, not one after the other: about 0.8 s, not 1.6.
    assert time.monotonic() - started < 1.4
    assert events[-1].data == "[DONE]" and [e.data for e in events].count("[DONE]") == 1
    body = [e for e in events if e.data != "[DONE]"]
    ids = [int(e.id.rsplit(":", 1)[1]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    per_model = {}
    for e in body:
        data = e.json()
        per_model.setdefault(data["index"], []).append((e.event, data))
        assert data["model"] == [A, B][data["index"]]
    for index, text in ((0, "a1 a2 a3"), (1, "b1 b2 b3")):
        kinds = [k for k, _ in per_model[index]]
        assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("end") == 1
        assert "".join(d["content"] for k, d in per_model[index] if k == "message") == text
        assert per_model[index][-1][1]["finish_reason"] == "stop"
    # Interleaved: the second model's first token came before the first model's last.
    order = [e.json()["index"] for e in body if e.event == "message"]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)


def test_one_model_failing_does_not_stop_the_others(gw, openai_fake, anthropic_fake):
    openai_fake.default = Scenario(fault="status", status=400, error_message="bad request here")
    anthropic_fake.default = Scenario(chunks=["fine"], interval=0.1)
    _r, events = fanout(gw, [A, B])
    by_index = {0: [], 1: []}
    for e in events[:-1]:
        by_index[e.json()["index"]].append(e)
    assert [e.event for e in by_index[0]] == ["start", "error", "end"]
    assert by_index[0][1].json()["error"]["message"] == "bad request here"
    assert by_index[0][2].json()["finish_reason"] == "error"
    assert by_index[1][-1].json()["finish_reason"] == "stop"
    assert events[-1].data == "[DONE]"


def test_fanout_bad_input_is_a_4xx_naming_the_field(gw, make_gateway):
    r, _ = fanout(gw, [A])
    assert r.status_code == 400 and "models" in r.json()["error"]["message"]
    r, _ = fanout(gw, [A, B, A, B, A])
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_models"
    r, _ = fanout(gw, [A, "ghost/model"])
    assert r.status_code == 404 and "ghost" in r.json()["error"]["message"]


def test_a_client_leaving_a_fanout_closes_every_upstream(gw, openai_fake, anthropic_fake):
    openai_fake.default = Scenario(chunks=[f"a{i}" for i in range(50)], interval=0.1)
    anthropic_fake.default = Scenario(chunks=[f"b{i}" for i in range(50)], interval=0.1)
    with httpx.stream(
        "POST", gw.url + "/chat/fanout", json={"prompt": "hi", "models": [A, B]}, timeout=10
    ) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 6:
                break
    left = time.monotonic()
    assert openai_fake.wait_closed(0, timeout=3) - left < 1.0
    assert anthropic_fake.wait_closed(0, timeout=3) - left < 1.0


# -- WebSocket ---------------------------------------------------------------------------------


def ws_url(gw, query=""):
    return gw.url.replace("http://", "ws://") + "/ws/chat" + query


def receive_until_end(ws):
    frames = []
    while True:
        f = json.loads(ws.recv(timeout=10))
        frames.append(f)
        if f["type"] == "end":
            return frames


def test_websocket_requests_in_turn(gw, openai_fake):
    openai_fake.default = Scenario(chunks=["Hel", "lo"])
    with connect(ws_url(gw)) as ws:
        for _ in range(2):
            ws.send(json.dumps({"prompt": "hi", "model": A}))
            frames = receive_until_end(ws)
            assert [f["type"] for f in frames] == ["start", "content", "content", "end"]
            assert "".join(f.get("content", "") for f in frames) == "Hello"
            assert frames[-1]["finish_reason"] == "stop" and frames[-1]["model"] == A
    assert len(openai_fake.attempts) == 2


def test_websocket_cancel_stops_at_once(gw, openai_fake):
    openai_fake.default = Scenario(chunks=[f"t{i}" for i in range(100)], interval=0.1)
    with connect(ws_url(gw)) as ws:
        ws.send(json.dumps({"prompt": "hi"}))
        while json.loads(ws.recv(timeout=5))["type"] != "content":
            pass
        ws.send(json.dumps({"type": "cancel"}))
        sent = time.monotonic()
        frames = receive_until_end(ws)
        assert frames[-1]["finish_reason"] == "cancelled"
        assert all(f["type"] != "error" for f in frames)
        assert openai_fake.wait_closed(0, timeout=3) - sent < 1.0
        # The connection goes on: another request in turn.
        openai_fake.default = Scenario(chunks=["again"])
        ws.send(json.dumps({"prompt": "hi"}))
        assert receive_until_end(ws)[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"type": "dance"}', "invalid_value"),
        ('{"prompt": 5}', "invalid_value"),
        ('{"model": "openai/gpt-4o-mini"}', "invalid_value"),
        ('{"prompt": "hi", "model": "ghost/m"}', "model_not_found"),
    ],
)
def test_websocket_bad_frames_get_an_error_frame_and_the_connection_stays(
    gw, openai_fake, frame, code
):
    with connect(ws_url(gw)) as ws:
        ws.send(frame)
        reply = json.loads(ws.recv(timeout=5))
        assert reply["type"] == "error" and reply["error"]["code"] == code
        assert reply["error"]["message"]
        ws.send(json.dumps({"prompt": "hi"}))
        assert receive_until_end(ws)[-1]["finish_reason"] == "stop"


def test_websocket_busy_while_generating(gw, openai_fake):
    openai_fake.default = Scenario(chunks=["a", "b", "c"], interval=0.2)
    with connect(ws_url(gw)) as ws:
        ws.send(json.dumps({"prompt": "hi"}))
        ws.send(json.dumps({"prompt": "again"}))
        frames = receive_until_end(ws)
        errors = [f for f in frames if f["type"] == "error"]
        assert errors and errors[0]["error"]["code"] == "busy"
        assert frames[-1]["finish_reason"] == "stop"
    assert len(openai_fake.attempts) == 1


def test_websocket_auth_by_query_or_first_frame(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake, default_model=A, api_keys=["k-123456"])
    with connect(ws_url(gw, "?access_token=k-123456")) as ws:
        ws.send(json.dumps({"prompt": "hi"}))
        assert receive_until_end(ws)[-1]["finish_reason"] == "stop"
    with connect(ws_url(gw)) as ws:
        ws.send(json.dumps({"type": "auth", "access_token": "k-123456"}))
        ws.send(json.dumps({"prompt": "hi"}))
        assert receive_until_end(ws)[-1]["finish_reason"] == "stop"
    with connect(ws_url(gw)) as ws:
        ws.send(json.dumps({"type": "auth", "access_token": "wrong"}))
        reply = json.loads(ws.recv(timeout=5))
        assert reply["error"]["type"] == "authentication_error"
        with pytest.raises(Exception, match="1008"):
            ws.recv(timeout=5)


def test_websocket_disconnect_stops_the_upstream(gw, openai_fake):
    openai_fake.default = Scenario(chunks=[f"t{i}" for i in range(100)], interval=0.1)
    with connect(ws_url(gw)) as ws:
        ws.send(json.dumps({"prompt": "hi"}))
        while json.loads(ws.recv(timeout=5))["type"] != "content":
            pass
    left = time.monotonic()
    assert openai_fake.wait_closed(0, timeout=3) - left < 1.0


# -- CORS and the page --------------------------------------------------------------------------


def test_cors_preflight_allows_only_the_configured_origins(make_gateway, openai_fake):
    gw = make_gateway(
        openai_fake=openai_fake, default_model=A, cors_origins=["https://app.example"]
    )
    headers = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = httpx.options(gw.url + "/chat/stream", headers=headers)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.options(gw.url + "/chat/stream", headers={**headers, "Origin": "https://evil.test"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.post(
        gw.url + "/chat/stream", json={"prompt": "hi"}, headers={"Origin": "https://app.example"}
    )
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_a_wildcard_origin_never_comes_with_credentials(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake, default_model=A, cors_origins=["*"])
    r = httpx.options(
        gw.url + "/chat/stream",
        headers={"Origin": "https://any.test", "Access-Control-Request-Method": "POST"},
    )
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers


def test_the_page_is_served_with_a_strict_csp(gw):
    r = httpx.get(gw.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    js = httpx.get(gw.url + "/static/gateway-client.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "export" in js.text
