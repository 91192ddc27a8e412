"""What an authenticated client can make the gateway hold through streams (issue 11, point 5).

Readers per resumable stream and per client (429), streams open in the
process (503), each with ``Retry-After`` and counted in ``/metrics``; every
place is given back when its stream or reader ends. And a reader that stops
reading holds a small, fixed amount of memory: many raw-socket readers of a
several-MiB log that never read leave the gateway's RSS nearly where it was,
and ``/healthz`` answers within a second meanwhile, in memory and, through
``XREAD``, on a second instance sharing Redis.
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.fakes import Scenario
from tests.harness import free_port, gateway_env, read_stream, sse, wait_until_serving

MODEL = "openai/gpt-4o-mini"
# Runs until stopped (10 s): readers can stay attached to it.
LONG = Scenario(chunks=[f"w{i} " for i in range(200)], interval=0.05)
K1, K2 = "client-key-one-" + "a" * 16, "client-key-two-" + "b" * 16


def metric(gw: Any, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    head = f"{name}{{{want}}} " if labels else name + " "
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(head):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def start(gw: Any, key: str | None = None) -> tuple[str, str]:
    r = httpx.post(gw.url + "/chat/streams", json={"prompt": "hi"}, headers=auth(key), timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"], gw.url + r.json()["events_url"]


def stop(gw: Any, sid: str, key: str | None = None) -> None:
    httpx.delete(gw.url + f"/chat/streams/{sid}", headers=auth(key), timeout=10)


def attach(c: httpx.Client, stack: ExitStack, method: str, url: str, **kw: Any) -> httpx.Response:
    """A streamed response, its body left unread (held open until ``stack`` closes)."""
    r = c.send(c.build_request(method, url, **kw), stream=True)
    stack.callback(r.close)
    if r.status_code != 200:
        r.read()
    return r


def refused(r: httpx.Response, status: int, code: str, setting: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert err["code"] == code and setting in err["message"]
    assert err["type"] == ("rate_limit_error" if status == 429 else "overloaded_error")


def test_readers_per_stream_429_then_a_place_again(make_gateway, openai_fake):
    openai_fake.default = LONG
    gw = make_gateway(openai_fake=openai_fake, default_model=MODEL, max_readers_per_stream=2)
    sid, url = start(gw)
    with httpx.Client(timeout=10) as c, ExitStack() as stack:
        held = [attach(c, stack, "GET", url) for _ in range(2)]
        assert [r.status_code for r in held] == [200, 200]
        assert metric(gw, "gateway_stream_readers") == 2
        third = attach(c, stack, "GET", url)
        refused(third, 429, "too_many_readers", "GATEWAY_MAX_READERS_PER_STREAM")
        # A resume through GET /chat/stream is a reader of the same stream.
        again = attach(c, stack, "GET", gw.url + "/chat/stream", headers={"Last-Event-ID": sid})
        refused(again, 429, "too_many_readers", "GATEWAY_MAX_READERS_PER_STREAM")
        assert metric(gw, "gateway_limit_refusals_total", limit="readers_per_stream") == 2
        # Another stream is not affected.
        other_sid, other = start(gw)
        assert attach(c, stack, "GET", other).status_code == 200
        held[0].close()  # the reader leaves: its place is free again
        eventually(lambda: metric(gw, "gateway_stream_readers") == 2)
        assert attach(c, stack, "GET", url).status_code == 200
    eventually(lambda: metric(gw, "gateway_stream_readers") == 0)
    # Readers that leave at once, some before their response starts: none keeps its place.
    for _ in range(20):
        with closing(silent_reader(gw.port, url.removeprefix(gw.url))) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    eventually(lambda: metric(gw, "gateway_stream_readers") == 0)
    with httpx.Client(timeout=10) as c, ExitStack() as stack:
        assert [attach(c, stack, "GET", url).status_code for _ in range(2)] == [200, 200]
    stop(gw, sid)
    stop(gw, other_sid)
    eventually(lambda: metric(gw, "gateway_open_streams") == 0)
    assert metric(gw, "gateway_stream_readers") == 0


def test_readers_per_client_429_and_other_clients_unaffected(make_gateway, openai_fake):
    openai_fake.default = LONG
    gw = make_gateway(
        openai_fake=openai_fake, default_model=MODEL, api_keys=[K1, K2], max_readers_per_client=3
    )
    s1, url1 = start(gw, K1)
    s2, url2 = start(gw, K1)
    s3, url3 = start(gw, K2)
    with httpx.Client(timeout=10) as c, ExitStack() as stack:
        for url in (url1, url1, url2):
            assert attach(c, stack, "GET", url, headers=auth(K1)).status_code == 200
        # The client's readers across its streams, whether the key comes as a header or
        # as ?access_token= (EventSource).
        # A new GET /chat/stream is a reader too: refused before its generation starts.
        for r in (
            attach(c, stack, "GET", url2, headers=auth(K1)),
            attach(c, stack, "GET", url1, params={"access_token": K1}),
            attach(c, stack, "GET", gw.url + "/chat/stream?prompt=hi", headers=auth(K1)),
        ):
            refused(r, 429, "too_many_client_readers", "GATEWAY_MAX_READERS_PER_CLIENT")
        assert metric(gw, "gateway_limit_refusals_total", limit="readers_per_client") == 3
        assert len(openai_fake.attempts) == 3
        for _ in range(3):  # another client has its own count
            assert attach(c, stack, "GET", url3, headers=auth(K2)).status_code == 200
    for sid, key in ((s1, K1), (s2, K1), (s3, K2)):
        stop(gw, sid, key)
    eventually(lambda: metric(gw, "gateway_open_streams") == 0)


def test_open_streams_503_on_every_route_then_free_again(make_gateway, openai_fake):
    openai_fake.default = LONG
    gw = make_gateway(openai_fake=openai_fake, default_model=MODEL, max_open_streams=3)
    body = {"prompt": "hi"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as c, ExitStack() as stack:
        sid, url = start(gw)  # 1: its generation, read or not
        assert attach(c, stack, "GET", url).status_code == 200  # 2: a reader
        relay = attach(c, stack, "POST", gw.url + "/chat/stream", json=body)  # 3: a relay
        assert relay.status_code == 200
        assert metric(gw, "gateway_open_streams") == 3
        full = [
            attach(c, stack, "POST", gw.url + "/chat/stream", json=body),
            attach(c, stack, "GET", gw.url + "/chat/stream", params=body),
            attach(c, stack, "GET", url),
            c.post(gw.url + "/chat/streams", json=body),
            c.post(gw.url + "/v1/chat/completions", json=chat),
            c.post(gw.url + "/v1/chat/completions", json={**chat, "stream": True}),
            c.post(gw.url + "/chat/fanout", json={**body, "models": [MODEL, MODEL]}),
        ]
        for r in full:
            refused(r, 503, "too_many_open_streams", "GATEWAY_MAX_OPEN_STREAMS")
        with connect(gw.url.replace("http://", "ws://") + "/ws/chat") as ws:
            ws.send(json.dumps(body))
            frames = [json.loads(ws.recv(timeout=10)) for _ in range(2)]
        assert [f["type"] for f in frames] == ["error", "end"]
        assert frames[0]["error"]["code"] == "too_many_open_streams"
        assert metric(gw, "gateway_limit_refusals_total", limit="open_streams") == 8
        assert len(openai_fake.attempts) == 2  # no upstream was called for a refused one
        relay.close()  # the relay's client leaves: its generation ends, its place is free
        eventually(lambda: metric(gw, "gateway_open_streams") == 2)
        # A GET /chat/stream needs two places (its generation and its reader).
        two = attach(c, stack, "GET", gw.url + "/chat/stream", params=body)
        refused(two, 503, "too_many_open_streams", "GATEWAY_MAX_OPEN_STREAMS")
        assert metric(gw, "gateway_open_streams") == 2
        assert attach(c, stack, "POST", gw.url + "/chat/stream", json=body).status_code == 200
    stop(gw, sid)
    # Every place given back: generations ended, readers and relays gone.
    eventually(lambda: metric(gw, "gateway_open_streams") == 0)
    openai_fake.default = Scenario(chunks=["a", "b"])
    assert read_stream(gw.url + "/chat/stream", params=body)[-1].data == "[DONE]"
    eventually(lambda: metric(gw, "gateway_open_streams") == 0)
    assert metric(gw, "gateway_stream_readers") == 0


# -- memory: readers that never read ------------------------------------------------------------

# A several-MiB log, generated in well under a second.
BIG = Scenario(chunks=["x" * 4096] * 1000)
READERS = 32
# What all of them together may add to the gateway's RSS. Before readers were
# handed bounded pieces, each held a copy of what it had not read (~4 MiB here:
# over 128 MiB for 32); now each holds its socket's write buffer and one piece.
BOUND_MB = 24


class Gateway:
    """``python -m app`` in a subprocess, so that its RSS is its own."""

    def __init__(self, openai_fake: Any, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        providers = {"openai": {"kind": "openai", "base_url": openai_fake.base_url}}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--port", str(self.port)],
            env=gateway_env(
                OPENAI_API_KEY="sk-test-upstream-key-0123456789",
                GATEWAY_PROVIDERS=json.dumps(providers),
                GATEWAY_DEFAULT_MODEL=MODEL,
                GATEWAY_LOG_LEVEL="warning",
                GATEWAY_MAX_READERS_PER_STREAM=str(READERS + 8),
                GATEWAY_MAX_READERS_PER_CLIENT=str(READERS + 8),
                **env,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def gateways(openai_fake) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(**env: str) -> Gateway:
        gw = Gateway(openai_fake, **env)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def silent_reader(port: int, path: str) -> socket.socket:
    """A reader that sends its request and never reads a byte."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return s


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_readers_that_never_read_hold_little_memory(openai_fake, gateways, store, request):
    openai_fake.default = BIG
    if store == "memory":
        owner = reader = gateways()
    else:
        server = request.getfixturevalue("redis_server")
        env = {"GATEWAY_REDIS_URL": server.url, "GATEWAY_REDIS_PREFIX": f"t{secrets.token_hex(4)}:"}
        owner, reader = gateways(**env), gateways(**env)  # B reads A's log through XREAD
    for gw in {owner, reader}:
        wait_until_serving(gw.url, gw.proc)
    sid, _ = start(owner)
    path = f"/chat/streams/{sid}/events"
    # One whole read: the log is complete, and the read path is warm.
    with httpx.stream("GET", reader.url + path, timeout=15) as r:
        events = list(sse(r))
    # Handed over in pieces: every event once, in order, whole.
    assert [e.id for e in events] == [f"{sid}:{n}" for n in range(len(events))]
    text = "".join(json.loads(e.data)["content"] for e in events[1:-2])
    assert text == "".join(BIG.chunks) and len(text) > 4_000_000
    assert events[-2].event == "end" and events[-1].data == "[DONE]"
    before = reader.rss_mb()
    with ExitStack() as stack:
        for _ in range(READERS):
            stack.enter_context(closing(silent_reader(reader.port, path)))
        peak, slowest = before, 0.0
        for _ in range(8):  # about 2 s: every reader has been handed what its socket takes
            time.sleep(0.2)
            t = time.monotonic()
            assert httpx.get(reader.url + "/healthz", timeout=2).status_code == 200
            slowest = max(slowest, time.monotonic() - t)
            peak = max(peak, reader.rss_mb())
        # Still attached: each waits on its socket, holding a piece of the log.
        attached = f"gateway_stream_readers {READERS}.0" in httpx.get(reader.url + "/metrics").text
    print(f"{store}: RSS {before:.0f} MB -> peak {peak:.0f} MB, slowest /healthz {slowest:.3f} s")
    assert peak - before < BOUND_MB, f"RSS grew {peak - before:.0f} MB with {READERS} readers"
    assert slowest < 1.0
    assert attached
