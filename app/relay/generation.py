"""A running generation: upstream attempts relayed under the gateway's limits.

``Generation.open()`` waits until some target accepted the request (errors
here still become an HTTP status; retries and fallbacks are ``Failover``'s).
``Generation.events()`` then yields event batches and guarantees an honest
ending: exactly one ``End``, preceded by an ``Error`` when anything went wrong
(API.md, "The simple stream"). A provider stream that stops without a finish
reason is a truncation, never a success.

The ``Start`` event is held back until the first content: an attempt that
fails before any content reached the client is replaced by the next one
without the client seeing it, and ``start`` then names the model that
actually answers. After content has been sent, a failure ends the stream,
unless the alias allows continuation (``Failover.continuation``): the next
target is asked to finish the partial answer and only what follows is
relayed, so the client receives one whole answer; if that fails too, the
client sees the original failure.

Timeouts (first token, idle, total) are ``app.relay.watchdog``'s. The
relay reaches nothing above it: what it reports (metrics, the stream's log
line) goes to the failover's ``Observer``, and what must happen when a
generation is over (its concurrency slot, the running set) is ``on_close``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import assert_never

from app.errors import (
    Cancelled,
    GatewayError,
    ShuttingDown,
    UpstreamTimeout,
    UpstreamTruncated,
)
from app.events import (
    End,
    Error,
    Finish,
    FinishReason,
    ProviderEvent,
    RelayEvent,
    Start,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from app.failover import Failover, Opened, close_stream
from app.relay.continuation import Continuation
from app.relay.structured import Structured
from app.relay.watchdog import Expiry, Watchdog

log = logging.getLogger("app.relay")

# After the finish reason, how long to wait for the usage and the end of the
# upstream body before ending anyway (an upstream that never sends [DONE]).
FINISH_TAIL_S = 1.0


class Generation:
    """See the module docstring. ``model``/``provider`` name the answering target."""

    __slots__ = (
        "_cont",
        "_deltas",
        "_first",
        "_fo",
        "_it",
        "_opened",
        "_start",
        "_stop",
        "_wd",
        "finish",
        "first_token_at",
        "input_tokens",
        "model",
        "on_close",
        "output_tokens",
        "provider",
        "shape",
    )

    def __init__(self, failover: Failover) -> None:
        self._fo = failover
        self._opened: Opened | None = None
        self._it: AsyncIterator[list[ProviderEvent]] | None = None
        self._first: list[ProviderEvent] = []
        self._wd: Watchdog | None = None
        self.model = ""
        self.provider = ""
        self.finish: FinishReason | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.first_token_at: float | None = None
        self._start: Start | None = None  # held back until the first content
        self._cont = Continuation() if failover.route.continue_on_failure else None
        self._deltas = 0  # content events relayed: stands in for an unreported output count
        self._stop: GatewayError | None = None  # set by stop(): ends as cancelled
        # Called once when the generation is over (the dispatcher frees its ticket).
        self.on_close: Callable[[], Awaitable[None]] | None = None
        # Structured output's partial and final objects, for the routes that send them.
        self.shape: Structured | None = None

    @property
    def request_id(self) -> str:
        return self._fo.request.request_id

    async def open(self) -> None:
        """Wait until a target accepted the request; raise the most meaningful error otherwise."""
        self._use(await self._fo.first())

    def _use(self, opened: Opened) -> None:
        self._opened = opened
        self._it = opened.stream
        self._first = opened.first
        self.model = opened.target.name
        self.provider = opened.target.provider
        self.finish = None
        # Usage counts only the answering attempt (a continuation's part is
        # added to what was carried over in end()).
        self.input_tokens = self.output_tokens = None

    def stop(self, reason: GatewayError) -> None:
        """End the stream now with ``end`` ``cancelled``, after an ``error`` with ``reason``
        unless it is ``Cancelled`` (the client's own stop)."""
        if self._stop is None:
            self._stop = reason
            if self._wd is not None:
                self._wd.interrupt()

    def _timeout_error(self, kind: Expiry) -> GatewayError:
        if kind == "cancelled":
            assert self._stop is not None
            return self._stop
        what = {
            "first_token": "no first token within the first-token timeout",
            "idle": "no data within the idle timeout",
            "total": "the stream exceeded the total timeout",
        }[kind]
        return UpstreamTimeout(f"provider '{self.provider}': {what}", phase=kind)

    def _scan(self, batch: list[ProviderEvent]) -> list[RelayEvent]:
        """Relay content as it is; take Usage/Finish out (End reports them)."""
        wd = self._wd
        assert wd is not None
        if not wd.token:
            return self._scan_slow(batch)
        for ev in batch:
            cls = ev.__class__
            if cls is not TextDelta and cls is not ToolCallDelta:
                return self._scan_slow(batch)
        self._deltas += len(batch)
        content: list[RelayEvent] = batch  # type: ignore[assignment]  # checked just above
        if self._cont is not None:
            self._cont.record(content)  # type: ignore[arg-type]
        return content

    def _scan_slow(self, batch: list[ProviderEvent]) -> list[RelayEvent]:
        wd = self._wd
        assert wd is not None
        cont = self._cont
        out: list[RelayEvent] = []
        for ev in batch:
            if isinstance(ev, TextDelta | ToolCallDelta):
                if not wd.token:
                    first = self._first_content(ev)
                    if first is None:
                        continue
                    ev = first
                    if self._start is not None:
                        out.append(self._start)
                        self._start = None
                if cont is not None:
                    cont.add(ev)
                self._deltas += 1
                out.append(ev)
            elif isinstance(ev, Usage):
                if ev.input_tokens is not None:
                    self.input_tokens = ev.input_tokens
                if ev.output_tokens is not None:
                    self.output_tokens = ev.output_tokens
            elif isinstance(ev, Finish):
                self.finish = ev.reason
                wd.idle_s = min(wd.idle_s, FINISH_TAIL_S)
                if not wd.token:
                    self._got_content()
                else:
                    wd.rearm()
            elif isinstance(ev, Start):
                ev.model = self.model
                ev.provider = self.provider
                # A continuation's Start marks the seam (sent before its first content).
                ev.continuation = cont is not None and cont.original is not None
                self._start = ev
            else:
                assert_never(ev)
        return out

    def _got_content(self) -> None:
        wd = self._wd
        assert wd is not None and self._opened is not None
        wd.token = True
        wd.rearm()
        if self.first_token_at is None:
            self.first_token_at = wd.last

    def _first_content(self, ev: TextDelta | ToolCallDelta) -> TextDelta | ToolCallDelta | None:
        """An attempt's first content; a continuation's seam is trimmed of repeated whitespace."""
        if self._cont is not None:
            found = self._cont.first(ev)
            if found is None:
                return None
            ev = found
        self._got_content()
        return ev

    def end(self, reason: FinishReason) -> End:
        fo = self._fo
        ttft = self.first_token_at
        output = self.output_tokens
        cont = self._cont
        continued = cont is not None and cont.original is not None
        if continued:  # a continued answer: both attempts' output
            assert cont is not None
            output = cont.carry_output + (output or 0)
        elif output is None and reason in ("cancelled", "error", "timeout") and self._deltas:
            # Cut short before the provider's count came: one token per delta.
            output = self._deltas
        # A continued answer counts the input of the attempt that finished it (its
        # prompt holds the partial answer), whatever the providers; a failed
        # continuation is reported as the first attempt (target, error, input).
        inp = self.input_tokens
        if inp is None and continued:
            assert cont is not None
            inp = cont.carry_input
        end = End(
            finish_reason=reason,
            input_tokens=inp,
            output_tokens=output,
            model=self.model,
            provider=self.provider,
            ttft_ms=None if ttft is None else round((ttft - fo.start) * 1000),
            duration_ms=round((fo.loop.time() - fo.start) * 1000),
            attempts=fo.records,
        )
        opened = self._opened
        fo.observer.ended(end, fo.request, None if opened is None else opened.target)
        return end

    def events(self) -> AsyncGenerator[list[RelayEvent], None]:
        """The event batches (see the module docstring), shaped when ``shape`` is set."""
        relay = self._relay()
        return relay if self.shape is None else self.shape.over(relay)

    async def _relay(self) -> AsyncGenerator[list[RelayEvent], None]:
        opened = self._opened
        assert opened is not None
        fo = self._fo
        loop = fo.loop
        wd = self._wd = Watchdog(opened.timeouts, fo.start, opened.started)
        if self._stop is not None:
            wd.interrupt()
        failure: GatewayError | None = None
        try:
            while True:  # one round per attempt
                failure = None
                it = self._it
                assert it is not None
                try:
                    first, self._first = self._first, []
                    out = self._scan(first)
                    if out:
                        wd.paused = True
                        yield out
                        wd.paused = False
                    while True:
                        try:
                            batch = await anext(it)
                        except StopAsyncIteration:
                            break
                        wd.last = loop.time()
                        out = self._scan(batch)
                        if out:
                            wd.paused = True
                            yield out
                            wd.paused = False
                        if self.finish is not None and self.output_tokens is not None:
                            break  # everything the client needs is known: end now
                except asyncio.CancelledError:
                    kind = wd.take_expiry()
                    if kind is None:
                        raise
                    if self.finish is None or kind == "cancelled":
                        failure = self._timeout_error(kind)
                except GatewayError as exc:
                    # After the finish reason the answer is whole: a connection
                    # lost before [DONE] or the usage does not undo it.
                    if self.finish is None:
                        failure = exc
                if failure is None and self.finish is None:
                    failure = UpstreamTruncated(
                        f"provider '{self.provider}' ended the stream without a finish reason",
                        code="upstream_truncated",
                    )
                current = self._opened
                assert current is not None
                if failure is not None and failure is self._stop:
                    # Stopped from outside: not the upstream's fault (no circuit count).
                    fo.settle(current, None, cancelled=True)
                else:
                    fo.settle(current, failure)
                if failure is None:
                    if self.output_tokens is not None:
                        # Send the end now; the upstream body may finish (or not)
                        # without the client waiting for it.
                        wd.paused = True
                        yield self._held([self.end(self.finish)])  # type: ignore[arg-type]
                        wd.paused = False
                        await self._drain(it)
                        return
                    await close_stream(it)
                    break
                await close_stream(it)
                log.warning(
                    "upstream fault rid=%s target=%s code=%s: %s",
                    self.request_id,
                    current.target.name,
                    failure.code,
                    failure.message,
                )
                wd.hold()
                try:
                    nxt, failure = await self._next(failure)
                except asyncio.CancelledError:
                    if wd.take_expiry() != "cancelled":
                        raise
                    nxt, failure = None, self._timeout_error("cancelled")
                if nxt is None:
                    break
                self._use(nxt)
                wd.arm(nxt.timeouts, nxt.started)
        finally:
            wd.stop()
            await self.aclose()
        if failure is not None:
            cont = self._cont
            if cont is not None and cont.original is not None and failure is not self._stop:
                # A failed continuation reports the first failure, and its target.
                failure = cont.original
                self.model, self.provider = cont.original_target
                self.input_tokens = cont.carry_input
            reason: FinishReason = "timeout" if isinstance(failure, UpstreamTimeout) else "error"
            if failure is self._stop:
                # A stop by the client or a shutdown ends "cancelled"; one forced by a
                # failure of the gateway itself (its replay log) ends "error".
                if isinstance(failure, Cancelled):
                    yield self._held([self.end("cancelled")])
                    return
                reason = "cancelled" if isinstance(failure, ShuttingDown) else "error"
            yield self._held([Error(failure), self.end(reason)])
        else:
            assert self.finish is not None
            yield self._held([self.end(self.finish)])

    def _held(self, batch: list[RelayEvent]) -> list[RelayEvent]:
        """An ending batch, behind the Start if none was sent (no content came)."""
        start, self._start = self._start, None
        return batch if start is None or start.continuation else [start, *batch]

    async def _next(self, failure: GatewayError) -> tuple[Opened | None, GatewayError]:
        """The attempt that takes over after ``failure``, or None and the error to report."""
        wd = self._wd
        assert wd is not None
        fo = self._fo
        if not wd.token and self.first_token_at is None:
            # Nothing reached the client yet: fail over as if before the stream.
            try:
                return await fo.after(failure), failure
            except GatewayError as final:
                return None, final
        cont = self._cont
        if cont is None:
            return None, failure
        opened = await cont.take_over(
            fo,
            failure,
            target=(self.model, self.provider),
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
        )
        return opened, failure

    async def _drain(self, it: AsyncIterator[list[ProviderEvent]]) -> None:
        """Read the upstream body to its end (within the finish tail): the connection is reused."""
        wd = self._wd
        assert wd is not None
        try:
            async for _ in it:
                pass
        except asyncio.CancelledError:
            if wd.take_expiry() is None:
                raise
        except GatewayError:
            pass

    async def aclose(self) -> None:
        if self._wd is not None:
            self._wd.stop()
        opened = self._opened
        if opened is not None and not opened.settled:
            self._fo.settle(opened, None, cancelled=True)
        try:
            if self._it is not None:
                await close_stream(self._it)
        finally:
            # Last (it frees the slot, which may wait on Redis): the upstream is closed first.
            on_close, self.on_close = self.on_close, None
            if on_close is not None:
                await on_close()
