"""Graceful shutdown: drain, then end what is left honestly (API.md, Timeouts and disconnects).

On SIGTERM (or SIGINT) the gateway

1. turns unready (``/readyz`` 503) and refuses new streams with 503 +
   ``Retry-After`` (``ShuttingDown``), while the listener stays open so that
   a load balancer sees the answer rather than a refused connection;
2. lets running streams finish for ``GATEWAY_SHUTDOWN_GRACE_S``;
3. ends the rest with an ``error`` (``server_shutdown``), ``end``
   (``finish_reason: cancelled``) and ``[DONE]``, closing their upstream calls;
4. then hands the signal to uvicorn, which closes the listener and exits.

A second signal skips the wait. The hook wraps whatever handler the server
installed (uvicorn's), so it works under ``python -m app`` and plain
``uvicorn app.main:app`` alike; off the main thread (tests) there are no
signals, and ``begin()`` is called directly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from app.dispatch import Dispatch
from app.errors import ShuttingDown
from app.streams import Streams

log = logging.getLogger("app.shutdown")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# After the grace, how long the ended streams get to flush their last events.
_FLUSH_S = 5.0


class Drain:
    def __init__(self, dispatch: Dispatch, grace_s: float, streams: Streams | None = None) -> None:
        self.dispatch = dispatch
        self.streams = streams
        self.grace_s = grace_s
        self.task: asyncio.Task[None] | None = None
        self._previous: dict[int, Any] = {}
        # Called once the streams are over, before the server is told to exit.
        self.before_exit: list[Callable[[], None]] = []

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)
            self._previous[sig] = previous

            def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                def then() -> None:
                    if callable(previous):
                        previous(signum, frame)
                    else:
                        signal.raise_signal(signum)

                if self.task is not None:  # a second signal: stop waiting
                    then()
                    return
                loop.call_soon_threadsafe(self.begin, then)

            signal.signal(sig, handler)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def begin(self, then: Callable[[], None] | None = None) -> None:
        if self.task is None:
            self.dispatch.draining = True
            self.task = asyncio.get_running_loop().create_task(self._run(then))

    async def _run(self, then: Callable[[], None] | None) -> None:
        dispatch = self.dispatch
        loop = asyncio.get_running_loop()
        streams = self.streams

        def running() -> int:
            # Resumable streams still opening are not in dispatch.active yet.
            return len(dispatch.active) + (len(streams.runs) if streams is not None else 0)

        log.info("shutdown: draining %d streams for up to %.0f s", running(), self.grace_s)
        deadline = loop.time() + self.grace_s
        # Polled: this runs once per process lifetime, and keeps the hot path free.
        while running() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if running():
            log.info("shutdown: ending %d streams after the grace period", running())
            reason = ShuttingDown(
                "the server is shutting down; the answer was cut short", code="shutting_down"
            )
            for gen in list(dispatch.active):
                gen.stop(reason)
            if streams is not None:
                streams.stop_all(reason)
            deadline = loop.time() + _FLUSH_S
            while running() and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        for hook in self.before_exit:
            hook()
        if then is not None:
            then()
