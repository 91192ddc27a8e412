"""A running generation: one provider stream under the gateway's limits.

``Generation.open()`` waits for the upstream to accept (errors here still
become an HTTP status); ``Generation.events()`` then yields event batches and
guarantees an honest ending: exactly one ``End``, preceded by an ``Error``
when anything went wrong (API.md, "The simple stream"). A provider stream that
stops without a finish reason is a truncation, never a success.

Timeouts (first token, idle, total) are kept by one timer per stream that is
re-armed only when it fires: the relay loop's only per-batch cost is storing
the time of the last batch. A timer that finds its deadline passed cancels the
task reading the stream, and the relay turns that cancellation into a
``timeout`` ending (the same uncancel() dance as ``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from app.errors import GatewayError, UpstreamTimeout, UpstreamTruncated
from app.events import (
    ChatEvent,
    End,
    Error,
    Finish,
    FinishReason,
    Start,
    TextDelta,
    ToolCallDelta,
    Usage,
)

# After the finish reason, how long to wait for the usage and the end of the
# upstream body before ending anyway (an upstream that never sends [DONE]).
FINISH_TAIL_S = 1.0

Expiry = Literal["first_token", "idle", "total"]


@dataclass(slots=True, frozen=True)
class Limits:
    first_token_s: float
    idle_s: float
    total_s: float


class Watchdog:
    __slots__ = (
        "_handle",
        "_loop",
        "expired",
        "first_token_at",
        "idle_s",
        "last",
        "limits",
        "start",
        "task",
    )

    def __init__(self, limits: Limits) -> None:
        self._loop = asyncio.get_running_loop()
        self.limits = limits
        self.idle_s = limits.idle_s
        self.start = self.last = self._loop.time()
        self.first_token_at: float | None = None
        self.expired: Expiry | None = None
        self.task: asyncio.Task[object] | None = asyncio.current_task()
        self._handle = self._loop.call_at(self._deadline()[0], self._check)

    def _deadline(self) -> tuple[float, Expiry]:
        total = self.start + self.limits.total_s
        if self.first_token_at is None:
            first = self.start + self.limits.first_token_s
            return (first, "first_token") if first < total else (total, "total")
        idle = self.last + self.idle_s
        return (idle, "idle") if idle < total else (total, "total")

    def _check(self) -> None:
        deadline, kind = self._deadline()
        if self._loop.time() < deadline:
            self._handle = self._loop.call_at(deadline, self._check)
            return
        self.expired = kind
        if self.task is not None:
            self.task.cancel()

    def owns_cancellation(self) -> bool:
        """True when the pending cancellation is ours alone (then it is undone)."""
        task = self.task
        if self.expired is None or task is None:
            return False
        return task.uncancel() == 0

    def stop(self) -> None:
        self._handle.cancel()


class Generation:
    """See the module docstring. ``model``/``provider`` name the answering target."""

    def __init__(
        self, stream: AsyncIterator[list[ChatEvent]], *, model: str, provider: str, limits: Limits
    ) -> None:
        self.model = model
        self.provider = provider
        self._it = stream
        self._wd = Watchdog(limits)
        self._first: list[ChatEvent] = []
        self.finish: FinishReason | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None

    async def open(self) -> None:
        """Wait until the upstream accepted the request; raise its error otherwise."""
        wd = self._wd
        try:
            self._first = await anext(self._it)
            wd.last = wd._loop.time()
        except asyncio.CancelledError:
            if wd.owns_cancellation():
                await self.aclose()
                raise self._timeout_error() from None
            await self.aclose()
            raise
        except StopAsyncIteration:
            await self.aclose()
            raise UpstreamTruncated(
                f"provider '{self.provider}' closed the stream before it started",
                code="upstream_truncated",
            ) from None
        except GatewayError:
            await self.aclose()
            raise
        finally:
            # Between here and events() no task reads the stream: a deadline
            # that passes meanwhile is noticed when events() starts.
            wd.task = None

    def _timeout_error(self) -> UpstreamTimeout:
        what = {
            "first_token": "no first token within the first-token timeout",
            "idle": "no data within the idle timeout",
            "total": "the stream exceeded the total timeout",
        }[self._wd.expired or "total"]
        return UpstreamTimeout(f"provider '{self.provider}': {what}", code="timeout")

    def _scan(self, batch: list[ChatEvent]) -> list[ChatEvent]:
        """Take Usage/Finish out of a batch (the relay reports them in End)."""
        out: list[ChatEvent] | None = None
        for i, ev in enumerate(batch):
            cls = ev.__class__
            if cls is TextDelta or cls is ToolCallDelta:
                if self._wd.first_token_at is None:
                    self._wd.first_token_at = self._wd.last
                if out is not None:
                    out.append(ev)
                continue
            if out is None:
                out = batch[:i]
            if isinstance(ev, Usage):
                if ev.input_tokens is not None:
                    self.input_tokens = ev.input_tokens
                if ev.output_tokens is not None:
                    self.output_tokens = ev.output_tokens
            elif isinstance(ev, Finish):
                self.finish = ev.reason
                self._wd.idle_s = min(self._wd.idle_s, FINISH_TAIL_S)
                if self._wd.first_token_at is None:
                    self._wd.first_token_at = self._wd.last
            elif isinstance(ev, Start):
                ev.model = self.model
                ev.provider = self.provider
                out.append(ev)
            else:
                out.append(ev)
        return batch if out is None else out

    def end(self, reason: FinishReason) -> End:
        wd = self._wd
        now = wd._loop.time()
        ttft = wd.first_token_at
        return End(
            finish_reason=reason,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            model=self.model,
            provider=self.provider,
            ttft_ms=None if ttft is None else round((ttft - wd.start) * 1000),
            duration_ms=round((now - wd.start) * 1000),
        )

    async def events(self) -> AsyncIterator[list[ChatEvent]]:
        wd = self._wd
        loop = wd._loop
        it = self._it
        wd.task = asyncio.current_task()
        failure: GatewayError | None = None
        try:
            first, self._first = self._first, []
            out = self._scan(first)
            if out:
                yield out
            if wd.expired is not None:
                raise asyncio.CancelledError  # expired between open() and now
            while True:
                try:
                    batch = await anext(it)
                except StopAsyncIteration:
                    break
                wd.last = loop.time()
                out = self._scan(batch)
                if out:
                    yield out
                if self.finish is not None and self.output_tokens is not None:
                    # Everything the client needs is known: end now, then let
                    # the upstream body finish (or not) without the client.
                    yield [self.end(self.finish)]
                    await self._drain()
                    return
        except asyncio.CancelledError:
            if wd.expired is None or (wd.task is not None and not wd.owns_cancellation()):
                raise
            if self.finish is None:
                failure = self._timeout_error()
        except GatewayError as exc:
            failure = exc
        finally:
            wd.stop()
            await self.aclose()
        if failure is not None:
            reason: FinishReason = "timeout" if isinstance(failure, UpstreamTimeout) else "error"
            yield [Error(failure), self.end(reason)]
        elif self.finish is None:
            err = UpstreamTruncated(
                f"provider '{self.provider}' ended the stream without a finish reason",
                code="upstream_truncated",
            )
            yield [Error(err), self.end("error")]
        else:
            yield [self.end(self.finish)]

    async def _drain(self) -> None:
        wd = self._wd
        try:
            async for _ in self._it:
                pass
        except asyncio.CancelledError:
            if wd.expired is None or not wd.owns_cancellation():
                raise
        except GatewayError:
            pass

    async def aclose(self) -> None:
        self._wd.stop()
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            await aclose()
