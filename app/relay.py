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

Timeouts (first token, idle, total) are kept by one timer per stream that is
re-armed only when it fires: the relay loop's only per-batch cost is storing
the time of the last batch. A timer that finds its deadline passed cancels the
task reading the stream, and the relay turns that cancellation into a
``timeout`` ending (the same uncancel() dance as ``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Literal

from app.errors import (
    Cancelled,
    GatewayError,
    ShuttingDown,
    UpstreamTimeout,
    UpstreamTruncated,
)
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
from app.failover import Failover, Limits, Opened, close_stream

log = logging.getLogger("app.relay")
stream_log = logging.getLogger("app.stream")

# After the finish reason, how long to wait for the usage and the end of the
# upstream body before ending anyway (an upstream that never sends [DONE]).
FINISH_TAIL_S = 1.0

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
        "limits",
        "paused",
        "start",
        "task",
        "token",
    )

    def __init__(self, limits: Limits, start: float, attempt_start: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.start = start
        self.task: asyncio.Task[object] | None = asyncio.current_task()
        # True while the relay is handed over to its consumer (at a yield): a
        # deadline then waits, so that it cancels the upstream read, never the
        # client's send.
        self.paused = False
        self.interrupted = False
        self.arm(limits, attempt_start)

    def arm(self, limits: Limits, attempt_start: float) -> None:
        """Watch a (new) attempt: first-token deadline from its start, total from the stream's."""
        self.limits = limits
        self.idle_s = limits.idle_s
        self.attempt_start = attempt_start
        self.last = self._loop.time()
        self.token = False
        self.expired: Expiry | None = None
        self._handle = self._loop.call_at(self._deadline()[0], self._check)

    def _deadline(self) -> tuple[float, Expiry]:
        total = self.start + self.limits.total_s
        if not self.token:
            first = self.attempt_start + self.limits.first_token_s
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
        tail): the lazy timer only ever moves later by itself."""
        self._handle.cancel()
        self._handle = self._loop.call_at(self._deadline()[0], self._check)

    def hold(self) -> None:
        """Between attempts: no deadlines (failover keeps its own), but an interrupt lands."""
        self._handle.cancel()
        if self.interrupted:
            self._handle = self._loop.call_at(self._loop.time(), self._check)

    def stop(self) -> None:
        self._handle.cancel()
        self.task = None


class Generation:
    """See the module docstring. ``model``/``provider`` name the answering target."""

    __slots__ = (
        "_carry_input",
        "_carry_output",
        "_deltas",
        "_first",
        "_fo",
        "_it",
        "_opened",
        "_original",
        "_original_target",
        "_partial",
        "_start",
        "_stop",
        "_tools_sent",
        "_trim",
        "_wd",
        "finish",
        "first_token_at",
        "input_tokens",
        "model",
        "on_close",
        "output_tokens",
        "provider",
    )

    def __init__(self, failover: Failover) -> None:
        self._fo = failover
        self._opened: Opened | None = None
        self._it: AsyncIterator[list[ChatEvent]] | None = None
        self._first: list[ChatEvent] = []
        self._wd: Watchdog | None = None
        self.model = ""
        self.provider = ""
        self.finish: FinishReason | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.first_token_at: float | None = None
        self._start: Start | None = None  # held back until the first content
        # Continuation: the text sent so far (only when the alias allows it),
        # and what a continuing attempt must account for.
        self._partial: list[str] | None = [] if failover.route.continue_on_failure else None
        self._tools_sent = False
        self._original: GatewayError | None = None
        self._original_target = ("", "")
        self._trim = ""
        self._carry_output = 0
        self._deltas = 0  # content events relayed: stands in for an unreported output count
        self._carry_input: int | None = None
        self._stop: GatewayError | None = None  # set by stop(): ends as cancelled
        # Called once when the generation is over (frees its concurrency slot).
        self.on_close: Callable[[], Awaitable[None]] | None = None

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

    def _scan(self, batch: list[ChatEvent]) -> list[ChatEvent]:
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
        if self._partial is not None:
            self._record(batch)
        return batch

    def _record(self, batch: list[ChatEvent]) -> None:
        """Keep the text sent so far (only when the alias allows continuation)."""
        assert self._partial is not None
        for ev in batch:
            if isinstance(ev, TextDelta):
                self._partial.append(ev.text)
            else:
                self._tools_sent = True

    def _scan_slow(self, batch: list[ChatEvent]) -> list[ChatEvent]:
        wd = self._wd
        assert wd is not None
        out: list[ChatEvent] = []
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
                if isinstance(ev, TextDelta):
                    if self._partial is not None:
                        self._partial.append(ev.text)
                else:
                    self._tools_sent = True
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
                ev.continuation = self._original is not None
                self._start = ev
            else:
                out.append(ev)
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
        trim, self._trim = self._trim, ""
        if trim and isinstance(ev, TextDelta) and ev.text.startswith(trim):
            ev = TextDelta(ev.text[len(trim) :])
            if not ev.text:
                return None
        self._got_content()
        return ev

    def end(self, reason: FinishReason) -> End:
        fo = self._fo
        ttft = self.first_token_at
        output = self.output_tokens
        if self._original is not None:  # a continued answer: both attempts' output
            output = self._carry_output + (output or 0)
        elif output is None and reason in ("cancelled", "error", "timeout") and self._deltas:
            # Cut short before the provider's count came: one token per delta.
            output = self._deltas
        # A continued answer counts the input of the attempt that finished it (its
        # prompt holds the partial answer), whatever the providers; a failed
        # continuation is reported as the first attempt (target, error, input).
        inp = self.input_tokens
        if inp is None and self._original is not None:
            inp = self._carry_input
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
        self._report(end)
        return end

    def _report(self, end: End) -> None:
        """The stream's one summary: metrics and a log line (ids and numbers, never text)."""
        fo = self._fo
        router = fo.router
        opened = self._opened
        model = router.metric_key(opened.target) if opened is not None else end.model
        endpoint = fo.request.endpoint
        m = router.metrics
        m.streams.labels(endpoint, model, end.provider, end.finish_reason).inc()
        if end.ttft_ms is not None:
            m.ttft.labels(model).observe(end.ttft_ms / 1000)
        m.duration.labels(model).observe(end.duration_ms / 1000)
        if end.input_tokens:
            m.tokens.labels(model, "input").inc(end.input_tokens)
        if end.output_tokens:
            m.tokens.labels(model, "output").inc(end.output_tokens)
        if stream_log.isEnabledFor(logging.INFO):
            stream_log.info(
                "stream %s %s",
                end.finish_reason,
                end.model,
                extra={
                    "fields": {
                        "request_id": fo.request.request_id,
                        "route": endpoint,
                        "model": end.model,
                        "provider": end.provider,
                        "outcome": end.finish_reason,
                        "ttft_ms": end.ttft_ms,
                        "duration_ms": end.duration_ms,
                        "input_tokens": end.input_tokens,
                        "output_tokens": end.output_tokens,
                        "attempts": len(end.attempts),
                    }
                },
            )

    async def events(self) -> AsyncGenerator[list[ChatEvent], None]:
        opened = self._opened
        assert opened is not None
        fo = self._fo
        loop = fo.loop
        wd = self._wd = Watchdog(opened.limits, fo.start, opened.started)
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
                wd.arm(nxt.limits, nxt.started)
        finally:
            wd.stop()
            await self.aclose()
        if failure is not None:
            if self._original is not None and failure is not self._stop:
                # A failed continuation reports the first failure, and its target.
                failure = self._original
                self.model, self.provider = self._original_target
                self.input_tokens = self._carry_input
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

    def _held(self, batch: list[ChatEvent]) -> list[ChatEvent]:
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
        partial = self._partial
        if (
            partial is None
            or self._original is not None
            or self._tools_sent
            or not failure.is_retryable
            or (isinstance(failure, UpstreamTimeout) and failure.phase == "total")
        ):
            return None, failure
        # Output tokens are rarely reported before a cut (Anthropic's count at
        # message_start is 1): text deltas stand in.
        so_far = max(len(partial), self.output_tokens or 0)
        budget = fo.request.max_tokens
        if budget is not None and so_far >= budget:
            return None, failure  # the answer had already used its max_tokens
        found = await fo.continuation("".join(partial), so_far)
        if found is None:
            return None, failure
        opened, self._trim = found
        self._original = failure
        self._original_target = (self.model, self.provider)
        self._carry_output = so_far
        self._carry_input = self.input_tokens
        return opened, failure

    async def _drain(self, it: AsyncIterator[list[ChatEvent]]) -> None:
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
        self._fo.router.active.discard(self)
        if self._wd is not None:
            self._wd.stop()
        opened = self._opened
        if opened is not None and not opened.settled:
            self._fo.settle(opened, None, cancelled=True)
        try:
            if self._it is not None:
                await close_stream(self._it)
        finally:
            # Last: freeing the slot may wait on Redis; the upstream is closed first.
            on_close, self.on_close = self.on_close, None
            if on_close is not None:
                await on_close()
