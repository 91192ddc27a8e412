"""One timer per stream for its first-token, idle and total deadlines.

It is re-armed only when it fires: the relay loop's only per-batch cost is
storing the time of the last batch. A timer that finds its deadline passed
cancels the task reading the stream, and the relay turns that cancellation
into a ``timeout`` ending (the same uncancel() dance as ``asyncio.timeout``).
A deadline that falls while the relay is handed over to its consumer waits,
so that it cancels an upstream read, never a client's send.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from app.upstreams import Timeouts

# "cancelled": the generation was stopped from outside (shutdown).
Expiry = Literal["first_token", "idle", "total", "cancelled"]


class Watchdog:
    __slots__ = (
        "_handle",
        "_loop",
        "attempt_start",
        "expired",
        "idle_s",
        "interrupted",
        "last",
        "paused",
        "start",
        "task",
        "timeouts",
        "token",
    )

    def __init__(self, timeouts: Timeouts, start: float, attempt_start: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.start = start
        self.task: asyncio.Task[object] | None = asyncio.current_task()
        # True while the relay is handed over to its consumer (at a yield): a
        # deadline then waits, so that it cancels the upstream read, never the
        # client's send.
        self.paused = False
        self.interrupted = False
        self.arm(timeouts, attempt_start)

    def arm(self, timeouts: Timeouts, attempt_start: float) -> None:
        """Watch a (new) attempt: first-token deadline from its start, total from the stream's."""
        self.timeouts = timeouts
        self.idle_s = timeouts.idle_s
        self.attempt_start = attempt_start
        self.last = self._loop.time()
        self.token = False
        self.expired: Expiry | None = None
        self._handle = self._loop.call_at(self._deadline()[0], self._check)

    def _deadline(self) -> tuple[float, Expiry]:
        total = self.start + self.timeouts.total_s
        if not self.token:
            first = self.attempt_start + self.timeouts.first_token_s
            return (first, "first_token") if first < total else (total, "total")
        idle = self.last + self.idle_s
        return (idle, "idle") if idle < total else (total, "total")

    def _check(self) -> None:
        deadline, kind = self._deadline()
        now = self._loop.time()
        if self.interrupted:
            kind = "cancelled"
        elif now < deadline:
            self._handle = self._loop.call_at(deadline, self._check)
            return
        if self.paused:
            self._handle = self._loop.call_at(now + 0.05, self._check)
            return
        self.expired = kind
        if self.task is not None:
            self.task.cancel()

    def interrupt(self) -> None:
        """Stop the stream from outside at the next safe point (never inside a send)."""
        if self.task is None:
            return  # already over
        self.interrupted = True
        self._handle.cancel()
        self._handle = self._loop.call_at(self._loop.time(), self._check)

    def take_expiry(self) -> Expiry | None:
        """After a CancelledError: which deadline caused it, if the cancellation was ours alone.

        Our cancel() is undone exactly once; when someone else cancelled the
        task too, None says: let the cancellation propagate.
        """
        kind, task = self.expired, self.task
        if kind is None or task is None:
            return None
        self.expired = None
        return kind if task.uncancel() == 0 else None

    def rearm(self) -> None:
        """The deadline moved earlier (first content: idle replaces first-token; the finish
        tail): the lazy timer only ever moves later by itself. A pending interrupt stays
        due at once."""
        self._handle.cancel()
        when = self._loop.time() if self.interrupted else self._deadline()[0]
        self._handle = self._loop.call_at(when, self._check)

    def hold(self) -> None:
        """Between attempts: no deadlines (failover keeps its own), but an interrupt lands."""
        self._handle.cancel()
        if self.interrupted:
            self._handle = self._loop.call_at(self._loop.time(), self._check)

    def stop(self) -> None:
        self._handle.cancel()
        self.task = None
