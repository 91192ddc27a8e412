"""What a replay log needs from a wire format: the seam between ``app.streams`` and ``app.wire``.

``app.streams`` stores and replays opaque frames; it never builds or parses
one. A wire format that implements ``LogCodec`` (``app.wire.simple.SimpleLog``
for the simple protocol) becomes resumable with no change here. The contract:

- ``encoder(sid).frames(batch)``: one frame per log entry, numbered from 0
  across batches (``n`` is the number the next frame gets; the producer sets
  it back when a batch is not logged). A batch that holds the ``End`` encodes
  to at least one frame, and its last frame is the stream's terminator: the
  store records the finish reason beside it, so that nobody parses frames to
  find the end.
- ``ending(...)``: the frames that end a stream whose generation cannot: an
  ``error``, the ``end`` and the terminator, numbered from ``n``, with a
  ``start`` first when nothing was logged (``n == 0``).
- ``opening(sid)``: what a reader that follows from the start gets before
  any frame; ``resuming()``: the prefix of a resumed reader's first piece.
- ``broken(...)``: what a reader writes to end its own client's stream when
  the store fails under it.
"""

from __future__ import annotations

from typing import Protocol

from app.errors import GatewayError
from app.events import FinishReason, RelayEvent


class LogEncoder(Protocol):
    """One stream's frames, numbered across batches."""

    n: int  # the number the next frame gets

    def frames(self, batch: list[RelayEvent]) -> list[bytes]: ...


class LogCodec(Protocol):
    def encoder(self, sid: str) -> LogEncoder: ...

    def ending(
        self,
        sid: str,
        n: int,
        error: GatewayError,
        reason: FinishReason = "error",
        *,
        model: str = "",
    ) -> list[bytes]:
        """``error``, ``end`` and the terminator numbered from ``n`` (a ``start`` first when
        ``n == 0``), for a stream whose generation cannot end it (usage is not known)."""
        ...

    def opening(self, sid: str) -> bytes:
        """Before the first frame, for a reader from the start (e.g. the stream's id, so that
        a reconnect while the first token is awaited resumes this stream)."""
        ...

    def resuming(self) -> bytes:
        """Put before a resumed reader's first frame."""
        ...

    def broken(self, sid: str, last: int, tail: bytes, error: GatewayError) -> bytes:
        """A reader's own ending after the store failed under it: ``last`` is the number of the
        last frame it delivered (-1: none), ``tail`` the last piece it wrote (a codec whose
        ending spans several frames may find there that its end was already delivered)."""
        ...
