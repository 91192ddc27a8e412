"""The stream registry on its own (issue 13): producer, readers and stores, without HTTP.

A generation here is ``Scripted``: real relay events built by hand, fed by the
test, ended on ``stop`` the way the relay ends one. The memory tests run the
real ``MemoryStore`` and the real simple-protocol codec; one runs a tiny
codec that is not SSE, to show that any wire format is resumable with no
change in ``app.streams``. The Redis tests run a real redis-server and check
what is stored: the end as a field beside the terminator, never bytes parsed.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.capacity import Capacity
from app.errors import Cancelled, GatewayError, ShuttingDown, StoreUnavailable, UpstreamError
from app.events import End, Error, FinishReason, RelayEvent, Start, TextDelta
from app.ratelimit import Slot
from app.sharedstate import connect
from app.streams import Streams
from app.streams.codec import LogCodec
from app.streams.ids import new_stream_id
from app.streams.redis_store import RedisStore
from app.streams.store import Entry, MemoryStore, Meta, OwnerLost, Store
from app.wire.simple import SimpleLog
from tests.harness import make_settings
from tests.redis_server import RedisServer

CLIENT = "client-a"


def end(reason: FinishReason = "stop") -> End:
    return End(reason, 3, 2, "m", "p", 10, 20)


def text(*pieces: str) -> list[RelayEvent]:
    return [TextDelta(p) for p in pieces]


class Scripted:
    """A generation (``app.streams.producer.Generating``) that yields what the test feeds."""

    def __init__(self) -> None:
        self.model = "m"
        self.provider = "p"
        self.on_close: Callable[[], Awaitable[None]] | None = None
        self.stopped: GatewayError | None = None
        self.closed = False
        self._fed: asyncio.Queue[list[RelayEvent] | None] = asyncio.Queue()

    def feed(self, *batches: list[RelayEvent]) -> None:
        for batch in batches:
            self._fed.put_nowait(batch)

    def stop(self, reason: GatewayError) -> None:
        if self.stopped is None:
            self.stopped = reason
            self._fed.put_nowait(None)

    async def events(self) -> AsyncGenerator[list[RelayEvent], None]:
        while True:
            batch = await self._fed.get()
            if batch is None:  # stopped: the relay's ending for a stop
                if isinstance(self.stopped, Cancelled):
                    yield [end("cancelled")]
                else:
                    assert self.stopped is not None
                    why: FinishReason = (
                        "cancelled" if isinstance(self.stopped, ShuttingDown) else "error"
                    )
                    yield [Error(self.stopped), end(why)]
                return
            yield batch
            if isinstance(batch[-1], End):
                return

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            if self.on_close is not None:
                await self.on_close()


def make(store: Store | None = None, codec: LogCodec | None = None, **settings: Any) -> Streams:
    return Streams(
        make_settings(**settings),
        store or MemoryStore(60),
        codec or SimpleLog(),
        Capacity(100, 10, 10),
    )


async def launched(streams: Streams, gen: Scripted) -> str:
    run = await streams.reserve(CLIENT, "m", reading=False)
    streams.launch(run, gen)
    return run.sid


async def collect(body: AsyncIterator[bytes] | None) -> bytes:
    assert body is not None
    return b"".join([piece async for piece in body])


def sse(data: bytes) -> list[dict[str, str]]:
    """The simple protocol's frames as fields (the payloads are JSON: no newline inside)."""
    out = []
    for block in data.split(b"\n\n"):
        fields: dict[str, str] = {}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(": ")
            if name in ("id", "event", "data"):
                fields[name] = value
        if "data" in fields:
            out.append(fields)
    return out


async def wait_for(check: Callable[[], bool | Awaitable[bool]], within: float = 3.0) -> None:
    """Poll ``check`` until it holds, ``within`` seconds at most (never a fixed sleep)."""
    async with asyncio.timeout(within):
        while True:
            held = check()
            if await held if inspect.isawaitable(held) else held:
                return
            await asyncio.sleep(0.005)


async def logged(streams: Streams, sid: str, n: int) -> None:
    """Wait until frame ``n`` is in the stream's log."""

    async def there() -> bool:
        meta = await streams.store.meta(sid)
        return meta is not None and meta.last >= n

    await wait_for(there)


# -- memory store, simple protocol ------------------------------------------


async def test_frames_are_numbered_and_the_end_is_recorded_beside_the_terminator() -> None:
    streams = make()
    gen = Scripted()
    sid = await launched(streams, gen)
    gen.feed([Start(model="m", provider="p")], text("a", "b"), text("c"), [end("length")])
    events = sse(await collect(await streams.subscribe(sid, CLIENT, -1)))
    assert [e["id"] for e in events] == [f"{sid}:{n}" for n in range(len(events))]
    assert [e.get("event") for e in events] == ["start", None, None, None, "end", None]
    assert events[-1]["data"] == "[DONE]"
    assert await streams.store.meta(sid) == Meta(CLIENT, True, 5, "length")
    await wait_for(lambda: not streams.runs)
    assert gen.closed


async def test_a_late_reader_gets_exactly_the_rest_and_then_204() -> None:
    streams = make()
    gen = Scripted()
    sid = await launched(streams, gen)
    gen.feed([Start(model="m")], text("a", "b", "c"))
    await logged(streams, sid, 3)
    late = await streams.subscribe(sid, CLIENT, 1)  # joins while it runs
    gen.feed(text("d"), [end()])
    rest = sse(await collect(late))
    whole = sse(await collect(await streams.subscribe(sid, CLIENT, -1)))
    assert rest == whole[2:]
    assert [orjson.loads(e["data"]).get("content") for e in rest[:3]] == ["b", "c", "d"]
    # Everything delivered: nothing to read (the route's 204); one short: the terminator.
    assert await streams.subscribe(sid, CLIENT, len(whole) - 1) is None
    assert sse(await collect(await streams.subscribe(sid, CLIENT, len(whole) - 2))) == whole[-1:]


async def test_the_codec_says_what_a_reader_gets_first() -> None:
    streams = make()
    gen = Scripted()
    sid = await launched(streams, gen)
    body = await streams.subscribe(sid, CLIENT, -1)
    assert body is not None
    # From the start: the stream's id at once, before any event is logged.
    first = await anext(body)
    assert re.fullmatch(rb"retry: \d+\nid: %s\n\n" % sid.encode(), first)
    gen.feed([Start(model="m")], text("a"), [end()])
    assert [e["id"] for e in sse(await collect(body))] == [f"{sid}:{n}" for n in range(4)]
    # Resumed: a fresh retry hint before the first frame.
    resumed = await collect(await streams.subscribe(sid, CLIENT, 0))
    assert re.match(rb"retry: \d+\nid: %s:1\n" % sid.encode(), resumed)


async def test_cancel_returns_the_recorded_finish_reason() -> None:
    streams = make()
    gen = Scripted()
    sid = await launched(streams, gen)
    gen.feed([Start(model="m")], text("a"))
    await logged(streams, sid, 1)
    assert await streams.cancel(sid, CLIENT) == "cancelled"
    assert isinstance(gen.stopped, Cancelled)
    # Over already: how it ended, from the record beside the terminator.
    assert await streams.cancel(sid, CLIENT) == "cancelled"
    finished = Scripted()
    other = await launched(streams, finished)
    finished.feed([Start(model="m")], [end("tool_calls")])
    await collect(await streams.subscribe(other, CLIENT, -1))
    assert await streams.cancel(other, CLIENT) == "tool_calls"
    assert finished.stopped is None  # nothing to stop


async def test_unknown_ids_and_other_clients_streams_are_the_same_404() -> None:
    streams = make()
    gen = Scripted()
    sid = await launched(streams, gen)
    for who, which in [(CLIENT, new_stream_id()), ("client-b", sid), (CLIENT, sid + ":log")]:
        with pytest.raises(GatewayError) as found:
            await streams.subscribe(which, who, -1)
        assert found.value.code == "stream_not_found"
        with pytest.raises(GatewayError):
            await streams.cancel(which, who)
    gen.feed([end()])
    await collect(await streams.subscribe(sid, CLIENT, -1))


async def test_a_full_log_stops_the_generation_and_ends_with_the_error() -> None:
    streams = make(stream_log_max_events=16)
    gen = Scripted()
    sid = await launched(streams, gen)
    gen.feed([Start(model="m")], *[text(f"w{i}") for i in range(30)])
    events = sse(await collect(await streams.subscribe(sid, CLIENT, -1)))
    assert [e["id"] for e in events] == [f"{sid}:{n}" for n in range(len(events))]
    assert len(events) <= 16 + 3
    assert [e.get("event") for e in events[-3:]] == ["error", "end", None]
    assert orjson.loads(events[-3]["data"])["error"]["code"] == "stream_log_full"
    assert orjson.loads(events[-2]["data"])["finish_reason"] == "error"
    assert gen.stopped is not None and gen.stopped.code == "stream_log_full"
    assert await streams.cancel(sid, CLIENT) == "error"


class FailingStore(MemoryStore):
    """A memory store whose ``append`` fails on the calls named (a Redis blip, say)."""

    def __init__(self, fail_on: set[int]) -> None:
        super().__init__(60)
        self.fail_on = fail_on
        self.appends = 0

    async def append(
        self, sid: str, first: int, frames: list[bytes], end: str | None = None
    ) -> None:
        self.appends += 1
        if self.appends in self.fail_on:
            raise StoreUnavailable("blip", code="store_unavailable")
        await super().append(sid, first, frames, end)


async def test_a_store_failure_stops_the_generation_and_still_ends_the_log() -> None:
    store = FailingStore({3})
    streams = make(store)
    gen = Scripted()
    sid = await launched(streams, gen)
    gen.feed([Start(model="m")], text("a"), text("b"), text("c"))
    events = sse(await collect(await streams.subscribe(sid, CLIENT, -1)))
    assert [e["id"] for e in events] == [f"{sid}:{n}" for n in range(len(events))]
    assert [e.get("event") for e in events] == ["start", None, "error", "end", None]
    assert orjson.loads(events[2]["data"])["error"]["code"] == "store_unavailable"
    assert gen.stopped is not None and gen.stopped.code == "store_unavailable"
    assert await streams.cancel(sid, CLIENT) == "error"


class Counted(Slot):
    def __init__(self) -> None:
        self.released = 0

    async def release(self) -> None:
        self.released += 1


async def test_a_generation_that_fails_to_open_is_the_streams_first_events() -> None:
    streams = make()

    async def opener() -> Scripted:
        raise UpstreamError("no upstream answered", code="upstream_error")

    slot = Counted()
    run = await streams.start(CLIENT, "m", opener, slot=slot)
    events = sse(await collect(await streams.subscribe(run.sid, CLIENT, -1)))
    assert [e.get("event") for e in events] == ["start", "error", "end", None]
    assert orjson.loads(events[1]["data"])["error"]["code"] == "upstream_error"
    assert await streams.cancel(run.sid, CLIENT) == "error"
    assert slot.released == 1


async def test_an_opened_generation_keeps_what_its_opener_gave_it() -> None:
    """The opener's generation holds the slot (``app.dispatch`` set its ``on_close``): the
    producer closes it once, and never replaces that hook."""
    streams = make()
    gen = Scripted()
    slot = Counted()
    gen.on_close = slot.release

    async def opener() -> Scripted:
        return gen

    run = await streams.start(CLIENT, "m", opener, slot=slot)
    gen.feed([Start(model="m")], [end()])
    await collect(await streams.subscribe(run.sid, CLIENT, -1))
    await wait_for(lambda: slot.released == 1)
    assert gen.on_close == slot.release


async def test_a_producer_cut_off_at_exit_logs_the_shutdown_ending() -> None:
    streams = make()
    gen = Scripted()
    sid = await launched(streams, gen)
    gen.feed([Start(model="m")], text("a"))
    await logged(streams, sid, 1)
    run = streams.runs[sid]
    assert run.task is not None
    run.task.cancel()  # what aclose() does to a producer that did not end in time
    events = sse(await collect(await streams.subscribe(sid, CLIENT, 1)))
    assert [e.get("event") for e in events] == ["error", "end", None]
    assert orjson.loads(events[0]["data"])["error"]["type"] == "server_shutdown"
    assert await streams.cancel(sid, CLIENT) == "cancelled"
    assert gen.closed


class LostStore(MemoryStore):
    """A memory store that fails under a reader once it handed it one piece."""

    async def _follow(self, sid: str, after: int) -> AsyncGenerator[Entry, None]:
        async for entry in super().follow(sid, after):
            yield entry
            raise StoreUnavailable("gone", code="store_unavailable")

    def follow(self, sid: str, after: int) -> AsyncGenerator[Entry, None]:
        return self._follow(sid, after)


async def test_a_reader_that_loses_the_store_ends_its_own_clients_stream() -> None:
    streams = make(LostStore(60))
    gen = Scripted()
    sid = await launched(streams, gen)
    gen.feed([Start(model="m")], text("a", "b", "c"))
    await logged(streams, sid, 3)
    events = sse(await collect(await streams.subscribe(sid, CLIENT, 0)))
    # What it was handed (one piece), then its own ending, with the last real id again.
    assert [e["id"] for e in events] == [f"{sid}:{n}" for n in (1, 2, 3, 3, 3, 3)]
    assert [e.get("event") for e in events[3:]] == ["error", "end", None]
    assert orjson.loads(events[3]["data"])["error"]["code"] == "store_unavailable"
    gen.feed([end()])
    await wait_for(lambda: not streams.runs)


# -- a codec that is not SSE ---------------------------------------------------


class LineEncoder:
    def __init__(self) -> None:
        self.n = 0

    def frames(self, batch: list[RelayEvent]) -> list[bytes]:
        out = []
        for ev in batch:
            line: dict[str, Any] = {"n": self.n, "type": ev.type}
            if isinstance(ev, TextDelta):
                line["text"] = ev.text
            elif isinstance(ev, Error):
                line["code"] = ev.error.code
            elif isinstance(ev, End):
                line["finish"] = ev.finish_reason  # one frame: the terminator
            out.append(orjson.dumps(line) + b"\n")
            self.n += 1
        return out


class Lines:
    """JSON lines, one per event, the ``end`` line the terminator."""

    def encoder(self, sid: str) -> LineEncoder:
        return LineEncoder()

    def ending(
        self,
        sid: str,
        n: int,
        error: GatewayError,
        reason: FinishReason = "error",
        *,
        model: str = "",
    ) -> list[bytes]:
        enc = LineEncoder()
        enc.n = n
        first: list[RelayEvent] = [Start(model=model)] if n == 0 else []
        return enc.frames([*first, Error(error), End.before_start(reason, model, 0)])

    def opening(self, sid: str) -> bytes:
        return orjson.dumps({"stream": sid}) + b"\n"

    def resuming(self) -> bytes:
        return b""

    def broken(self, sid: str, last: int, tail: bytes, error: GatewayError) -> bytes:
        return orjson.dumps({"n": last, "type": "broken", "code": error.code}) + b"\n"


def lines(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.split(b"\n") if line]


async def test_another_wire_format_is_resumable_with_no_change_in_streams() -> None:
    streams = make(codec=Lines())
    gen = Scripted()
    sid = await launched(streams, gen)
    gen.feed([Start(model="m")], text("a", "b"))
    await logged(streams, sid, 2)
    assert await streams.cancel(sid, CLIENT) == "cancelled"
    whole = lines(await collect(await streams.subscribe(sid, CLIENT, -1)))
    assert whole[0] == {"stream": sid}
    assert [(x["n"], x["type"]) for x in whole[1:]] == [
        (0, "start"),
        (1, "text"),
        (2, "text"),
        (3, "end"),
    ]
    assert whole[-1]["finish"] == "cancelled"
    rest = lines(await collect(await streams.subscribe(sid, CLIENT, 1)))
    assert rest == whole[3:]
    assert await streams.subscribe(sid, CLIENT, 3) is None


# -- Redis ---------------------------------------------------------------------


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Any]:
    client = connect(redis_server.url)
    yield client
    await client.aclose()


def redis_store(client: Any, prefix: str) -> RedisStore:
    return RedisStore(client, prefix, 60, 60)


async def entries(client: Any, prefix: str, sid: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await client.xrange(f"{prefix}stream:{sid}:log")]


async def test_redis_records_the_end_beside_the_terminator(redis: Any) -> None:
    prefix = f"t{secrets.token_hex(4)}:"
    owner, elsewhere = redis_store(redis, prefix), redis_store(redis, prefix)
    sid = new_stream_id()
    await owner.create(sid, CLIENT)
    await owner.append(sid, 0, [b"s", b"t"])
    await owner.append(sid, 2, [b"u"])
    meta = await elsewhere.meta(sid)
    assert meta is not None and not meta.ended and meta.finish is None
    await owner.append(sid, 3, [b"end", b"done"], "stop")
    found = await entries(redis, prefix, sid)
    assert found[:4] == [{b"f": b"s"}, {b"f": b"t"}, {b"f": b"u"}, {b"f": b"end"}]
    assert found[4] == {b"f": b"done", b"e": b"stop"}  # only the terminator has it
    # Ended by the record, although the owner never marked the stream ended.
    assert await elsewhere.meta(sid) == Meta(CLIENT, True, 4, "stop")
    # A reader elsewhere (no local copy) stops at the terminator, told why.
    got = [entry async for entry in elsewhere.follow(sid, 1)]
    assert got == [(4, b"uenddone", "stop")]


async def test_redis_end_orphan_appends_only_where_the_log_stopped_and_never_twice(
    redis: Any,
) -> None:
    prefix = f"t{secrets.token_hex(4)}:"
    store = redis_store(redis, prefix)
    sid = new_stream_id()
    await store.create(sid, CLIENT)
    # Frames are opaque: one that looks like an SSE ending is no end.
    await store.append(sid, 0, [b"a", b"data: [DONE]\n\n"])
    assert not await store.end_orphan(sid, 0, [b"x"], "error")  # the log moved on
    assert await store.end_orphan(sid, 1, [b"err", b"end"], "error")
    found = await entries(redis, prefix, sid)
    assert found[2:] == [{b"f": b"err"}, {b"f": b"end", b"e": b"error"}]
    assert not await store.end_orphan(sid, 3, [b"again"], "error")
    assert len(await entries(redis, prefix, sid)) == 4
    assert await redis.hget(f"{prefix}stream:{sid}", "state") == b"ended"


async def test_redis_end_orphan_leaves_a_log_whose_end_is_logged(redis: Any) -> None:
    prefix = f"t{secrets.token_hex(4)}:"
    store = redis_store(redis, prefix)
    sid = new_stream_id()
    await store.create(sid, CLIENT)
    # The end is logged but the stream not marked ended (its finish() failed).
    await store.append(sid, 0, [b"a", b"b"], "stop")
    assert not await store.end_orphan(sid, 1, [b"x"], "error")
    assert len(await entries(redis, prefix, sid)) == 2


async def test_redis_owner_fail_ends_the_log_through_the_script(redis: Any) -> None:
    prefix = f"t{secrets.token_hex(4)}:"
    owner, elsewhere = redis_store(redis, prefix), redis_store(redis, prefix)
    sid = new_stream_id()
    await owner.create(sid, CLIENT)
    await owner.append(sid, 0, [b"a"])
    await owner.fail(sid, 1, [b"err", b"end"], "error")
    assert await elsewhere.meta(sid) == Meta(CLIENT, True, 2, "error")


async def test_a_reader_whose_owner_is_gone_ends_the_stream_once(redis: Any) -> None:
    prefix = f"t{secrets.token_hex(4)}:"
    # The owner never beats (no listen()): to a reader elsewhere it is gone.
    owner = make(redis_store(redis, prefix))
    gen = Scripted()
    run = await owner.reserve(CLIENT, "m", reading=False)
    owner.launch(run, gen)
    gen.feed([Start(model="m")], text("a"))
    await logged(owner, run.sid, 1)
    peer = make(redis_store(redis, prefix))
    one, two = await peer.subscribe(run.sid, CLIENT, 0), await peer.subscribe(run.sid, CLIENT, -1)
    first, second = await asyncio.gather(collect(one), collect(two))
    events = sse(first)
    assert [e["id"] for e in events] == [f"{run.sid}:{n}" for n in range(1, 5)]
    assert [e.get("event") for e in events[1:]] == ["error", "end", None]
    assert orjson.loads(events[1]["data"])["error"]["code"] == "instance_lost"
    assert sse(second)[1:] == events  # the same single ending for both
    assert await peer.cancel(run.sid, CLIENT) == "error"
    owner.stop_all(ShuttingDown("test over", code="shutting_down"))
    await wait_for(lambda: not owner.runs)


async def test_redis_follow_says_the_owner_is_gone_with_the_last_entry_seen(redis: Any) -> None:
    prefix = f"t{secrets.token_hex(4)}:"
    owner, elsewhere = redis_store(redis, prefix), redis_store(redis, prefix)
    sid = new_stream_id()
    await owner.create(sid, CLIENT)
    await owner.append(sid, 0, [b"a", b"b"])
    seen = []
    with pytest.raises(OwnerLost) as lost:
        async for entry in elsewhere.follow(sid, -1):
            seen.append(entry)
    assert seen == [(1, b"ab", None)] and lost.value.last == 1


# -- what streams/ knows ---------------------------------------------------------


def test_streams_import_no_wire_format_and_hold_no_sse() -> None:
    """The log is a codec's: ``app.streams`` imports nothing of ``app.wire`` and holds no
    SSE literal to build or parse frames with (docstrings may talk about them)."""
    sse_bits = re.compile(r"\[DONE\]|data: |event: |retry: |id: |\n\n")
    for path in sorted((Path(__file__).parent.parent / "app" / "streams").glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(body[0].value)
            for owner in ast.walk(tree)
            if isinstance(body := getattr(owner, "body", None), list)
            and body
            and isinstance(body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names]
                assert not any(n.startswith("app.wire") for n in names), path.name
            elif isinstance(node, ast.Constant) and id(node) not in docstrings:
                value = node.value
                if isinstance(value, bytes):
                    value = value.decode()
                if isinstance(value, str):
                    assert not sse_bits.search(value), (path.name, value)
