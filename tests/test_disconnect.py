"""A client that goes away closes the upstream request at once (within 1 s)."""

from __future__ import annotations

import gc
import socket
import time
import weakref

import httpx
import openai
import orjson
import pytest

from tests.fakes import Scenario

DRIP = Scenario(chunks=[f"t{i}" for i in range(200)], interval=0.05)


@pytest.fixture(params=["gateway", "plain"])
def gw(request, make_gateway, openai_fake, anthropic_fake):
    """The gateway's own server, whose HTTP protocol calls the response back on a
    disconnect; and plain uvicorn, where a watcher task waits on ``receive``."""
    return make_gateway(
        openai_fake=openai_fake,
        anthropic_fake=anthropic_fake,
        default_model="openai/gpt-4o-mini",
        plain=request.param == "plain",
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


def watchers(gw) -> int:
    """Watcher tasks (``watch_disconnect``'s) running in the gateway's loop."""
    import asyncio

    found: list[int] = []
    gw.call(
        lambda: found.append(
            sum(
                1
                for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "") == "watch_disconnect.<locals>.watch"
            )
        )
    )
    return found[0]


HELD = Scenario(chunks=["a", "b"], first_token_delay=30)
MSG = [{"role": "user", "content": "hi"}]
SSE_ROUTES = [
    ("POST", "/chat/stream", {"prompt": "hi"}),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "openai/gpt-4o-mini", "messages": MSG, "stream": True},
    ),
    ("POST", "/v1/responses", {"model": "openai/gpt-4o-mini", "input": "hi", "stream": True}),
    (
        "POST",
        "/v1/messages",
        {"model": "openai/gpt-4o-mini", "max_tokens": 9, "messages": MSG, "stream": True},
    ),
    ("POST", "/chat/fanout", {"prompt": "hi", "models": ["openai/gpt-4o-mini", "compat/Qwen3-8B"]}),
]


@pytest.mark.parametrize(("method", "path", "body"), SSE_ROUTES)
def test_which_path_sees_the_disconnect(gw, openai_fake, method, path, body):
    """Under the gateway's server no route starts a watcher task per response (the
    protocol calls back); under plain uvicorn each response has one. Either way the
    upstream is closed within 1 s of the client leaving."""
    openai_fake.default = HELD
    plain = gw.plain
    with httpx.stream(method, gw.url + path, json=body, timeout=10) as r:
        assert r.status_code == 200
        n = 2 if path == "/chat/fanout" else 1
        openai_fake.wait_for_attempts(n, timeout=3)
        assert watchers(gw) == (1 if plain else 0)
    left = time.monotonic()
    for i in range(n):
        assert openai_fake.wait_closed(i, timeout=3) - left < 1.0
    wait_for(lambda: watchers(gw) == 0)


def wait_for(condition, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["GET /chat/stream", "POST /chat/streams"])
def test_a_resumable_reader_leaving(gw, openai_fake, how):
    """A resumable stream's reader leaving ends its response (seen by the same path);
    the generation goes on for a reader that reconnects."""
    openai_fake.default = HELD
    if how == "GET /chat/stream":
        url = gw.url + "/chat/stream?prompt=hi"
    else:
        url = (
            gw.url
            + httpx.post(gw.url + "/chat/streams", json={"prompt": "hi"}).json()["events_url"]
        )
    with httpx.stream("GET", url, timeout=10) as r:
        assert r.status_code == 200
        openai_fake.wait_for_attempts(1, timeout=3)
        assert watchers(gw) == (1 if gw.plain else 0)
        assert gw.app.state.gateway.dispatch.capacity.readers == 1
    wait_for(lambda: watchers(gw) == 0 and gw.app.state.gateway.dispatch.capacity.readers == 0)
    assert openai_fake.attempts[0].closed_at is None


def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    data = orjson.dumps(body)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data)
    )
    return s


def test_a_pipelined_request_does_not_hide_the_disconnect(make_gateway, openai_fake):
    """A client that sends a second request behind its open stream, then leaves: uvicorn
    marks only the newest request disconnected (and reads nothing more while one waits),
    so the running stream learns of it when its next write (here a ping) finds the
    connection gone; then the upstream is closed."""
    gw = make_gateway(
        openai_fake=openai_fake, default_model="openai/gpt-4o-mini", ping_interval_s=0.3
    )
    openai_fake.default = HELD
    body = {"model": "openai/gpt-4o-mini", "messages": MSG, "stream": True}
    s = _raw_post(gw.port, "/v1/chat/completions", body)
    openai_fake.wait_for_attempts(1, timeout=3)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    time.sleep(0.2)
    s.close()
    left = time.monotonic()
    assert openai_fake.wait_closed(0, timeout=5) - left < 3.0
    assert openai_fake.attempts[0].closed_by_client


def test_a_closed_connection_is_freed_without_the_cycle_collector(make_gateway, openai_fake):
    """The hook each request's scope holds points back at its connection's protocol; it
    is dropped on close, so nothing waits for a full collection (which the frozen heap
    makes rare) to free a connection, its scope and its request state."""
    gw = make_gateway(openai_fake=openai_fake, default_model="openai/gpt-4o-mini")
    openai_fake.default = Scenario(chunks=["a", "b"])
    refs: list[weakref.ref] = []
    gc.collect()
    gc.disable()
    try:
        with httpx.Client(timeout=10) as c:
            assert c.post(gw.url + "/chat/stream", json={"prompt": "hi"}).status_code == 200
            gw.call(lambda: refs.extend(weakref.ref(p) for p in gw.server.server_state.connections))
        assert refs
        wait_for(lambda: all(r() is None for r in refs))
    finally:
        gc.enable()
