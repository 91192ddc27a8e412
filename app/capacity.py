"""What one process holds open for its clients, under caps that answer before a response starts.

- ``GATEWAY_MAX_OPEN_STREAMS``: generations (every route, streamed or not,
  WebSocket ones included) and readers of resumable streams open in this
  process at once; over it, ``503`` ``too_many_open_streams``;
- ``GATEWAY_MAX_READERS_PER_STREAM``: readers attached to one resumable
  stream at once; over it, ``429`` ``too_many_readers``;
- ``GATEWAY_MAX_READERS_PER_CLIENT``: readers one client (key, or address
  without keys) holds at once; over it, ``429`` ``too_many_client_readers``.

Counted in this process, also with Redis: what a cap protects is this
process's memory, sockets and Redis connections, which only its own count
bounds exactly, and a count kept here costs no round trip and cannot outlive
a crashed instance. Behind N instances a client may hold N times its reader
cap; the per-instance caps still bound what each instance holds.

A hold is released explicitly when its stream ends, and at the latest when
the object holding it is collected (a response whose body never started),
so that a count can never leak.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import TYPE_CHECKING

from app.errors import GatewayError, Overloaded, RateLimited
from app.ratelimit import Slot

if TYPE_CHECKING:
    from app.metrics import Metrics

# What a refused client is told to wait: readers and generations end all the
# time (the per-client concurrency cap answers the same).
RETRY_AFTER_S = 1.0


class Hold:
    """One open stream's place under the process cap; ``release()`` is idempotent."""

    __slots__ = ("_cap",)

    def __init__(self, cap: Capacity | None) -> None:
        self._cap = cap

    def release(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.open -= 1

    def __del__(self) -> None:
        cap = self._cap
        if cap is None:
            return
        try:
            here = asyncio.get_running_loop() is cap.loop
        except RuntimeError:
            here = False
        if here:
            self.release()
        else:  # collected on another thread (a cycle): count on the loop's own
            with suppress(RuntimeError):  # the loop is closed: nothing counts any more
                cap.loop.call_soon_threadsafe(self.release)

    def joined(self, slot: Slot) -> Slot:
        """``slot`` (a client's, async) that also releases this hold."""
        return HeldSlot(self, slot)


class ReaderHold(Hold):
    """A reader's places: under the process cap, on its stream and for its client."""

    __slots__ = ("client", "sid")

    def __init__(self, cap: Capacity, sid: str, client: str) -> None:
        super().__init__(cap)
        self.sid = sid
        self.client = client

    def release(self) -> None:
        cap = self._cap
        super().release()
        if cap is not None:
            _drop(cap.by_stream, self.sid)
            _drop(cap.by_client, self.client)
            cap.readers -= 1


class HeldSlot(Slot):
    """A generation's slot under its client's limits, and its place under the process cap."""

    __slots__ = ("hold", "slot")

    def __init__(self, hold: Hold, slot: Slot) -> None:
        self.hold = hold
        self.slot = slot

    async def release(self) -> None:
        self.hold.release()
        await self.slot.release()


def _drop(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]  # only what is held is kept: the tables stay bounded


class Capacity:
    def __init__(self, max_open: int, per_stream: int, per_client: int) -> None:
        self.max_open = max_open
        self.per_stream = per_stream
        self.per_client = per_client
        self.open = 0
        self.readers = 0
        self.by_stream: dict[str, int] = {}
        self.by_client: dict[str, int] = {}
        self.metrics: Metrics | None = None
        self.loop: asyncio.AbstractEventLoop  # the one the counts are kept on

    def export(self, metrics: Metrics) -> None:
        """Count refusals in ``metrics`` and expose the current counts as gauges (once)."""
        if self.metrics is metrics:
            return
        self.metrics = metrics
        metrics.gauge(
            "gateway_open_streams",
            "generations and resumable-stream readers open in this process "
            "(GATEWAY_MAX_OPEN_STREAMS caps it)",
            lambda: self.open,
        )
        metrics.gauge(
            "gateway_stream_readers",
            "readers attached to resumable streams in this process",
            lambda: self.readers,
        )

    def _refuse(self, limit: str, exc: GatewayError) -> GatewayError:
        if self.metrics is not None:
            self.metrics.refused.labels(limit).inc()
        return exc

    def _check_open(self) -> None:
        if self.open >= self.max_open:
            raise self._refuse(
                "open_streams",
                Overloaded(
                    f"this gateway instance has {self.max_open} streams open, its limit "
                    "(GATEWAY_MAX_OPEN_STREAMS); retry after the Retry-After seconds",
                    code="too_many_open_streams",
                    retry_after=RETRY_AFTER_S,
                ),
            )

    def hold(self) -> Hold:
        """A place for one generation (503 when the process is full)."""
        self._check_open()
        self.loop = asyncio.get_running_loop()
        self.open += 1
        return Hold(self)

    def reader(self, sid: str, client: str, *, check: bool = True) -> ReaderHold:
        """A place for one reader of stream ``sid`` (429 over a reader cap, 503 when full).
        ``check=False``: counted, never refused (its response is already decided)."""
        if check:
            self._check_reader(sid, client)
        self.loop = asyncio.get_running_loop()
        self.open += 1
        self.readers += 1
        self.by_stream[sid] = self.by_stream.get(sid, 0) + 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        return ReaderHold(self, sid, client)

    def _check_reader(self, sid: str, client: str) -> None:
        if self.by_stream.get(sid, 0) >= self.per_stream:
            raise self._refuse(
                "readers_per_stream",
                RateLimited(
                    f"stream '{sid}' has {self.per_stream} readers attached, its limit "
                    "(GATEWAY_MAX_READERS_PER_STREAM); close one or retry later",
                    code="too_many_readers",
                    retry_after=RETRY_AFTER_S,
                ),
            )
        if self.by_client.get(client, 0) >= self.per_client:
            raise self._refuse(
                "readers_per_client",
                RateLimited(
                    f"this client has {self.per_client} stream readers open, its limit "
                    "(GATEWAY_MAX_READERS_PER_CLIENT); close one or retry later",
                    code="too_many_client_readers",
                    retry_after=RETRY_AFTER_S,
                ),
            )
        self._check_open()
