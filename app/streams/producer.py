"""The owner's side of a resumable stream: what runs a generation into its replay log.

``Producer.run`` opens the generation if it was not opened yet (a failure to
open becomes the stream's first events), writes each batch of events as
frames through the codec, and never leaves a log without its ending:

- the batch that holds the ``End`` is appended with its finish reason
  (``Store.append(..., end=reason)``): the producer knows the end from the
  events, nobody reads it back out of the frames;
- a log that would pass its bound (``GATEWAY_STREAM_LOG_MAX_EVENTS`` /
  ``_MAX_BYTES``) or a store that fails stops the generation; the batch that
  did not fit is not logged, and the generation's end is logged as an
  ``error`` (``stream_log_full``, ``store_unavailable``) + ``end``, with a
  ``start`` first if none was logged;
- a producer stopped before the end (cancelled at exit) logs the codec's
  ending (``cancelled`` for a shutdown, ``error`` otherwise); when the store
  failed, ``Store.fail`` ends the log where it still can.

It knows the stream only through ``Owned`` (``app.streams.registry.Run``) and
the generation only through ``Generating`` (``app.relay.Generation``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing, suppress
from typing import Protocol, runtime_checkable

from app.errors import (
    Cancelled,
    GatewayError,
    ShuttingDown,
    StoreUnavailable,
    StreamLogFull,
)
from app.events import End, Error, FinishReason, RelayEvent, Start
from app.ratelimit import Slot
from app.streams.codec import LogCodec, LogEncoder
from app.streams.store import Store

log = logging.getLogger("app.streams")


@runtime_checkable
class Generating(Protocol):
    """What the producer needs of a running generation (``app.relay.Generation`` is one)."""

    on_close: Callable[[], Awaitable[None]] | None  # called once it is over (frees its slot)

    @property
    def model(self) -> str: ...

    @property
    def provider(self) -> str: ...

    def events(self) -> AsyncGenerator[list[RelayEvent], None]:
        """Batches of events, the last one holding the ``End`` as its last event."""
        ...

    def stop(self, reason: GatewayError) -> None: ...

    async def aclose(self) -> None:
        """Idempotent."""
        ...


Opener = Callable[[], Awaitable[Generating]]


class Owned(Protocol):
    """The stream being produced, as the producer sees it."""

    @property
    def sid(self) -> str: ...

    @property
    def name(self) -> str: ...  # the model name asked for (what an ending names)

    gen: Generating | None  # set once open, so that a stop reaches it
    opening: bool  # awaiting its generation: a stop cancels the wait

    @property
    def stopping(self) -> GatewayError | None: ...  # why it was stopped, if it was

    def over(self) -> None:
        """The generation is over (only the log's ending may still be written)."""
        ...


class Producer:
    __slots__ = ("codec", "max_bytes", "max_events", "store")

    def __init__(self, store: Store, codec: LogCodec, max_events: int, max_bytes: int) -> None:
        self.store = store
        self.codec = codec
        self.max_events = max_events
        self.max_bytes = max_bytes

    async def run(self, run: Owned, opening: Generating | Opener, slot: Slot) -> None:
        """Produce ``run``'s log. ``opening``: its generation, or what opens one; ``slot`` is
        released here when it does not open (an opened generation holds it until it is
        over: ``app.dispatch``)."""
        store, sid = self.store, run.sid
        enc = self.codec.encoder(sid)
        trouble: GatewayError | None = None  # the log is full, or the store failed
        failed = False  # the store failed: nothing more reaches it
        ended = False  # the terminator is logged
        try:
            gen = run.gen
            if gen is None:
                assert not isinstance(opening, Generating)
                try:
                    opened = await self._open(run, opening)
                except BaseException:
                    await slot.release()
                    raise
                if isinstance(opened, list):  # it did not open: these events end it
                    await slot.release()
                    first = enc.n
                    frames = enc.frames(opened)
                    try:
                        await store.append(sid, first, frames, _finish(opened))
                        ended = True
                    except StoreUnavailable as exc:
                        enc.n, failed, trouble = first, True, exc
                    return
                gen = opened  # it holds the slot now (the opener's), until it is over
            elif run.stopping is not None:
                gen.stop(run.stopping)
            max_events, max_bytes = self.max_events, self.max_bytes
            size = 0
            async with aclosing(gen.events()) as events:
                async for batch in events:
                    # The relay's End is the last event of its last batch.
                    end = batch[-1] if batch and isinstance(batch[-1], End) else None
                    if trouble is None:
                        first = enc.n
                        frames = enc.frames(batch)
                        if not frames:
                            continue
                        size += sum(map(len, frames))
                        if size <= max_bytes and enc.n <= max_events:
                            try:
                                finish = None if end is None else end.finish_reason
                                await store.append(sid, first, frames, finish)
                                ended = end is not None
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
                    if end is not None:
                        logged = await self._end_in_trouble(
                            sid, enc, batch, end, gen, trouble, failed
                        )
                        failed, ended = failed or not logged, True
        except Exception as exc:
            # A bug, not a shutdown: the log still gets an honest ending, as an error.
            log.error("stream %s: unhandled %s", sid, type(exc).__name__)
            trouble = trouble or GatewayError("internal error", code="internal_error")
        finally:
            run.over()
            try:
                if run.gen is not None:
                    # Idempotent; covers a generation whose events() never started.
                    await run.gen.aclose()
            finally:
                await self._settle(run, enc, ended=ended, failed=failed, trouble=trouble)

    async def _end_in_trouble(
        self,
        sid: str,
        enc: LogEncoder,
        batch: list[RelayEvent],
        end: End,
        gen: Generating,
        trouble: GatewayError,
        failed: bool,
    ) -> bool:
        """Log the generation's end after ``trouble``; False: only ``Store.fail`` could."""
        end.finish_reason = "error"
        starts: list[RelayEvent] = [e for e in batch if isinstance(e, Start)]
        if enc.n == 0 and not starts:  # the start was in the batch not logged
            starts = [Start(model=gen.model, provider=gen.provider)]
        first = enc.n
        frames = enc.frames([*starts, Error(trouble), end])
        if not failed:
            try:
                await self.store.append(sid, first, frames, "error")
                return True
            except StoreUnavailable:
                pass
        await self.store.fail(sid, first, frames, "error")
        return False

    async def _settle(
        self,
        run: Owned,
        enc: LogEncoder,
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
        # The producer stopped before logging the end (cancelled at exit, or the
        # store failed before the generation's end).
        reason = trouble or ShuttingDown(
            "the gateway stopped before the stream ended", code="shutting_down"
        )
        finish: FinishReason = "cancelled" if isinstance(reason, ShuttingDown) else "error"
        frames = self.codec.ending(sid, enc.n, reason, finish, model=run.name)
        if not failed:
            try:
                await store.append(sid, enc.n, frames, finish)
            except StoreUnavailable:
                pass
            else:
                with suppress(StoreUnavailable):
                    await store.finish(sid)
                return
        await store.fail(sid, enc.n, frames, finish)

    async def _open(self, run: Owned, opener: Opener) -> Generating | list[RelayEvent]:
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
        batch: list[RelayEvent] = [Start(model=run.name)]
        if isinstance(failure, Cancelled):
            return [*batch, End.before_start("cancelled", run.name, ms)]
        reason: FinishReason = "cancelled" if isinstance(failure, ShuttingDown) else "error"
        return [*batch, Error(failure), End.before_start(reason, run.name, ms)]


def _finish(batch: list[RelayEvent]) -> FinishReason:
    end = batch[-1]
    assert isinstance(end, End)
    return end.finish_reason
