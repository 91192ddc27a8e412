"""Resumable streams (issue 6), in memory and in a real Redis: replay, 204, 404, stop, grace.

Every test runs once per store. Each checks what the client received, event
by event (ids contiguous, nothing twice, one ``end``, ``[DONE]`` last), and
how many generations the fake upstream saw.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import ServerSentEvent

from app.errors import StoreUnavailable
from app.wire.simple import ending_frames
from tests.fakes import Scenario
from tests.harness import read_stream as read
from tests.harness import sse

CHUNKS = [f"t{i} " for i in range(40)]
DRIP = Scenario(chunks=CHUNKS, interval=0.03)
MODEL = "openai/gpt-4o-mini"


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings for the store under test (each Redis test has its own key prefix)."""
    if request.param == "memory":
        return {}
    server = request.getfixturevalue("redis_server")
    return {"redis_url": server.url, "redis_prefix": f"t{secrets.token_hex(4)}:"}


@pytest.fixture
def gw(make_gateway, openai_fake, store):
    openai_fake.default = DRIP
    return make_gateway(openai_fake=openai_fake, default_model=MODEL, **store)


def start(gw, **body: Any) -> tuple[str, str]:
    r = httpx.post(gw.url + "/chat/streams", json={"prompt": "hi", **body}, timeout=10)
    assert r.status_code == 201, r.text
    data = r.json()
    assert data["events_url"] == f"/chat/streams/{data['id']}/events"
    assert r.headers["location"] == data["events_url"]
    return data["id"], gw.url + data["events_url"]


def wait_for(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll ``check`` until it holds (a deadline, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.01)


def on_loop(gw: Any, coro: Any) -> Any:
    """Run ``coro`` on the gateway's event loop (where its store lives) and return its result."""
    return asyncio.run_coroutine_threadsafe(coro, gw.server.loop).result(5)


def logged(gw: Any, sid: str) -> int:
    """The number of the stream's last logged event, as its store says."""
    meta = on_loop(gw, gw.app.state.gateway.streams.store.meta(sid))
    assert meta is not None
    last: int = meta.last
    return last


def number(event_id: str | None) -> int:
    assert event_id is not None
    return int(event_id.rpartition(":")[2])


def check_whole(sid: str, events: list[ServerSentEvent], *, text: str) -> dict[str, Any]:
    """One whole stream: ids sid:0.. with no gap or repeat, start, the text, one end, [DONE]."""
    assert [e.id for e in events] == [f"{sid}:{n}" for n in range(len(events))]
    assert events[0].event == "start"
    assert "".join(orjson.loads(e.data)["content"] for e in events[1:-2]) == text
    assert [e.event for e in events].count("end") == 1
    assert events[-2].event == "end" and events[-1].data == "[DONE]"
    end: dict[str, Any] = orjson.loads(events[-2].data)
    return end


def test_disconnect_and_resume_gets_the_rest_once(gw, openai_fake):
    sid, url = start(gw)
    first = read(url, content=5)
    assert first[0].event == "start" and len(first) == 6
    # The generation runs on without a reader.
    wait_for(lambda: logged(gw, sid) >= number(first[-1].id) + 5)
    rest = read(url, last=first[-1].id)
    end = check_whole(sid, first + rest, text="".join(CHUNKS))
    assert end["finish_reason"] == "stop"
    assert end["usage"]["output_tokens"] == len(CHUNKS)
    assert len(openai_fake.attempts) == 1  # one generation, however many readers


def test_resume_mid_stream_twice_and_from_the_query_parameter(gw, openai_fake):
    sid, url = start(gw)
    a = read(url, content=3)
    b = read(url + f"?last_event_id={a[-1].id}", content=4)  # fetch clients
    c = read(url, last=b[-1].id)
    check_whole(sid, a + b + c, text="".join(CHUNKS))
    assert len(openai_fake.attempts) == 1


def test_a_reader_from_the_start_replays_everything(gw):
    sid, url = start(gw)
    whole = read(url)
    again = read(url)  # after the end: the whole log again
    assert [e.id for e in again] == [e.id for e in whole]
    check_whole(sid, again, text="".join(CHUNKS))


def test_after_the_end_and_everything_delivered_204(gw):
    _sid, url = start(gw)
    events = read(url)
    r = httpx.get(url, headers={"Last-Event-ID": events[-1].id})
    assert r.status_code == 204 and r.content == b""
    # One short of the end: just [DONE] is left.
    rest = read(url, last=events[-2].id)
    assert [e.data for e in rest] == ["[DONE]"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/chat/streams/gen_{hex}/events", 404, "stream_not_found"),
        ("/chat/streams/nope/events", 404, "stream_not_found"),
    ],
)
def test_unknown_stream_404(gw, path, status, code):
    r = httpx.get(gw.url + path.format(hex=secrets.token_hex(16)))
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code
    r = httpx.delete(gw.url + path.format(hex=secrets.token_hex(16)).removesuffix("/events"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "stream_not_found"


def test_bad_last_event_id_400(gw):
    sid, url = start(gw)
    for bad, why in [
        (f"{sid}:x", "expected"),
        (f"{sid}:\u00b2", "expected"),  # a digit, but not an ASCII one
        ("gen_other:3", "another stream"),
        (f"{sid}:99999", "never sent"),
    ]:
        for r in (
            httpx.get(url, params={"last_event_id": bad}),
            httpx.get(url, headers={"Last-Event-ID": bad.encode()}),
        ):
            assert r.status_code == 400, bad
            err = r.json()["error"]
            assert err["code"] == "invalid_last_event_id" and why in err["message"]
            assert err["param"] == "last_event_id"
    # Ids the gateway never issues are unknown, whatever they hold (they name Redis keys).
    for path in (f"{sid}:log", f"{sid}:reader", "gen_" + "0" * 32 + "x"):
        r = httpx.get(gw.url + f"/chat/streams/{path}/events")
        assert r.status_code == 404 and r.json()["error"]["code"] == "stream_not_found"
        assert httpx.delete(gw.url + f"/chat/streams/{path}").status_code == 404
    r = httpx.get(gw.url + "/chat/stream", headers={"Last-Event-ID": f"{sid}:log:1"})
    assert r.status_code == 404
    read(url)


def test_delete_stops_the_generation_and_closes_the_upstream(gw, openai_fake):
    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(400)], interval=0.02)
    sid, url = start(gw)
    first = read(url, content=3)
    stopped = time.monotonic()
    r = httpx.delete(gw.url + f"/chat/streams/{sid}", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": sid, "status": "ended", "finish_reason": "cancelled"}
    closed = openai_fake.wait_closed(0, timeout=3)
    assert closed - stopped < 1.0
    assert not openai_fake.attempts[0].completed
    rest = read(url, last=first[-1].id)
    events = first + rest
    assert [e.id for e in events] == [f"{sid}:{n}" for n in range(len(events))]
    assert "error" not in [e.event for e in events]  # a stop is not a failure
    end = orjson.loads(events[-2].data)
    assert end["finish_reason"] == "cancelled"
    # Usage so far: OpenAI counts only at the end, so the deltas relayed stand in.
    assert end["usage"]["output_tokens"] >= 3
    assert events[-1].data == "[DONE]"
    # Stopping it again: already ended, says how.
    again = httpx.delete(gw.url + f"/chat/streams/{sid}")
    assert again.status_code == 200 and again.json()["finish_reason"] == "cancelled"


def test_delete_while_a_reader_follows_ends_its_stream(gw, openai_fake):
    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(400)], interval=0.02)
    sid, url = start(gw)
    events: list[ServerSentEvent] = []
    with httpx.stream("GET", url, timeout=10) as r:
        for ev in sse(r):
            events.append(ev)
            if len(events) == 4:
                assert httpx.delete(gw.url + f"/chat/streams/{sid}").status_code == 200
    assert events[-2].event == "end" and events[-1].data == "[DONE]"
    assert orjson.loads(events[-2].data)["finish_reason"] == "cancelled"
    openai_fake.wait_closed(0, timeout=3)


def test_event_source_reconnect_on_get_chat_stream(gw, openai_fake):
    url = gw.url + "/chat/stream"
    params = {"prompt": "hi", "model": MODEL}
    first = read(url, params=params, content=4)
    sid = orjson.loads(first[0].data)["id"]
    assert first[0].id == f"{sid}:0"
    # What EventSource does: the same URL again, with the last id it saw.
    rest = read(url, params=params, last=first[-1].id)
    check_whole(sid, first + rest, text="".join(CHUNKS))
    assert len(openai_fake.attempts) == 1
    r = httpx.get(url, params=params, headers={"Last-Event-ID": rest[-1].id})
    assert r.status_code == 204
    assert len(openai_fake.attempts) == 1


def test_retry_hint_is_jittered_and_sent_again_on_resume(gw):
    hints = set()
    for _ in range(6):
        _sid, url = start(gw, max_tokens=5)
        with httpx.stream("GET", url) as r:
            head = r.read().split(b"\n", 1)[0]
        assert head.startswith(b"retry: ")
        hints.add(int(head.split(b" ")[1]))
    assert len(hints) > 1
    assert all(2400 <= h <= 3600 for h in hints)
    _sid, url = start(gw)
    first = read(url, content=2)
    with httpx.stream("GET", url, headers={"Last-Event-ID": first[-1].id}) as r:
        assert r.read().startswith(b"retry: ")


def test_grace_expiry_cancels_and_releases_the_upstream(make_gateway, openai_fake, store):
    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(400)], interval=0.02)
    gw = make_gateway(openai_fake=openai_fake, default_model=MODEL, resume_grace_s=0.5, **store)
    _sid, url = start(gw)
    first = read(url, content=3)
    left = time.monotonic()
    closed = openai_fake.wait_closed(0, timeout=6)
    # The grace and no more (the reader was on this instance: no lease to run out).
    assert 0.4 < closed - left < 4.0
    rest = read(url, last=first[-1].id)
    assert orjson.loads(rest[-2].data)["finish_reason"] == "cancelled"
    assert rest[-1].data == "[DONE]"


def test_a_reconnect_within_the_grace_keeps_it_running(make_gateway, openai_fake, store):
    chunks = [f"t{i} " for i in range(100)]
    openai_fake.default = Scenario(chunks=chunks, interval=0.03)  # 3 s
    # A grace a loaded machine reconnects within, and the stream runs on well past it.
    gw = make_gateway(openai_fake=openai_fake, default_model=MODEL, resume_grace_s=1.5, **store)
    sid, url = start(gw)
    a = read(url, content=2)
    # The grace is running, and the generation with it, while no reader is there.
    wait_for(lambda: gw.app.state.gateway.streams.runs[sid].keeper is not None)
    wait_for(lambda: logged(gw, sid) >= number(a[-1].id) + 5)
    b = read(url, last=a[-1].id)  # reads to the end, well past the grace
    end = check_whole(sid, a + b, text="".join(chunks))
    assert end["finish_reason"] == "stop"


def test_an_unread_stream_is_cancelled_after_the_grace(make_gateway, openai_fake, store):
    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(400)], interval=0.02)
    gw = make_gateway(openai_fake=openai_fake, default_model=MODEL, resume_grace_s=0.3, **store)
    _sid, url = start(gw)
    openai_fake.wait_closed(0, timeout=6)
    events = read(url)
    assert orjson.loads(events[-2].data)["finish_reason"] == "cancelled"


def test_post_chat_stream_is_not_resumable_and_stops_at_once(gw, openai_fake):
    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(400)], interval=0.02)
    with httpx.stream("POST", gw.url + "/chat/stream", json={"prompt": "hi"}) as r:
        events = []
        for ev in sse(r):
            events.append(ev)
            if len(events) == 3:
                break
    left = time.monotonic()
    assert openai_fake.wait_closed(0, timeout=3) - left < 1.0
    r = httpx.get(gw.url + "/chat/stream", headers={"Last-Event-ID": events[-1].id})
    assert r.status_code == 404


def test_a_failure_to_start_is_the_streams_first_events(gw, openai_fake):
    openai_fake.default = Scenario(fault="status", status=400, error_message="bad things")
    _sid, url = start(gw)
    events = read(url)
    assert [e.event for e in events] == ["start", "error", "end", "message"]
    assert orjson.loads(events[1].data)["error"]["message"].endswith("bad things")
    assert orjson.loads(events[2].data)["finish_reason"] == "error"


def test_unknown_model_is_refused_before_the_stream(gw):
    r = httpx.post(gw.url + "/chat/streams", json={"prompt": "hi", "model": "ghost/x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(gw.url + "/chat/streams", json={"prompt": ""})
    assert r.status_code == 400


def test_log_overflow_ends_the_stream_with_an_error(make_gateway, openai_fake, store):
    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(200)], interval=0.005)
    gw = make_gateway(
        openai_fake=openai_fake, default_model=MODEL, stream_log_max_events=20, **store
    )
    sid, url = start(gw)
    events = read(url)
    assert [e.id for e in events] == [f"{sid}:{n}" for n in range(len(events))]
    assert [e.event for e in events[-3:]] == ["error", "end", "message"]
    assert orjson.loads(events[-3].data)["error"]["code"] == "stream_log_full"
    assert len(events) <= 20 + 3
    openai_fake.wait_closed(0, timeout=3)
    assert not openai_fake.attempts[0].completed


def test_streams_belong_to_the_key_that_started_them(make_gateway, openai_fake, store):
    openai_fake.default = DRIP
    gw = make_gateway(
        openai_fake=openai_fake, default_model=MODEL, api_keys=["key-a", "key-b"], **store
    )
    a = {"Authorization": "Bearer key-a"}
    r = httpx.post(gw.url + "/chat/streams", json={"prompt": "hi"}, headers=a)
    assert r.status_code == 201
    sid = r.json()["id"]
    url = gw.url + r.json()["events_url"]
    assert httpx.get(url).status_code == 401
    other = httpx.get(url, headers={"Authorization": "Bearer key-b"})
    assert other.status_code == 404  # another key's stream does not exist for it
    r = httpx.delete(gw.url + f"/chat/streams/{sid}", headers={"Authorization": "Bearer key-b"})
    assert r.status_code == 404
    events = read(url + "?access_token=key-a")  # EventSource cannot send headers
    check_whole(sid, events, text="".join(CHUNKS))


def test_a_reconnect_before_the_first_token_resumes_the_same_generation(gw, openai_fake):
    openai_fake.default = Scenario(chunks=CHUNKS[:5], first_token_delay=1.0)
    url = gw.url + "/chat/stream"
    with httpx.stream("GET", url, params={"prompt": "hi"}) as r:
        head = next(r.iter_raw())
    # Its id comes first, before any event: an id with no data, which a browser
    # keeps as Last-Event-ID without dispatching anything.
    found = re.fullmatch(rb"retry: \d+\nid: (gen_[0-9a-f]{32})\n\n", head)
    assert found is not None, head
    sid = found.group(1).decode()
    events = read(url, params={"prompt": "hi"}, last=sid)
    check_whole(sid, events, text="".join(CHUNKS[:5]))
    assert len(openai_fake.attempts) == 1


def _flaky(gw, method: str, fail_on: set[int]) -> dict[str, int]:
    """Make the store's ``method`` raise StoreUnavailable on those calls (Redis stays up);
    ``["n"]`` counts the calls."""
    store = gw.app.state.gateway.streams.store
    real = getattr(store, method)
    calls = {"n": 0}

    async def flaky(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] in fail_on:
            raise StoreUnavailable("blip", code="store_unavailable")
        return await real(*args)

    gw.call(lambda: setattr(store, method, flaky))
    return calls


def test_a_failed_append_ends_the_stream_for_every_reader(make_gateway, openai_fake, store):
    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(300)], interval=0.02)
    gw = make_gateway(
        openai_fake=openai_fake, default_model=MODEL, circuit_failure_threshold=2, **store
    )
    for _ in range(3):
        _flaky(gw, "append", {5})
        openai_fake.reset_record()
        sid, url = start(gw)
        events = read(url)
        assert [e.id for e in events] == [f"{sid}:{n}" for n in range(len(events))]
        assert [e.event for e in events[-3:]] == ["error", "end", "message"]
        assert orjson.loads(events[-3].data)["error"]["code"] == "store_unavailable"
        assert orjson.loads(events[-2].data)["finish_reason"] == "error"
        openai_fake.wait_closed(0, timeout=3)  # the generation stopped: no tokens for nobody
        assert not openai_fake.attempts[0].completed
        r = httpx.get(url, headers={"Last-Event-ID": events[-1].id})
        assert r.status_code == 204
        r = httpx.delete(gw.url + f"/chat/streams/{sid}")
        assert r.status_code == 200 and r.json()["finish_reason"] == "error"
    # The gateway's own trouble is not the upstream's: its circuit stays closed.
    openai_fake.default = Scenario(chunks=["ok"])
    r = httpx.post(gw.url + "/chat/stream", json={"prompt": "hi"})
    assert r.status_code == 200 and "[DONE]" in r.text
    assert (
        httpx.get(gw.url + "/readyz").json()["circuits"].get(MODEL, {}).get("state", "closed")
        == "closed"
    )


def test_shutdown_ends_a_stream_that_is_still_opening(make_gateway, openai_fake, store):
    openai_fake.default = Scenario(chunks=["late"], headers_delay=30)
    gw = make_gateway(openai_fake=openai_fake, default_model=MODEL, shutdown_grace_s=0.3, **store)
    _sid, url = start(gw)
    openai_fake.wait_for_attempts(1, timeout=3)
    gw.call(lambda: gw.app.state.gateway.drain.begin())
    events = read(url)
    assert [e.event for e in events] == ["start", "error", "end", "message"]
    assert orjson.loads(events[1].data)["error"]["type"] == "server_shutdown"
    assert orjson.loads(events[2].data)["finish_reason"] == "cancelled"
    openai_fake.wait_closed(0, timeout=3)


@pytest.mark.parametrize("interval", [0.0, 0.005])
def test_overflow_even_at_full_speed_ends_with_the_error(
    make_gateway, openai_fake, store, interval
):
    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(25)], interval=interval)
    gw = make_gateway(
        openai_fake=openai_fake, default_model=MODEL, stream_log_max_events=20, **store
    )
    sid, url = start(gw)
    events = read(url)
    assert [e.id for e in events] == [f"{sid}:{n}" for n in range(len(events))]
    assert [e.event for e in events[-3:]] == ["error", "end", "message"]
    assert orjson.loads(events[-3].data)["error"]["code"] == "stream_log_full"
    assert orjson.loads(events[-2].data)["finish_reason"] == "error"
    assert [e.event for e in events].count("end") == 1


def test_a_stand_in_ending_carries_no_ids():
    frames = ending_frames("gen_" + "a" * 32, None, StoreUnavailable("x", code="store_unavailable"))
    assert len(frames) == 3 and not any(b"id:" in f for f in frames)
    assert frames[-1] == b"data: [DONE]\n\n"


def test_redis_losing_the_stream_answers_404(make_gateway, openai_fake, redis_server):
    import redis as redis_py

    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(100)], interval=0.02)
    prefix = f"t{secrets.token_hex(4)}:"
    gw = make_gateway(
        openai_fake=openai_fake,
        default_model=MODEL,
        redis_url=redis_server.url,
        redis_prefix=prefix,
    )
    sid, url = start(gw)
    first = read(url, content=3)
    client = redis_py.Redis.from_url(redis_server.url)
    for key in client.scan_iter(prefix + "stream:*"):
        client.delete(key)  # what a Redis restarted without persistence has lost
    # The owner goes on appending: a log again, with no record of whose it is.
    wait_for(lambda: client.exists(f"{prefix}stream:{sid}:log"))
    client.close()
    r = httpx.get(url, headers={"Last-Event-ID": first[-1].id})
    assert r.status_code == 404 and r.json()["error"]["code"] == "stream_not_found"
    assert httpx.delete(gw.url + f"/chat/streams/{sid}").status_code == 404


def test_a_failed_finish_after_done_still_answers_204(make_gateway, openai_fake, redis_server):
    gw = make_gateway(
        openai_fake=openai_fake,
        default_model=MODEL,
        redis_url=redis_server.url,
        redis_prefix=f"t{secrets.token_hex(4)}:",
    )
    finishes = _flaky(gw, "finish", {1})
    _sid, url = start(gw)
    events = read(url)
    wait_for(lambda: finishes["n"] == 1)  # the owner tried to mark it ended, and failed
    r = httpx.get(url, headers={"Last-Event-ID": events[-1].id})
    assert r.status_code == 204
    again = read(url)
    assert [e.event for e in again].count("end") == 1


def test_a_store_failure_logging_a_failed_open_is_reported_as_such(gw, openai_fake):
    openai_fake.default = Scenario(fault="status", status=400, error_message="bad things")
    _flaky(gw, "append", {1})
    _sid, url = start(gw)
    events = read(url)
    assert [e.event for e in events] == ["start", "error", "end", "message"]
    assert orjson.loads(events[1].data)["error"]["code"] == "store_unavailable"


def test_app_exit_ends_running_streams_as_a_shutdown(make_gateway, openai_fake, redis_server):
    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(500)], interval=0.02)
    settings = {"redis_url": redis_server.url, "redis_prefix": f"t{secrets.token_hex(4)}:"}
    a = make_gateway(openai_fake=openai_fake, default_model=MODEL, **settings)
    sid, _ = start(a)
    wait_for(lambda: logged(a, sid) >= 3)  # some tokens are in
    a.stop()  # no signal, no drain: the app's own exit
    b = make_gateway(openai_fake=openai_fake, default_model=MODEL, **settings)
    events = read(b.url + f"/chat/streams/{sid}/events")
    assert [e.event for e in events[-3:]] == ["error", "end", "message"]
    assert orjson.loads(events[-3].data)["error"]["type"] == "server_shutdown"
    end = orjson.loads(events[-2].data)
    assert end["finish_reason"] == "cancelled" and end["usage"]["output_tokens"] > 0


class _LostAfter:
    """A store whose reader gets ``frame`` (event 4), then loses the store."""

    closing = False

    def __init__(self, frame: str) -> None:
        self.frame = frame

    async def meta(self, sid: str) -> Any:
        from app.streams.store import Meta

        return Meta("c", False, 3)

    async def follow(self, sid: str, after: int) -> Any:
        yield 4, f"id: {sid}:4\n{self.frame}\n\n".encode(), None
        raise StoreUnavailable("gone", code="store_unavailable")


async def _read_after_loss(frame: str) -> tuple[str, list[str]]:
    from app.capacity import Capacity
    from app.streams import Streams
    from app.wire.simple import SimpleLog
    from tests.harness import make_settings

    sid = "gen_" + "b" * 32
    store: Any = _LostAfter(frame)
    streams = Streams(make_settings(), store, SimpleLog(), Capacity(10, 10, 10))
    body = await streams.subscribe(sid, "c", 3)
    assert body is not None
    chunks = [c async for c in body]
    return sid, [f for f in b"".join(chunks[1:]).decode().split("\n\n") if f]


async def test_a_reader_that_loses_the_store_repeats_the_last_real_id():
    sid, frames = await _read_after_loss('data: {"content":"x"}')
    assert len(frames) == 3  # error, end, [DONE], each with the last real id
    assert all(f.startswith(f"id: {sid}:4\n") for f in frames)
    assert "event: error" in frames[0] and "event: end" in frames[1]
    assert frames[2].endswith("data: [DONE]")


async def test_a_reader_that_loses_the_store_after_the_end_sends_only_done():
    sid, frames = await _read_after_loss("event: end\ndata: {}")
    assert frames == [f"id: {sid}:4\ndata: [DONE]"]


async def test_an_owner_whose_stream_was_taken_over_stops(redis_server):
    from app.sharedstate import connect
    from app.streams.redis_store import RedisStore

    client = connect(redis_server.url)
    prefix = f"t{secrets.token_hex(4)}:"
    owner = RedisStore(client, prefix, 60, 60)
    peer = RedisStore(client, prefix, 60, 60)
    sid = "gen_" + "c" * 32
    frame = [f"id: {sid}:{n}\ndata: {{}}\n\n".encode() for n in range(3)]
    await owner.create(sid, "c")
    await owner.append(sid, 0, frame[:2])
    await owner.append(sid, 1, frame[1:2])  # re-sent after a lost reply: ours, fine
    # A peer that believed the owner gone ends the log after frame 1.
    assert await peer.end_orphan(sid, 1, [b"x", b"y"], "error")
    with pytest.raises(StoreUnavailable) as taken:
        await owner.append(sid, 2, frame[2:])
    assert taken.value.code == "stream_taken_over"
    # Marking a stream that Redis no longer has creates no key (it would never expire).
    ghost = "gen_" + "d" * 32
    await owner.fail(ghost, 0, frame, "error")
    await owner.publish_cancel(ghost)
    assert await client.exists(f"{prefix}stream:{ghost}") == 0
    await client.aclose()


def test_metrics_count_resumes_refusals_and_resumable_streams(make_gateway, openai_fake, store):
    openai_fake.default = Scenario(chunks=[f"w{i}" for i in range(300)], interval=0.02)
    gw = make_gateway(
        openai_fake=openai_fake, default_model=MODEL, max_concurrent_streams=1, **store
    )
    sid, url = start(gw)
    first = read(url, content=2)
    read(url, last=first[-1].id, content=2)
    r = httpx.post(gw.url + "/chat/streams", json={"prompt": "hi"})
    assert r.status_code == 429
    text = httpx.get(gw.url + "/metrics").text
    assert "gateway_stream_resumes_total 1.0" in text
    assert 'gateway_rate_limited_total{code="too_many_concurrent_streams"} 1.0' in text
    assert "gateway_resumable_streams 1.0" in text
    assert httpx.delete(gw.url + f"/chat/streams/{sid}").status_code == 200
    assert "gateway_resumable_streams 0.0" in httpx.get(gw.url + "/metrics").text
