"""``/ws/chat`` under hostile input: the auth deadline, binary and oversized frames, deep JSON,
long model names, bad tokens. A bad chat frame gets an ``error`` frame and the socket stays
usable; only a failed authentication closes it (1008)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.fakes import Scenario

A = "openai/gpt-4o-mini"
KEY = "k-ws-limits-123456"


@pytest.fixture
def gw(make_gateway, openai_fake):
    openai_fake.default = Scenario(chunks=["o", "k"])
    return make_gateway(
        openai_fake=openai_fake,
        default_model=A,
        max_retries=0,
        ws_max_message_bytes=4096,
        max_json_depth=8,
        max_model_length=32,
    )


@pytest.fixture
def keyed(make_gateway, openai_fake):
    openai_fake.default = Scenario(chunks=["o", "k"])
    return make_gateway(
        openai_fake=openai_fake, default_model=A, api_keys=[KEY], ws_auth_timeout_s=0.5
    )


def ws_url(gw, query=""):
    return gw.url.replace("http://", "ws://") + "/ws/chat" + query


def error_of(ws):
    reply = json.loads(ws.recv(timeout=5))
    assert reply["type"] == "error", reply
    return reply["error"]


def closed_with(ws):
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=5)
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


def chat_works(ws):
    ws.send(json.dumps({"prompt": "hi"}))
    frames = []
    while not frames or frames[-1]["type"] != "end":
        frames.append(json.loads(ws.recv(timeout=5)))
    assert "".join(f.get("content", "") for f in frames) == "ok"
    assert frames[-1]["finish_reason"] == "stop"


def refusals(gw, limit):
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(f'gateway_limit_refusals_total{{limit="{limit}"}}'):
            return float(line.split()[-1])
    return 0.0


# -- before authentication ---------------------------------------------------------------------


def test_no_auth_frame_within_the_deadline_closes_1008(keyed):
    with connect(ws_url(keyed)) as ws:
        opened = time.monotonic()
        err = error_of(ws)
        assert err["type"] == "authentication_error" and err["code"] == "auth_timeout"
        assert "GATEWAY_WS_AUTH_TIMEOUT_S" in err["message"]
        assert closed_with(ws) == (1008, "auth timeout")
        assert 0.3 < time.monotonic() - opened < 2.0
    assert refusals(keyed, "ws_auth_timeout") == 1


def test_a_key_in_the_query_needs_no_auth_frame(keyed):
    with connect(ws_url(keyed, f"?access_token={KEY}")) as ws:
        time.sleep(0.8)  # past the auth deadline: it does not apply
        chat_works(ws)
    assert refusals(keyed, "ws_auth_timeout") == 0


@pytest.mark.parametrize(
    ("auth", "code", "param"),
    [
        ({"type": "auth", "access_token": 123456}, "invalid_value", "access_token"),
        ({"type": "auth", "access_token": {"k": KEY}}, "invalid_value", "access_token"),
        ({"type": "auth", "access_token": [KEY]}, "invalid_value", "access_token"),
        ("not json", "invalid_json", None),
        ([KEY], "invalid_json", None),
        (b"binary", "binary_frame", None),
    ],
)
def test_a_bad_auth_frame_is_refused_with_1008(keyed, auth, code, param):
    with connect(ws_url(keyed)) as ws:
        if isinstance(auth, bytes):
            ws.send(auth)
        else:
            ws.send(auth if isinstance(auth, str) else json.dumps(auth))
        err = error_of(ws)
        assert err["type"] == "invalid_request_error"
        assert err["code"] == code and err["param"] == param and err["message"]
        assert closed_with(ws) == (1008, "bad auth frame")
    # The server is fine: a good auth frame still works.
    with connect(ws_url(keyed)) as ws:
        ws.send(json.dumps({"type": "auth", "access_token": KEY}))
        chat_works(ws)


# -- chat frames: an error frame, the socket stays -----------------------------------------------


def test_a_binary_frame_gets_an_error_and_the_socket_stays(gw):
    with connect(ws_url(gw)) as ws:
        ws.send(b'{"prompt": "hi"}')
        err = error_of(ws)
        assert err["type"] == "invalid_request_error" and err["code"] == "binary_frame"
        assert "binary" in err["message"]
        chat_works(ws)


def test_a_message_over_the_limit_is_refused_unparsed(gw):
    # uvicorn closes first (1009, app.server); the route checks too, for an ASGI server
    # without that limit: lift uvicorn's (read per connection) to reach the route's.
    gw.server.config.ws_max_size = 1024 * 1024
    with connect(ws_url(gw)) as ws:
        ws.send(json.dumps({"prompt": "x" * 5000}))
        err = error_of(ws)
        assert err["type"] == "request_too_large" and err["code"] == "message_too_large"
        assert "4096" in err["message"] and "GATEWAY_WS_MAX_MESSAGE_BYTES" in err["message"]
        # Counted in bytes, not characters: 1400 three-byte characters are 4200 bytes.
        ws.send(json.dumps({"prompt": "€" * 1400}, ensure_ascii=False))
        assert error_of(ws)["code"] == "message_too_large"
        chat_works(ws)
    assert refusals(gw, "ws_message_size") == 2


def test_json_nested_too_deep_names_the_field(gw):
    deep: object = "x"
    for _ in range(20):
        deep = {"a": deep}
    with connect(ws_url(gw)) as ws:
        ws.send(json.dumps({"prompt": "hi", "response_format": deep}))
        err = error_of(ws)
        assert err["type"] == "invalid_request_error" and err["code"] == "json_too_deep"
        assert err["param"] == "response_format" and "GATEWAY_MAX_JSON_DEPTH" in err["message"]
        chat_works(ws)
    assert refusals(gw, "json_depth") == 1


def test_a_model_name_over_the_limit_is_refused(gw, openai_fake):
    with connect(ws_url(gw)) as ws:
        ws.send(json.dumps({"prompt": "hi", "model": "openai/" + "m" * 100}))
        err = error_of(ws)
        assert err["code"] == "model_too_long" and err["param"] == "model"
        assert "32" in err["message"]
        chat_works(ws)
    assert len(openai_fake.attempts) == 1
    assert refusals(gw, "model_length") == 1


def test_a_stop_list_over_the_limit_names_stop(gw):
    with connect(ws_url(gw)) as ws:
        ws.send(json.dumps({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}))
        err = error_of(ws)
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_value"
        assert err["param"] == "stop" and "stop" in err["message"]
        chat_works(ws)


def test_an_unknown_frame_type_names_type(gw):
    with connect(ws_url(gw)) as ws:
        ws.send(json.dumps({"type": "auth", "access_token": "late"}))
        err = error_of(ws)
        assert err["code"] == "invalid_value" and err["param"] == "type"
        assert "'auth'" in err["message"]
        chat_works(ws)
