"""Resumable streams: a generation that runs apart from its readers.

A resumable stream (``POST /chat/streams``, ``GET /chat/stream``) runs in its
own task on the instance that started it (its owner), which writes every
event into the stream's replay log (``app.streams.producer``). Readers follow
the log (``app.streams.readers``), from the start or after a
``Last-Event-ID``, on any instance that shares the store, so a reconnect gets
exactly the rest: no gap, no duplicate, and never a second generation. The
frames are a wire format's, through the codec ``Streams`` is handed
(``app.streams.codec``); nothing here reads them.

Stop and disconnect are different acts (API.md, Timeouts and disconnects):

- a reader that goes away only detaches; when no reader is left anywhere, the
  stream runs on for ``GATEWAY_RESUME_GRACE_S`` waiting for one, then is
  cancelled and its upstream call closed;
- ``DELETE /chat/streams/{id}`` stops it at once, on whichever instance runs
  it: its end says ``finish_reason: cancelled`` (usage so far).

A log is bounded (``GATEWAY_STREAM_LOG_MAX_EVENTS`` / ``_MAX_BYTES``): a
stream that would pass the bound ends with an ``error`` (``stream_log_full``),
and only its closing events are logged after it. If the store fails, the
generation is stopped (no tokens burnt for nobody) and each reader ends its
own client's stream.

This module is the registry: the streams this instance runs (``Run``), how
they are reserved, launched, stopped and kept through their resume grace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

from app.capacity import Capacity, ReaderHold
from app.config import Settings
from app.errors import Cancelled, GatewayError, ShuttingDown, StoreUnavailable
from app.ratelimit import NO_SLOT, Slot
from app.streams.codec import LogCodec
from app.streams.ids import new_stream_id
from app.streams.producer import Generating, Opener, Producer
from app.streams.readers import Readers
from app.streams.store import Store

log = logging.getLogger("app.streams")


class Run:
    """A stream this instance owns."""

    __slots__ = (
        "_idle",
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

    def __init__(self, sid: str, client: str, name: str, idle: Callable[[Run], None]) -> None:
        self.sid = sid
        self.client = client
        self.name = name
        self.gen: Generating | None = None
        self.hold: ReaderHold | None = None  # its first reader's place, until it reads
        self.task: asyncio.Task[None] | None = None
        self.readers = 0  # readers in this process
        self.keeper: asyncio.Task[None] | None = None  # the resume grace, while no reader
        self.stopping: GatewayError | None = None
        self.opening = False  # awaiting its generation: a stop cancels the wait
        self.done = False
        self._idle = idle  # called when its last reader here left

    def stop(self, reason: GatewayError) -> None:
        if self.stopping is not None:
            return
        self.stopping = reason
        if self.gen is not None:
            self.gen.stop(reason)
        elif self.opening and self.task is not None:
            self.task.cancel()  # the producer logs the end

    def over(self) -> None:
        self.done = True
        if self.keeper is not None:
            self.keeper.cancel()

    def joined(self) -> None:
        self.readers += 1
        if self.keeper is not None:
            self.keeper.cancel()
            self.keeper = None

    def left(self) -> None:
        self.readers -= 1
        self._idle(self)


class Streams:
    def __init__(
        self, settings: Settings, store: Store, codec: LogCodec, capacity: Capacity
    ) -> None:
        self.store = store
        self.codec = codec
        self.grace_s = settings.resume_grace_s
        # Readers and generations open in this process, under their caps.
        self.capacity = capacity
        self.runs: dict[str, Run] = {}
        self.producer = Producer(
            store, codec, settings.stream_log_max_events, settings.stream_log_max_bytes
        )
        self.readers = Readers(store, codec, capacity, self.runs)
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
        run = Run(new_stream_id(), client, name, self._detached)
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
        opening: Generating | Opener,
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
        if isinstance(opening, Generating):
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

    async def _produce(self, run: Run, opening: Generating | Opener, slot: Slot) -> None:
        try:
            await self.producer.run(run, opening, slot)
        finally:
            # Only now: a drain waits for the last write too.
            self.runs.pop(run.sid, None)

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

    def read_new(self, run: Run) -> AsyncIterator[bytes]:
        """The whole stream, for the reader ``launch(reading=True)`` counted, in the place
        ``reserve`` took for it."""
        hold, run.hold = run.hold, None
        if hold is None:  # reserved without it: counted all the same, too late to refuse
            hold = self.capacity.reader(run.sid, run.client, check=False)
        return self.readers.read(run.sid, -1, hold, run)

    async def subscribe(self, sid: str, client: str, after: int) -> AsyncIterator[bytes] | None:
        """The stream after frame ``after`` (-1: all of it); None once it was all delivered.
        A reader over a cap is refused here, before its response starts (429, 503)."""
        return await self.readers.subscribe(sid, client, after)

    async def cancel(self, sid: str, client: str, wait_s: float = 5.0) -> str | None:
        """Stop the stream; its finish reason once the end is logged (None: not within wait_s)."""
        meta = await self.readers.find(sid, client)
        if meta.finish is not None:
            return meta.finish  # over already: how it ended
        if not meta.ended:
            run = self.runs.get(sid)
            if run is not None:
                run.stop(Cancelled("the stream was stopped", code="cancelled"))
            else:
                await self.store.publish_cancel(sid)
        return await self.readers.finish_reason(sid, meta.last, wait_s)
