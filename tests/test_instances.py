"""Two gateway processes sharing one real Redis (issue 6): any instance serves any stream.

Start on A, resume on B; stop from B what runs on A; a rate limit and a
concurrency cap that hold across both; a reader on B that keeps A's stream
alive past the grace; A killed mid-stream; and Redis going away mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import ServerSentEvent

from tests.fakes import OpenAIFake, Scenario
from tests.harness import free_port, gateway_env, sse, wait_until_serving
from tests.harness import read_stream as read
from tests.redis_server import RedisServer

CHUNKS = [f"t{i} " for i in range(40)]
LONG = Scenario(chunks=[f"w{i}" for i in range(500)], interval=0.02)


class Instance:
    def __init__(self, fake: OpenAIFake, redis_url: str, prefix: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        providers = {"up": {"kind": "openai-compatible", "base_url": fake.base_url}}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--port", str(self.port)],
            env=gateway_env(
                GATEWAY_PROVIDERS=json.dumps(providers),
                GATEWAY_DEFAULT_MODEL="up/model",
                GATEWAY_REDIS_URL=redis_url,
                GATEWAY_REDIS_PREFIX=prefix,
                GATEWAY_LOG_LEVEL="warning",
                **env,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self) -> Instance:
        wait_until_serving(self.url, self.proc)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def pair(fake: OpenAIFake, redis_url: str, **env: str) -> tuple[Instance, Instance]:
    prefix = f"t{secrets.token_hex(4)}:"
    a = Instance(fake, redis_url, prefix, **env)
    b = Instance(fake, redis_url, prefix, **env)
    return a.wait(), b.wait()


@pytest.fixture(scope="module")
def fake() -> Iterator[OpenAIFake]:
    server = OpenAIFake().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ab(fake, redis_server) -> Iterator[tuple[Instance, Instance]]:
    a, b = pair(fake, redis_server.url, GATEWAY_RESUME_GRACE_S="1")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(autouse=True)
def fresh(fake) -> Iterator[None]:
    fake.reset_record()
    fake.clear_queue()
    fake.default = Scenario(chunks=CHUNKS, interval=0.03)
    yield


def start(inst: Instance, path: str = "/chat/streams") -> tuple[str, str]:
    r = httpx.post(inst.url + path, json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["events_url"]


def ids(sid: str, events: list[ServerSentEvent]) -> list[str]:
    return [f"{sid}:{n}" for n in range(len(events))]


def test_start_on_a_resume_on_b(ab, fake):
    a, b = ab
    sid, path = start(a)
    first = read(a.url + path, content=5)
    rest = read(b.url + path, last=first[-1].id)
    events = first + rest
    assert [e.id for e in events] == ids(sid, events)
    text = "".join(orjson.loads(e.data)["content"] for e in events[1:-2])
    assert text == "".join(CHUNKS)
    assert events[-2].event == "end" and orjson.loads(events[-2].data)["finish_reason"] == "stop"
    assert events[-1].data == "[DONE]"
    assert len(fake.attempts) == 1  # one generation, on A
    r = httpx.get(b.url + path, headers={"Last-Event-ID": events[-1].id})
    assert r.status_code == 204


def test_event_source_reconnect_lands_on_the_other_instance(ab, fake):
    a, b = ab
    params = {"prompt": "hi"}
    first = read(a.url + "/chat/stream", params=params, content=4)
    sid = orjson.loads(first[0].data)["id"]
    rest = read(b.url + "/chat/stream", params=params, last=first[-1].id)
    events = first + rest
    assert [e.id for e in events] == ids(sid, events)
    assert events[-1].data == "[DONE]"
    assert len(fake.attempts) == 1


def test_stop_from_b_stops_the_generation_on_a(ab, fake):
    a, b = ab
    fake.default = LONG
    sid, path = start(a)
    first = read(b.url + path, content=3)
    stopped = time.monotonic()
    r = httpx.delete(b.url + f"/chat/streams/{sid}", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "cancelled"
    assert fake.wait_closed(0, timeout=3) - stopped < 1.0
    assert not fake.attempts[0].completed
    rest = read(a.url + path, last=first[-1].id)
    assert orjson.loads(rest[-2].data)["finish_reason"] == "cancelled"
    assert rest[-1].data == "[DONE]"


def test_a_reader_on_b_keeps_the_stream_on_a_past_the_grace(ab, fake):
    a, b = ab
    fake.default = Scenario(chunks=[f"w{i}" for i in range(100)], interval=0.03)  # 3 s
    _sid, path = start(a)
    events = read(b.url + path)  # A has no reader of its own the whole time
    assert orjson.loads(events[-2].data)["finish_reason"] == "stop"
    assert len(events) == 100 + 3
    assert fake.attempts[0].completed


def test_rate_limit_and_concurrency_cap_hold_across_instances(fake, redis_server):
    a, b = pair(
        fake, redis_server.url, GATEWAY_RATE_LIMIT_RPM="4", GATEWAY_MAX_CONCURRENT_STREAMS="1"
    )
    try:
        fake.default = LONG
        sid, _ = start(a)
        # One running on A: B refuses a second at once.
        r = httpx.post(b.url + "/chat/streams", json={"prompt": "hi"})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "too_many_concurrent_streams"
        assert r.headers["retry-after"] == "1"
        r = httpx.post(b.url + "/v1/chat/completions", json={"messages": [], "model": "x"})
        assert r.status_code in (400, 404)  # refused on its merits before any count
        assert httpx.delete(b.url + f"/chat/streams/{sid}").status_code == 200
        fake.default = Scenario(chunks=["ok"])
        # The slot is free again; two more on B and one on A make four this minute.
        for inst in (b, b):
            r = httpx.post(inst.url + "/chat/stream", json={"prompt": "hi"})
            assert r.status_code == 200
            r.read()
        r = httpx.post(
            a.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "model": "up/model"},
        )
        assert r.status_code == 200, r.text
        for inst in (a, b):
            r = httpx.post(inst.url + "/chat/stream", json={"prompt": "hi"})
            assert r.status_code == 429
            err = r.json()["error"]
            assert err["code"] == "rate_limit_exceeded"
            assert 1 <= int(r.headers["retry-after"]) <= 60
        assert len(fake.attempts) == 4
    finally:
        a.stop()
        b.stop()


def test_redis_going_away_mid_stream_ends_it_cleanly(fake):
    redis = RedisServer().start()
    inst = Instance(fake, redis.url, "gone:").wait()
    try:
        fake.default = LONG
        sid, path = start(inst)
        events: list[ServerSentEvent] = []
        with httpx.stream("GET", inst.url + path, timeout=15) as r:
            for ev in sse(r):
                events.append(ev)
                if len(events) == 4:
                    redis.stop()
                    killed = time.monotonic()
        ended = time.monotonic()
        assert ended - killed < 5.0  # no hang
        assert [e.id for e in events] == ids(sid, events)
        assert [e.event for e in events[-3:]] == ["error", "end", "message"]
        assert orjson.loads(events[-3].data)["error"]["code"] == "store_unavailable"
        assert orjson.loads(events[-2].data)["finish_reason"] == "error"
        assert events[-1].data == "[DONE]"
        # The generation was stopped too: no tokens for nobody.
        fake.wait_closed(0, timeout=5)
        assert not fake.attempts[0].completed
        ready = httpx.get(inst.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["redis"] == "unreachable"
        r = httpx.post(inst.url + "/chat/streams", json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "store_unavailable"
        assert r.headers["retry-after"] == "1"
        assert "redis://" not in r.text
        # The EventSource route finds out before it calls any upstream.
        before = len(fake.attempts)
        r = httpx.get(inst.url + "/chat/stream", params={"prompt": "hi"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        assert len(fake.attempts) == before
    finally:
        inst.stop()
        redis.stop()


def test_a_crashed_instance_s_stream_ends_honestly_for_its_readers(fake, redis_server):
    a, b = pair(fake, redis_server.url)
    try:
        fake.default = LONG
        sid, path = start(a)
        events: list[ServerSentEvent] = []
        with httpx.stream("GET", b.url + path, timeout=20) as r:
            for ev in sse(r):
                events.append(ev)
                if len(events) == 4:
                    a.stop()  # SIGKILL: no drain, no end written by A
                    killed = time.monotonic()
        assert time.monotonic() - killed < 15.0  # the owner's heartbeat lapses, then the end
        assert [e.id for e in events] == ids(sid, events)
        assert [e.event for e in events[-3:]] == ["error", "end", "message"]
        assert orjson.loads(events[-3].data)["error"]["code"] == "instance_lost"
        assert orjson.loads(events[-2].data)["finish_reason"] == "error"
        # Every later reader sees the same single ending.
        again = read(b.url + path)
        assert [e.id for e in again] == [e.id for e in events[: len(again)]]
        assert [e.event for e in again].count("end") == 1
        r = httpx.get(b.url + path, headers={"Last-Event-ID": events[-1].id})
        assert r.status_code == 204
    finally:
        a.stop()
        b.stop()


def test_a_stop_reaches_an_owner_that_missed_the_message(fake, redis_server):
    from tests.harness import GatewayServer, make_settings

    prefix = f"t{secrets.token_hex(4)}:"
    providers = {"up": {"kind": "openai-compatible", "base_url": fake.base_url}}
    settings = {
        "providers": providers,
        "default_model": "up/model",
        "redis_url": redis_server.url,
        "redis_prefix": prefix,
    }
    a = GatewayServer(make_settings(**settings))
    store = a.app.state.gateway.streams.store

    async def deaf(on_cancel: Any) -> None:  # A's subscription is down the whole time
        await asyncio.Event().wait()

    store._listen = deaf
    a.start()
    b = Instance(fake, redis_server.url, prefix).wait()
    try:
        fake.default = LONG
        r = httpx.post(a.url + "/chat/streams", json={"prompt": "hi"}, timeout=10)
        sid = r.json()["id"]
        fake.wait_for_attempts(1, timeout=3)
        stopped = time.monotonic()
        r = httpx.delete(b.url + f"/chat/streams/{sid}", timeout=10)
        assert r.status_code == 200 and r.json()["finish_reason"] == "cancelled"
        assert fake.wait_closed(0, timeout=3) - stopped < 3.0  # within a heartbeat or two
    finally:
        b.stop()
        a.stop()
