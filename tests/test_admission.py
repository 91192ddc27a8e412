"""Every route that generates admits through ``app.dispatch``, in one order.

Draining is refused first (503 ``shutting_down``, with ``Retry-After``), and
that refusal does not use up one of the client's requests per minute; the
fan-out route is refused before its stream starts, like the others.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.sync.client import connect

OPENAI_BODY = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
SIMPLE_BODY = {"model": "openai/gpt-4o-mini", "prompt": "hi"}

# (method, path, json body) for each HTTP route that starts a generation.
ROUTES = [
    ("POST", "/v1/chat/completions", {**OPENAI_BODY, "stream": True}),
    ("POST", "/v1/chat/completions", OPENAI_BODY),
    ("POST", "/chat/stream", SIMPLE_BODY),
    ("GET", "/chat/stream?prompt=hi&model=openai/gpt-4o-mini", None),
    ("POST", "/chat/streams", SIMPLE_BODY),
    ("POST", "/chat/fanout", {"models": ["openai/gpt-4o-mini", "openai/gpt-4o"], "prompt": "hi"}),
]
IDS = ["openai-stream", "openai", "simple-post", "simple-get", "resumable", "fanout"]


def _set_draining(gw, value: bool) -> None:
    gw.call(lambda: setattr(gw.app.state.gateway.dispatch, "draining", value))


def _send(gw, method: str, path: str, body) -> httpx.Response:
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        response = client.request(method, path, json=body)
        response.read()
        return response


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=IDS)
def test_draining_is_refused_first_and_costs_no_request(
    make_gateway, openai_fake, method, path, body
):
    gw = make_gateway(openai_fake=openai_fake, rate_limit_rpm=1)
    _set_draining(gw, True)
    for _ in range(2):  # twice: a refusal that counted would make the second a 429
        refused = _send(gw, method, path, body)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "1"
    assert openai_fake.attempts == []  # no upstream was called

    _set_draining(gw, False)
    admitted = _send(gw, method, path, body)
    assert admitted.status_code in (200, 201), admitted.text
    # The one request of this minute is now used: the next is over the limit.
    limited = _send(gw, method, path, body)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"


def test_websocket_requests_are_refused_while_draining(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake, rate_limit_rpm=1)
    _set_draining(gw, True)
    with connect(gw.url.replace("http", "ws") + "/ws/chat") as ws:
        ws.send(json.dumps(SIMPLE_BODY))
        error = json.loads(ws.recv(timeout=5))
        end = json.loads(ws.recv(timeout=5))
        assert error["type"] == "error" and error["error"]["code"] == "shutting_down"
        assert end["type"] == "end" and end["finish_reason"] == "error"
        _set_draining(gw, False)
        ws.send(json.dumps(SIMPLE_BODY))  # the refusal did not use up the minute's request
        frames = []
        while not frames or frames[-1]["type"] != "end":
            frames.append(json.loads(ws.recv(timeout=5)))
        assert frames[-1]["finish_reason"] == "stop"
    assert len(openai_fake.attempts) == 1


def test_a_full_process_refuses_before_the_clients_own_limit(make_gateway, openai_fake):
    """The open-streams cap (503) is checked before the rate limit counts the request."""
    gw = make_gateway(openai_fake=openai_fake, rate_limit_rpm=1, max_open_streams=1)
    capacity = gw.app.state.gateway.dispatch.capacity
    gw.call(lambda: setattr(capacity, "open", 1))  # as if one stream were open
    for _ in range(2):
        refused = _send(gw, "POST", "/chat/stream", SIMPLE_BODY)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "too_many_open_streams"
    gw.call(lambda: setattr(capacity, "open", 0))
    assert _send(gw, "POST", "/chat/stream", SIMPLE_BODY).status_code == 200


def test_every_route_frees_its_place_when_its_generation_is_over(make_gateway, openai_fake):
    """One stream at a time for this client: each route's generation, once over, leaves
    the running set and frees the client's slot for the next."""
    gw = make_gateway(openai_fake=openai_fake, max_concurrent_streams=1)
    for method, path, body in ROUTES:
        response = _send(gw, method, path, body)
        assert response.status_code in (200, 201), (path, response.text)
        if path == "/chat/streams":  # it runs on its own: read it to its end
            with httpx.stream("GET", gw.url + response.json()["events_url"], timeout=10) as r:
                r.read()
    state = gw.app.state.gateway
    deadline = time.monotonic() + 5  # the last generation closes just after its [DONE]
    while state.dispatch.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.dispatch.active == set()
    assert state.dispatch.rate_limits.active == {}  # no client holds a slot
