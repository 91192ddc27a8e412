"""Resumable streams: a generation that runs apart from its readers.

A resumable stream (``POST /chat/streams``, ``GET /chat/stream``) runs in its
own task on the instance that started it (its owner), which writes every
event into the stream's replay log (``app.streams.store``). Readers follow
the log, from the start or after a ``Last-Event-ID``, on any instance that
shares the store, so a reconnect gets exactly the rest: no gap, no duplicate,
and never a second generation.

Stop and disconnect are different acts (API.md, Timeouts and disconnects):

- a reader that goes away only detaches; when no reader is left anywhere, the
  stream runs on for ``GATEWAY_RESUME_GRACE_S`` waiting for one, then is
  cancelled and its upstream call closed;
- ``DELETE /chat/streams/{id}`` stops it at once, on whichever instance runs
  it: ``end`` with ``finish_reason: cancelled`` (usage so far) and ``[DONE]``.

A log is bounded (``GATEWAY_STREAM_LOG_MAX_EVENTS`` / ``_MAX_BYTES``): a
stream that would pass the bound ends with an ``error`` (``stream_log_full``),
and only its closing events are logged after it. If the store fails, the
generation is stopped (no tokens burnt for nobody) and each reader ends its
own client's stream with an ``error`` + ``end`` + ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress

import orjson

from app.config import Settings
from app.errors import (
    Cancelled,
    GatewayError,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
    StreamLogFull,
)
from app.events import ChatEvent, End, Error, Start, TextDelta, ToolCallDelta
from app.limits import NO_SLOT, Slot
from app.relay import Generation
from app.streams.store import Store
from app.wire.simple import SimpleStreamEncoder, ending_frames
from app.wire.sse import retry_hint

log = logging.getLogger("app.streams")

Opener = Callable[[], Awaitable[Generation]]


def new_stream_id() -> str:
    return "gen_" + secrets.token_hex(16)  # 128 bits: an id cannot be guessed


def parse_event_id(value: str, sid: str | None = None) -> tuple[str, int]:
    """``<stream>:<n>`` -> (stream, n); a 400 naming the problem otherwise."""
    stream, sep, number = value.rpartition(":")
    if not sep or not stream or not number.isdigit() or len(number) > 9:
        raise InvalidRequest(
            "Last-Event-ID: expected '<stream id>:<event number>' as sent in the stream's ids",
            param="last_event_id",
            code="invalid_last_event_id",
        )
    if sid is not None and stream != sid:
        raise InvalidRequest(
            "Last-Event-ID: it belongs to another stream",
            param="last_event_id",
            code="invalid_last_event_id",
        )
    return stream, int(number)


def _unknown(sid: str) -> NotFound:
    return NotFound(f"stream '{sid}' is unknown or expired", code="stream_not_found")


class Run:
    """A stream this instance owns."""

    __slots__ = (
        "client",
        "done",
        "gen",
        "keeper",
        "name",
        "opening",
        "readers",
        "sid",
        "stopping",
        "task",
    )

    def __init__(self, sid: str, client: str, name: str) -> None:
        self.sid = sid
        self.client = client
        self.name = name
        self.gen: Generation | None = None
        self.task: asyncio.Task[None] | None = None
        self.readers = 0
        self.keeper: asyncio.Task[None] | None = None
        self.stopping: GatewayError | None = None
        self.opening = False  # awaiting its generation: a stop cancels the wait
        self.done = False

    def stop(self, reason: GatewayError) -> None:
        if self.stopping is not None:
            return
        self.stopping = reason
        if self.gen is not None:
            self.gen.stop(reason)
        elif self.opening and self.task is not None:
            self.task.cancel()  # the producer logs the cancelled end


class Streams:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self.grace_s = settings.resume_grace_s
        self.max_events = settings.stream_log_max_events
        self.max_bytes = settings.stream_log_max_bytes
        self.runs: dict[str, Run] = {}
        self._listener: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------

    def start_listening(self) -> None:
        """Take cancels from other instances (and, with Redis, say this instance is alive)."""
        self._listener = asyncio.get_running_loop().create_task(self.store.listen(self._on_cancel))

    async def aclose(self) -> None:
        tasks = [t for t in (self._listener, *(r.task for r in self.runs.values())) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.aclose()

    def _on_cancel(self, sid: str) -> None:
        run = self.runs.get(sid)
        if run is not None:
            run.stop(Cancelled("the stream was stopped", code="cancelled"))

    # -- owner side ----------------------------------------------------------

    async def start(
        self,
        client: str,
        name: str,
        opening: Generation | Opener,
        *,
        slot: Slot = NO_SLOT,
        reading: bool = False,
    ) -> Run:
        """Register a stream and run it.

        ``opening`` is an opened generation, or what opens one in the stream's
        task (``slot``, its place under the concurrency cap, is then held until
        the generation is over). ``reading``: the caller reads it at once
        (``read_new``), so no grace starts.
        """
        sid = new_stream_id()
        run = Run(sid, client, name)
        try:
            await self.store.create(sid, client)
        except BaseException:
            if isinstance(opening, Generation):
                await opening.aclose()
            await slot.release()
            raise
        if isinstance(opening, Generation):
            run.gen = opening
        self.runs[sid] = run
        run.task = asyncio.get_running_loop().create_task(self._produce(run, opening, slot))
        if reading:
            run.readers = 1
        else:
            self._detached(run)  # the grace runs until a reader comes
        return run

    def read_new(self, run: Run) -> AsyncIterator[bytes]:
        """The whole stream, for the reader ``start(reading=True)`` counted."""
        return self._read(run.sid, -1, run)

    async def _produce(self, run: Run, opening: Generation | Opener, slot: Slot) -> None:
        store, sid = self.store, run.sid
        enc = SimpleStreamEncoder(sid)
        broken = False
        try:
            gen = run.gen
            if gen is None:
                assert not isinstance(opening, Generation)
                try:
                    gen = await self._open(run, opening, enc)
                except BaseException:
                    await slot.release()
                    raise
                if gen is None:
                    await slot.release()
                    return
                gen.on_close = slot.release
            elif run.stopping is not None:
                gen.stop(run.stopping)
            max_events, max_bytes = self.max_events, self.max_bytes
            size = 0
            full = False
            async with aclosing(gen.events()) as events:
                async for batch in events:
                    if broken:
                        continue  # the generation runs to its (stopped) end
                    first = enc.n
                    frames = enc.frames(batch)
                    if not frames:
                        continue
                    if not full:
                        size += sum(map(len, frames))
                        if size > max_bytes or enc.n > max_events:
                            full = True
                            gen.stop(
                                StreamLogFull(
                                    "the stream's replay log reached its bound "
                                    "(GATEWAY_STREAM_LOG_MAX_EVENTS / _MAX_BYTES)",
                                    code="stream_log_full",
                                )
                            )
                    if full:  # only the closing events from here on
                        enc.n = first
                        frames = enc.frames(
                            [e for e in batch if not isinstance(e, TextDelta | ToolCallDelta)]
                        )
                        if not frames:
                            continue
                    try:
                        await store.append(sid, first, frames)
                    except StoreUnavailable as exc:
                        broken = True
                        gen.stop(exc)
        except StoreUnavailable:
            broken = True
        finally:
            run.done = True
            self.runs.pop(sid, None)
            if run.keeper is not None:
                run.keeper.cancel()
            if not broken:
                with suppress(StoreUnavailable):
                    await store.finish(sid)

    async def _open(self, run: Run, opening: Opener, enc: SimpleStreamEncoder) -> Generation | None:
        """Open the generation; log how the stream ended when it does not."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        failure: GatewayError | None = run.stopping
        if failure is None:
            run.opening = True
            try:
                gen = await opening()
            except GatewayError as exc:
                failure = exc
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if run.stopping is None or (task is not None and task.uncancel()):
                    raise
                failure = run.stopping
            else:
                run.gen = gen
                if run.stopping is not None:
                    gen.stop(run.stopping)
                return gen
            finally:
                run.opening = False
        ms = round((loop.time() - started) * 1000)
        batch: list[ChatEvent] = [Start(model=run.name)]
        if isinstance(failure, Cancelled):
            batch.append(End.before_start("cancelled", run.name, ms))
        else:
            batch += [Error(failure), End.before_start("error", run.name, ms)]
        await self.store.append(run.sid, 0, enc.frames(batch))
        return None

    def _detached(self, run: Run) -> None:
        if run.readers == 0 and run.keeper is None and not run.done:
            run.keeper = asyncio.get_running_loop().create_task(self._keep(run))

    async def _keep(self, run: Run) -> None:
        """No reader here: wait out the grace, counting readers on other instances."""
        loop = asyncio.get_running_loop()
        seen = loop.time()
        while True:
            wait = seen + self.grace_s - loop.time()
            if wait <= 0:
                break
            await asyncio.sleep(min(wait, 1.0))
            try:
                if await self.store.has_reader(run.sid):
                    seen = loop.time()
            except StoreUnavailable:
                pass  # the producer finds out on its next append
        run.keeper = None
        log.info("stream %s: no reader within the resume grace; cancelled", run.sid)
        run.stop(
            Cancelled("no client reconnected within the resume grace", code="resume_grace_expired")
        )

    # -- reader side ---------------------------------------------------------

    async def subscribe(self, sid: str, client: str, after: int) -> AsyncIterator[bytes] | None:
        """The stream after frame ``after`` (-1: all of it); None once it was all delivered."""
        meta = await self.store.meta(sid)
        if meta is None or not hmac.compare_digest(meta.client, client):
            raise _unknown(sid)
        if after > meta.last:
            raise InvalidRequest(
                f"Last-Event-ID: event {after} was never sent on stream '{sid}'",
                param="last_event_id",
                code="invalid_last_event_id",
            )
        if meta.ended and after == meta.last:
            return None
        return self._read(sid, after, self.runs.get(sid), counted=False)

    async def _read(
        self, sid: str, after: int, run: Run | None, *, counted: bool = True
    ) -> AsyncIterator[bytes]:
        if run is not None and not counted:
            run.readers += 1
            if run.keeper is not None:
                run.keeper.cancel()
                run.keeper = None
        last = after
        hint = retry_hint() if after >= 0 else b""  # a fresh jitter on every reconnect
        try:
            async for n, data in self.store.follow(sid, after):
                last = n
                if hint:
                    data, hint = hint + data, b""
                yield data
        except StoreUnavailable as exc:
            yield b"".join(ending_frames(sid, last + 1, exc))
        finally:
            if run is not None:
                run.readers -= 1
                self._detached(run)

    async def cancel(self, sid: str, client: str, wait_s: float = 5.0) -> str | None:
        """Stop the stream; its finish reason once the end is logged (None: not within wait_s)."""
        meta = await self.store.meta(sid)
        if meta is None or not hmac.compare_digest(meta.client, client):
            raise _unknown(sid)
        if not meta.ended:
            run = self.runs.get(sid)
            if run is not None:
                run.stop(Cancelled("the stream was stopped", code="cancelled"))
            else:
                await self.store.publish_cancel(sid)
        try:
            async with asyncio.timeout(wait_s):
                # The last frames hold the end when it is already there.
                async for _, data in self.store.follow(sid, max(-1, meta.last - 2)):
                    reason = _finish_reason(data)
                    if reason is not None:
                        return reason
        except TimeoutError:
            return None
        return None


def _finish_reason(data: bytes) -> str | None:
    at = data.find(b"event: end\ndata: ")
    if at < 0:
        return None
    line = data[at + 17 : data.index(b"\n", at + 17)]
    reason: str = orjson.loads(line)["finish_reason"]
    return reason
