"""Where replay logs live: the ``Store`` seam, and the in-memory store.

A log holds one stream's SSE frames, one per event, numbered from 0 as their
``id: <stream>:<n>`` says. The stream's owner appends; readers ``follow`` from
any position: what is logged already comes at once, then each new append, up
to the ``[DONE]`` frame. ``app.streams.redis_store`` keeps the same logs in
Redis so that any instance can serve any stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

DONE_TAIL = b"data: [DONE]\n\n"
# The most a reader is handed at once when it is behind (a replay, a slow
# client): what it holds while its socket is full.
PIECE_BYTES = 64 * 1024


@dataclass(slots=True, frozen=True)
class Meta:
    client: str  # who may read and stop it (a key fingerprint or an address)
    ended: bool
    last: int  # number of the last logged frame; -1 before the first


class Store(Protocol):
    """One backend for every stream. Every method may raise ``StoreUnavailable``."""

    closing: bool

    async def create(self, sid: str, client: str) -> None: ...

    async def append(self, sid: str, first: int, frames: list[bytes]) -> None: ...

    async def finish(self, sid: str) -> None: ...

    async def fail(self, sid: str, first: int, frames: list[bytes]) -> None:
        """The store failed: end the log with ``frames`` (from number ``first``) where it can."""
        ...

    async def discard(self, sid: str) -> None:
        """Forget a created stream that never ran."""
        ...

    async def meta(self, sid: str) -> Meta | None: ...

    def follow(self, sid: str, after: int) -> AsyncIterator[tuple[int, bytes]]:
        """(number of the last frame, frames joined) after frame ``after``, up to [DONE];
        joined in pieces of at most ``PIECE_BYTES`` (or one larger frame)."""
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

    __slots__ = ("client", "ended", "frames", "wake")

    def __init__(self, client: str) -> None:
        self.client = client
        self.frames: list[bytes] = []
        self.ended = False
        self.wake: asyncio.Event | None = None  # made only while a reader waits

    def notify(self) -> None:
        wake = self.wake
        if wake is not None:
            self.wake = None
            wake.set()

    def extend(self, frames: list[bytes], *, end: bool = False) -> None:
        self.frames.extend(frames)
        # [DONE] is the end, whether or not marking it so (finish) succeeds.
        if end or (frames and frames[-1].endswith(DONE_TAIL)):
            self.ended = True
        self.notify()

    async def follow(self, after: int) -> AsyncIterator[tuple[int, bytes]]:
        frames = self.frames
        i = after + 1
        while True:
            n = len(frames)
            if i + 1 == n:  # live: the one new frame, as it is
                i = n
                yield n - 1, frames[n - 1]
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
                yield j - 1, data
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

    async def append(self, sid: str, first: int, frames: list[bytes]) -> None:
        self._logs[sid].extend(frames)

    async def finish(self, sid: str) -> None:
        log = self._logs.get(sid)
        if log is not None:
            log.extend([], end=True)
            self._expiry.append((asyncio.get_running_loop().time() + self.ttl_s, sid))

    async def fail(self, sid: str, first: int, frames: list[bytes]) -> None:
        await self.append(sid, first, frames)
        await self.finish(sid)

    async def discard(self, sid: str) -> None:
        self._logs.pop(sid, None)

    async def meta(self, sid: str) -> Meta | None:
        self._sweep()
        log = self._logs.get(sid)
        if log is None:
            return None
        return Meta(log.client, log.ended, len(log.frames) - 1)

    def follow(self, sid: str, after: int) -> AsyncIterator[tuple[int, bytes]]:
        log = self._logs.get(sid)
        return _nothing() if log is None else log.follow(after)

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


async def _nothing() -> AsyncIterator[tuple[int, bytes]]:
    return
    yield
