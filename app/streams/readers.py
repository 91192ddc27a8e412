"""The reader side of resumable streams: who may read one, from where, and what a reader gets.

A reader follows the stream's log (``Store.follow``) after the frame its
client saw last (``Last-Event-ID``), or from the start, on any instance that
shares the store: what is logged comes at once, then each new append, up to
the terminator. What goes around the frames is the codec's (``opening``,
``resuming``); this module writes no byte of its own.

- An id that is not a stream id, a stream that expired, and another client's
  stream are all the same 404 (``find``).
- A reader past the end and up to date gets None (the route's 204).
- The store failing under a reader: the reader ends its own client's stream
  with the codec's ``broken`` ending (the generation is stopped by its owner).
- The stream's owner gone (``OwnerLost``, Redis only): the reader builds the
  ending (``error`` ``instance_lost``) and has the store append it only if
  the log still stops where it saw it stop (``end_orphan``), then follows
  on: whoever ended it, every reader gets the same single ending.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Protocol

from app.capacity import Capacity, ReaderHold
from app.errors import InvalidRequest, StoreUnavailable, StreamLost
from app.streams.codec import LogCodec
from app.streams.ids import is_stream_id, unknown
from app.streams.store import Meta, OwnerLost, Store

log = logging.getLogger("app.streams")


class Presence(Protocol):
    """A stream run by this process, which counts its readers here (for its resume grace)."""

    def joined(self) -> None: ...

    def left(self) -> None: ...


class Readers:
    __slots__ = ("capacity", "codec", "runs", "store")

    def __init__(
        self, store: Store, codec: LogCodec, capacity: Capacity, runs: Mapping[str, Presence]
    ) -> None:
        self.store = store
        self.codec = codec
        self.capacity = capacity
        self.runs = runs  # the streams this process runs, by id (the registry's)

    async def find(self, sid: str, client: str) -> Meta:
        """The stream's meta, if ``client`` may see it; the same 404 otherwise."""
        if not is_stream_id(sid):
            raise unknown(sid)  # never a store key made of whatever was sent
        meta = await self.store.meta(sid)
        if meta is None or not hmac.compare_digest(meta.client, client):
            raise unknown(sid)
        return meta

    async def subscribe(self, sid: str, client: str, after: int) -> AsyncIterator[bytes] | None:
        """The stream after frame ``after`` (-1: all of it); None once it was all delivered.
        A reader over a cap is refused here, before its response starts (429, 503)."""
        meta = await self.find(sid, client)
        if after > meta.last:
            raise InvalidRequest(
                f"Last-Event-ID: event {after} was never sent on stream '{sid}'",
                param="last_event_id",
                code="invalid_last_event_id",
            )
        if meta.ended and after == meta.last:
            return None
        hold = self.capacity.reader(sid, client)
        return self.read(sid, after, hold, self.runs.get(sid), counted=False)

    async def read(
        self,
        sid: str,
        after: int,
        hold: ReaderHold,
        here: Presence | None,
        *,
        counted: bool = True,
    ) -> AsyncIterator[bytes]:
        """A reader's body. ``hold``: its place under the caps, released when this ends (or
        when a body that never started is collected); ``here``: the stream, if it runs in this
        process (``counted``: its reader was counted there already)."""
        # Counted only once the body runs: a response never sent must not keep a
        # stream from its grace.
        if here is not None and not counted:
            here.joined()
        store, codec = self.store, self.codec
        last, tail = after, b""
        try:
            if after < 0:
                yield codec.opening(sid)
                head = b""
            else:
                head = codec.resuming()
            while True:
                try:
                    async with aclosing(store.follow(sid, last)) as entries:
                        async for n, data, _ in entries:
                            if head:
                                data, head = head + data, b""
                            tail, last = data, n
                            yield data
                    return
                except OwnerLost as lost:
                    await self._end_orphan(sid, lost.last)
        except StoreUnavailable as exc:
            yield codec.broken(sid, last, tail, exc)
        finally:
            hold.release()
            if here is not None:
                here.left()

    async def finish_reason(self, sid: str, after: int, wait_s: float) -> str | None:
        """The stream's finish reason once its end is logged after frame ``after``; None if
        not within ``wait_s`` (or the store failed)."""
        try:
            async with asyncio.timeout(wait_s):
                while True:
                    try:
                        async with aclosing(self.store.follow(sid, after)) as entries:
                            async for n, _, finish in entries:
                                if finish is not None:
                                    return finish
                                after = n
                        return None
                    except OwnerLost as lost:
                        await self._end_orphan(sid, lost.last)
        except (TimeoutError, StoreUnavailable):
            return None

    async def _end_orphan(self, sid: str, last: int) -> None:
        """The owner is gone: end the log after frame ``last`` (unless it moved on or ended
        meanwhile, another reader being quicker)."""
        lost = StreamLost(
            "the gateway instance running this stream stopped; send the request again",
            code="instance_lost",
        )
        frames = self.codec.ending(sid, last + 1, lost, "error")
        if await self.store.end_orphan(sid, last, frames, "error"):
            log.warning("stream %s: its instance is gone; ended it", sid)
