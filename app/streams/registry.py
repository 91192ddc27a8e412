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
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress

import orjson

from app.capacity import Capacity, ReaderHold
from app.config import Settings
from app.errors import (
    Cancelled,
    GatewayError,
    InvalidRequest,
    NotFound,
    ShuttingDown,
    StoreUnavailable,
    StreamLogFull,
)
from app.events import ChatEvent, End, Error, FinishReason, Start
from app.limits import NO_SLOT, Slot
from app.relay import Generation
from app.streams.store import DONE_TAIL, Store
from app.wire.simple import SimpleStreamEncoder, ending_frames
from app.wire.sse import DONE, retry_hint

log = logging.getLogger("app.streams")

Opener = Callable[[], Awaitable[Generation]]


_ID = re.compile(r"gen_[0-9a-f]{32}")


def new_stream_id() -> str:
    return "gen_" + secrets.token_hex(16)  # 128 bits: an id cannot be guessed


def parse_event_id(value: str, sid: str | None = None) -> tuple[str, int]:
    """``<stream>:<n>`` -> (stream, n); a bare ``<stream>`` (sent before the first event)
    -> (stream, -1). A 400 naming the problem otherwise."""
    stream, sep, number = value.rpartition(":")
    if not sep:
        stream, number = value, ""
    elif not (number.isascii() and number.isdigit() and len(number) <= 9):
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
    return stream, int(number) if number else -1


def _unknown(sid: str) -> NotFound:
    return NotFound(f"stream '{sid[:48]}' is unknown or expired", code="stream_not_found")


def _ends(batch: list[ChatEvent]) -> bool:
    return any(isinstance(e, End) for e in batch)


class Run:
    """A stream this instance owns."""

    __slots__ = (
        "client",
        "done",
        "gen",
        "hold",
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
        self.hold: ReaderHold | None = None  # its first reader's place, until it reads
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
            self.task.cancel()  # the producer logs the end


class Streams:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self.grace_s = settings.resume_grace_s
        self.max_events = settings.stream_log_max_events
        self.max_bytes = settings.stream_log_max_bytes
        # Readers and generations open in this process, under their caps.
        self.capacity = Capacity(
            settings.max_open_streams,
            settings.max_readers_per_stream,
            settings.max_readers_per_client,
        )
        self.runs: dict[str, Run] = {}
        self._listener: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------

    def start_listening(self) -> None:
        """Take cancels from other instances (and, with Redis, say this instance is alive)."""
        self._listener = asyncio.get_running_loop().create_task(self.store.listen(self._on_cancel))

    def stop_all(self, reason: GatewayError) -> None:
        """Shutdown: end every stream this instance runs (also those still opening)."""
        for run in list(self.runs.values()):
            run.stop(reason)

    async def aclose(self) -> None:
        """App exit: what still runs (no drain ran, or it ran out) ends as at a shutdown,
        with its usage so far, before anything is cancelled."""
        running = [r.task for r in self.runs.values() if r.task is not None]
        if running:
            self.stop_all(
                ShuttingDown("the server stopped; the answer was cut short", code="shutting_down")
            )
            await asyncio.wait(running, timeout=2.0)
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

    async def reserve(self, client: str, name: str, *, reading: bool = True) -> Run:
        """Register a stream (in the store first: a store that is down fails here, before
        any upstream is called).

        ``reading``: the caller reads it at once (``launch(reading=True)``,
        ``read_new``): its reader's place under the caps is taken first (429, 503).
        """
        run = Run(new_stream_id(), client, name)
        if reading:
            run.hold = self.capacity.reader(run.sid, client)
        try:
            await self.store.create(run.sid, client)
        except BaseException:
            self._unhold(run)
            raise
        return run

    async def discard(self, run: Run) -> None:
        """A reserved stream that will not run (its generation failed to open)."""
        self._unhold(run)
        with suppress(StoreUnavailable):
            await self.store.discard(run.sid)

    @staticmethod
    def _unhold(run: Run) -> None:
        if run.hold is not None:
            run.hold.release()
            run.hold = None

    def launch(
        self,
        run: Run,
        opening: Generation | Opener,
        *,
        slot: Slot = NO_SLOT,
        reading: bool = False,
    ) -> None:
        """Run a reserved stream.

        ``opening`` is an opened generation, or what opens one in the stream's
        task (``slot``, its place under the concurrency cap, is then held until
        the generation is over). ``reading``: the caller reads it at once
        (``read_new``), so no grace starts.
        """
        if isinstance(opening, Generation):
            run.gen = opening
        self.runs[run.sid] = run
        run.task = asyncio.get_running_loop().create_task(self._produce(run, opening, slot))
        if reading:
            run.readers = 1
        else:
            self._detached(run)  # the grace runs until a reader comes

    async def start(self, client: str, name: str, opener: Opener, *, slot: Slot) -> Run:
        """Reserve and launch a stream that nobody reads yet (``POST /chat/streams``)."""
        try:
            run = await self.reserve(client, name, reading=False)
        except BaseException:
            await slot.release()
            raise
        self.launch(run, opener, slot=slot)
        return run

    def read_new(self, run: Run) -> AsyncIterator[bytes]:
        """The whole stream, for the reader ``launch(reading=True)`` counted, in the place
        ``reserve`` took for it."""
        hold, run.hold = run.hold, None
        if hold is None:  # reserved without it: counted all the same, too late to refuse
            hold = self.capacity.reader(run.sid, run.client, check=False)
        return self._read(run.sid, -1, run, hold)

    async def _produce(self, run: Run, opening: Generation | Opener, slot: Slot) -> None:
        store, sid = self.store, run.sid
        enc = SimpleStreamEncoder(sid)
        trouble: GatewayError | None = None  # the log is full, or the store failed
        failed = False  # the store failed: nothing more reaches it
        ended = False  # [DONE] is logged
        try:
            gen = run.gen
            if gen is None:
                assert not isinstance(opening, Generation)
                try:
                    opened = await self._open(run, opening)
                except BaseException:
                    await slot.release()
                    raise
                if not isinstance(opened, Generation):
                    await slot.release()
                    first = enc.n
                    frames = enc.frames(opened)
                    try:
                        await store.append(sid, first, frames)
                        ended = True
                    except StoreUnavailable as exc:
                        enc.n, failed, trouble = first, True, exc
                    return
                gen = opened
                gen.on_close = slot.release
            elif run.stopping is not None:
                gen.stop(run.stopping)
            max_events, max_bytes = self.max_events, self.max_bytes
            size = 0
            async with aclosing(gen.events()) as events:
                async for batch in events:
                    if trouble is None:
                        first = enc.n
                        frames = enc.frames(batch)
                        if not frames:
                            continue
                        size += sum(map(len, frames))
                        if size <= max_bytes and enc.n <= max_events:
                            try:
                                await store.append(sid, first, frames)
                                ended = frames[-1].endswith(DONE_TAIL)
                                continue
                            except StoreUnavailable as exc:
                                trouble, failed = exc, True
                        else:
                            trouble = StreamLogFull(
                                "the stream's replay log reached its bound "
                                "(GATEWAY_STREAM_LOG_MAX_EVENTS / _MAX_BYTES)",
                                code="stream_log_full",
                            )
                        enc.n = first  # that batch is not logged
                        gen.stop(trouble)
                    # From here on only the ending is logged, and it is ours: a
                    # generation that finished meanwhile still ends with the error.
                    if _ends(batch):
                        end = next(e for e in batch if isinstance(e, End))
                        end.finish_reason = "error"
                        starts = [e for e in batch if isinstance(e, Start)]
                        if enc.n == 0 and not starts:  # the start was in the batch not logged
                            starts = [Start(model=gen.model, provider=gen.provider)]
                        frames = enc.frames([*starts, Error(trouble), end])
                        if not failed:
                            try:
                                await store.append(sid, enc.n - len(frames), frames)
                                ended = True
                                continue
                            except StoreUnavailable:
                                failed = True
                        await store.fail(sid, enc.n - len(frames), frames)
                        ended = True
        finally:
            run.done = True
            if run.keeper is not None:
                run.keeper.cancel()
            try:
                if run.gen is not None:
                    # Idempotent; covers a generation whose events() never started.
                    await run.gen.aclose()
                await self._settle(run, enc, ended=ended, failed=failed, trouble=trouble)
            finally:
                # Only now: a drain waits for the last write too.
                self.runs.pop(sid, None)

    async def _settle(
        self,
        run: Run,
        enc: SimpleStreamEncoder,
        *,
        ended: bool,
        failed: bool,
        trouble: GatewayError | None,
    ) -> None:
        """After the producer: the log is finished, and never left without its ending."""
        store, sid = self.store, run.sid
        if ended and failed:
            return  # store.fail() wrote the ending where it could
        if ended:
            with suppress(StoreUnavailable):
                await store.finish(sid)
            return
        # The producer stopped before logging [DONE] (cancelled at exit, or the
        # store failed before the generation's end).
        reason = trouble or ShuttingDown(
            "the gateway stopped before the stream ended", code="shutting_down"
        )
        finish: FinishReason = "cancelled" if isinstance(reason, ShuttingDown) else "error"
        frames = ending_frames(sid, enc.n, reason, finish, model=run.name)
        if not failed:
            try:
                await store.append(sid, enc.n, frames)
                await store.finish(sid)
                return
            except StoreUnavailable:
                pass
        await store.fail(sid, enc.n, frames)

    async def _open(self, run: Run, opener: Opener) -> Generation | list[ChatEvent]:
        """The generation, or the events that end a stream whose generation did not open."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        failure: GatewayError | None = run.stopping
        if failure is None:
            run.opening = True
            try:
                gen = await opener()
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
            return [*batch, End.before_start("cancelled", run.name, ms)]
        reason: FinishReason = "cancelled" if isinstance(failure, ShuttingDown) else "error"
        return [*batch, Error(failure), End.before_start(reason, run.name, ms)]

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
        """The stream after frame ``after`` (-1: all of it); None once it was all delivered.
        A reader over a cap is refused here, before its response starts (429, 503)."""
        if not _ID.fullmatch(sid):
            raise _unknown(sid)
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
        hold = self.capacity.reader(sid, client)
        return self._read(sid, after, self.runs.get(sid), hold, counted=False)

    async def _read(
        self, sid: str, after: int, run: Run | None, hold: ReaderHold, *, counted: bool = True
    ) -> AsyncIterator[bytes]:
        """``hold``: the reader's place under the caps, released when this ends (or when a
        body that never started is collected)."""
        if run is not None and not counted:
            run.readers += 1
            if run.keeper is not None:
                run.keeper.cancel()
                run.keeper = None
        tail = b""
        last = after
        try:
            if after < 0:
                # The stream's id at once: a reconnect while the first token is
                # still awaited resumes this stream rather than start another
                # (an id field with no data sets Last-Event-ID, dispatches nothing).
                yield retry_hint() + b"id: %s\n\n" % sid.encode()
                hint = b""
            else:
                hint = retry_hint()  # a fresh jitter on every reconnect
            async for n, data in self.store.follow(sid, after):
                if hint:
                    data, hint = hint + data, b""
                tail, last = data, n
                yield data
        except StoreUnavailable as exc:
            # Each with the last real event's id again: the log may yet hold real
            # events under the next numbers, and a resume must ask for them.
            again = b"id: %s\n" % (sid if last < 0 else f"{sid}:{last}").encode()
            if b"\nevent: end\n" in tail:
                yield again + DONE  # the end came already (Redis woke us before its [DONE])
            else:
                yield b"".join(again + f for f in ending_frames(sid, None, exc))
        finally:
            hold.release()
            if run is not None:
                run.readers -= 1
                self._detached(run)

    async def cancel(self, sid: str, client: str, wait_s: float = 5.0) -> str | None:
        """Stop the stream; its finish reason once the end is logged (None: not within wait_s)."""
        if not _ID.fullmatch(sid):
            raise _unknown(sid)
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
        except (TimeoutError, StoreUnavailable):
            return None
        return None


def _finish_reason(data: bytes) -> str | None:
    at = data.find(b"event: end\ndata: ")
    if at < 0:
        return None
    line = data[at + 17 : data.index(b"\n", at + 17)]
    reason: str = orjson.loads(line)["finish_reason"]
    return reason
