"""Where replay logs live: the ``Store`` seam, and the in-memory store.

A log holds one stream's frames, one entry each, numbered from 0. The frames
are opaque bytes (a wire format's, through ``app.streams.codec``); what the
log knows besides is the stream's end, recorded as data: ``append``/``fail``
with ``end=<finish reason>`` mark the last frame of that batch as the
terminator. The stream's owner appends; readers ``follow`` from any
position: what is logged already comes at once, then each new append, up to
the terminator. ``app.streams.redis_store`` keeps the same logs in Redis so
that any instance can serve any stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Protocol

# The most a reader is handed at once when it is behind (a replay, a slow
# client): what it holds while its socket is full.
PIECE_BYTES = 64 * 1024

Entry = tuple[int, bytes, str | None]
"""What ``follow`` yields: the number of the piece's last frame, the frames joined, and the
finish reason when that last frame is the terminator (None otherwise)."""


@dataclass(slots=True, frozen=True)
class Meta:
    client: str  # who may read and stop it (a key fingerprint or an address)
    ended: bool
    last: int  # number of the last logged frame; -1 before the first
    finish: str | None = None  # the finish reason, once the terminator is logged


class OwnerLost(Exception):
    """Raised by ``follow``: the instance that runs the stream is gone, and the log stops at
    frame ``last`` (what the reader was handed last). The reader may end it
    (``end_orphan``) and follow again."""

    def __init__(self, last: int) -> None:
        super().__init__(last)
        self.last = last


class Store(Protocol):
    """One backend for every stream. Every method may raise ``StoreUnavailable``."""

    closing: bool

    async def create(self, sid: str, client: str) -> None: ...

    async def append(
        self, sid: str, first: int, frames: list[bytes], end: str | None = None
    ) -> None:
        """Log ``frames`` as numbers ``first``...; ``end``: the batch ends the stream with that
        finish reason (recorded beside its last frame, all of it visible at once)."""
        ...

    async def finish(self, sid: str) -> None:
        """The log is over (its terminator is logged): keep it for the TTL."""
        ...

    async def fail(self, sid: str, first: int, frames: list[bytes], end: str) -> None:
        """The store failed: end the log with ``frames`` (from number ``first``) where it can."""
        ...

    async def discard(self, sid: str) -> None:
        """Forget a created stream that never ran."""
        ...

    async def meta(self, sid: str) -> Meta | None: ...

    def follow(self, sid: str, after: int) -> AsyncGenerator[Entry, None]:
        """The frames after frame ``after``, up to the terminator; joined in pieces of at most
        ``PIECE_BYTES`` (or one larger frame). May raise ``OwnerLost``."""
        ...

    async def end_orphan(self, sid: str, last: int, frames: list[bytes], end: str) -> bool:
        """End the log of a stream whose owner is gone with ``frames`` (numbered from
        ``last + 1``), only if frame ``last`` is still its last and it has no end: a stream
        never gets two endings. Whether they were logged."""
        ...

    async def has_reader(self, sid: str) -> bool:
        """Whether a reader on another instance follows it (readers here are counted here)."""
        ...

    async def publish_cancel(self, sid: str) -> None: ...

    async def listen(self, on_cancel: Callable[[str], None]) -> None:
        """Deliver cancels published by any instance, until cancelled."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


class Log:
    """One stream's frames in this process, and the readers waiting for more."""

    __slots__ = ("client", "end_at", "ended", "finish", "frames", "wake")

    def __init__(self, client: str) -> None:
        self.client = client
        self.frames: list[bytes] = []
        self.ended = False
        self.finish: str | None = None
        self.end_at = -1  # the terminator's number, once logged
        self.wake: asyncio.Event | None = None  # made only while a reader waits

    def notify(self) -> None:
        wake = self.wake
        if wake is not None:
            self.wake = None
            wake.set()

    def extend(self, frames: list[bytes], end: str | None = None) -> None:
        self.frames.extend(frames)
        if end is not None:
            # The terminator is the end, whether or not marking it so (finish) succeeds.
            self.finish, self.end_at, self.ended = end, len(self.frames) - 1, True
        self.notify()

    def close(self) -> None:
        self.ended = True
        self.notify()

    def meta(self) -> Meta:
        return Meta(self.client, self.ended, len(self.frames) - 1, self.finish)

    async def follow(self, after: int) -> AsyncGenerator[Entry, None]:
        frames = self.frames
        i = after + 1
        while True:
            n = len(frames)
            if i + 1 == n:  # live: the one new frame, as it is
                i = n
                yield n - 1, frames[n - 1], self.finish if n - 1 == self.end_at else None
            elif i < n:
                # Catching up: pieces of at most PIECE_BYTES (or one larger frame), so
                # that a reader that stops reading waits on its socket's flow control
                # holding one piece, never a copy of the log.
                j, size = i + 1, len(frames[i])
                while j < n and size + len(frames[j]) <= PIECE_BYTES:
                    size += len(frames[j])
                    j += 1
                data = frames[i] if j - i == 1 else b"".join(frames[i:j])
                i = j
                yield j - 1, data, self.finish if j - 1 == self.end_at else None
            elif self.ended:
                return
            else:
                if self.wake is None:
                    self.wake = asyncio.Event()
                await self.wake.wait()


class MemoryStore:
    """Logs in this process: streams are served by the instance that runs them."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.closing = False
        self._logs: dict[str, Log] = {}
        self._expiry: deque[tuple[float, str]] = deque()  # ended logs, oldest first
        self._cancel: Callable[[str], None] | None = None

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            self._logs.pop(expiry.popleft()[1], None)

    async def create(self, sid: str, client: str) -> None:
        self._sweep()
        self._logs[sid] = Log(client)

    async def append(
        self, sid: str, first: int, frames: list[bytes], end: str | None = None
    ) -> None:
        self._logs[sid].extend(frames, end)

    async def finish(self, sid: str) -> None:
        log = self._logs.get(sid)
        if log is not None:
            log.close()
            self._expiry.append((asyncio.get_running_loop().time() + self.ttl_s, sid))

    async def fail(self, sid: str, first: int, frames: list[bytes], end: str) -> None:
        await self.append(sid, first, frames, end)
        await self.finish(sid)

    async def discard(self, sid: str) -> None:
        self._logs.pop(sid, None)

    async def meta(self, sid: str) -> Meta | None:
        self._sweep()
        log = self._logs.get(sid)
        return None if log is None else log.meta()

    def follow(self, sid: str, after: int) -> AsyncGenerator[Entry, None]:
        log = self._logs.get(sid)
        return _nothing() if log is None else log.follow(after)

    async def end_orphan(self, sid: str, last: int, frames: list[bytes], end: str) -> bool:
        # Every stream here is run by this process: never an orphan in practice,
        # but the same rule as in Redis.
        log = self._logs.get(sid)
        if log is None or log.ended or len(log.frames) - 1 != last:
            return False
        await self.fail(sid, last + 1, frames, end)
        return True

    async def has_reader(self, sid: str) -> bool:
        return False

    async def publish_cancel(self, sid: str) -> None:
        if self._cancel is not None:
            self._cancel(sid)

    async def listen(self, on_cancel: Callable[[str], None]) -> None:
        self._cancel = on_cancel

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._logs.clear()


async def _nothing() -> AsyncGenerator[Entry, None]:
    return
    yield
