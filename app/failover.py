"""Which upstream attempt comes next, after which failure.

One ``Failover`` serves one request. It opens attempts on the request's
targets in order and decides, after each failure, whether to retry the same
target, move on, or give up:

============================================  ==========================================
failure                                        next
============================================  ==========================================
connect error, reset, cut before any content,  the same target again, up to
408, 409, 429, 5xx, in-band overload           ``max_retries`` times, after a backoff
                                               with full jitter or the upstream's
                                               Retry-After (up to ``retry_after_max_s``;
                                               a longer one moves on); then the next
no first token in time (a silent upstream)     the next target (never the same again)
the provider refused the gateway's key, or     the next target (the client cannot fix it)
does not know the model
prompt too long for the model                  the alias's ``context_window_fallbacks``
                                               instead of the remaining targets, if set
content-policy rejection                       the alias's ``content_policy_fallbacks``,
                                               if set; else final, reason kept
any other 4xx                                  final: it explains the problem
total timeout spent                            final
============================================  ==========================================

A target whose circuit is open is skipped (recorded as ``skipped``). When
nothing is left, the most meaningful error is raised: a client error (a 400
that explains the problem) beats any later outage.

Attempts are opened until their first batch (the upstream accepted); an
attempt that fails later but before any content reached the client comes back
through ``after()`` from the relay, so a cut or a silent upstream after the
headers still fails over without the client seeing it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Protocol

from app.circuit import Breaker
from app.config import Settings
from app.errors import (
    GatewayError,
    Overloaded,
    UpstreamAuthFailed,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamTruncated,
)
from app.events import AttemptRecord, End, ProviderEvent
from app.requests import ChatRequest
from app.routing import Route, Target
from app.upstreams import Timeouts, Upstreams

log = logging.getLogger("app.failover")


class Observer(Protocol):
    """What failover and the relay report as they go (metrics, the stream log line);
    handed down by the dispatcher, so that neither reaches up for it."""

    def attempt(self, target: Target) -> None: ...

    def retry(self, target: Target) -> None: ...

    def fallback(self, source: Target, target: Target) -> None: ...

    def ended(self, end: End, request: ChatRequest, target: Target | None) -> None: ...


@dataclass(slots=True)
class Opened:
    """An attempt whose upstream accepted the request."""

    target: Target
    stream: AsyncIterator[list[ProviderEvent]]
    first: list[ProviderEvent]
    started: float  # loop time the attempt began
    timeouts: Timeouts
    record: AttemptRecord
    breaker: Breaker
    probe: bool  # it holds its half-open circuit's one probe slot
    settled: bool = False


def backoff(retry: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full jitter (AWS architecture blog, "Exponential Backoff And Jitter")."""
    ceiling = min(cap, base * (2 ** max(0, retry - 1)))
    return (rng or random).uniform(0.0, ceiling)


def counts_against(exc: GatewayError) -> bool:
    """Does this failure say something about the target's health?

    Connect errors, resets, cuts, 408/409/429/5xx and timeouts do. A request's
    total timeout does not (its budget ran out), nor does anything the
    upstream rightly refused: an unknown model (404), a 400, a content-policy
    refusal, the gateway's own key (a setting to fix, not an outage).
    """
    if isinstance(exc, UpstreamTimeout):
        return exc.phase != "total"
    return exc.is_retryable


def _config_fault(exc: GatewayError) -> bool:
    """The gateway's own configuration failed (bad key, unknown model): try elsewhere."""
    if isinstance(exc, UpstreamAuthFailed):
        return True
    return isinstance(exc, UpstreamStatus) and exc.upstream_status == 404


def _rejects_prefill(exc: GatewayError) -> bool:
    """A refusal of the continuation request itself (a 4xx that is not about the gateway's
    key, the model's existence or a rate limit)."""
    if not isinstance(exc, UpstreamStatus):
        return False
    status = exc.upstream_status
    return 400 <= status < 500 and status not in (401, 403, 404, 408, 409, 429)


def _outcome(exc: GatewayError) -> tuple[str, int | None]:
    status = exc.upstream_status if isinstance(exc, UpstreamStatus) else None
    return ("timeout" if isinstance(exc, UpstreamTimeout) else "error"), status


def most_meaningful(errors: list[GatewayError]) -> GatewayError:
    """What the client is told when every attempt failed.

    A client error that explains the problem (a 400) beats any outage; then a
    rate limit that says when to come back; otherwise the last failure. A 404
    from a provider is the gateway's configuration, not the client's request.
    """
    for exc in errors:
        status = exc.http_status
        if 400 <= status < 500 and status not in (408, 409, 429) and not _config_fault(exc):
            return exc
    for exc in errors:
        if exc.http_status == 429 and exc.retry_after is not None:
            return exc
    return errors[-1]


class Failover:
    __slots__ = (
        "_current",
        "_queue",
        "_rerouted",
        "_retries",
        "errors",
        "loop",
        "observer",
        "records",
        "request",
        "route",
        "settings",
        "start",
        "upstreams",
    )

    def __init__(
        self,
        upstreams: Upstreams,
        route: Route,
        request: ChatRequest,
        observer: Observer,
        settings: Settings,
    ) -> None:
        self.upstreams = upstreams
        self.route = route
        self.request = request
        self.observer = observer
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.records: list[AttemptRecord] = []
        self.errors: list[GatewayError] = []
        self._queue: list[Target] = list(route.targets)  # short: pop(0) is fine
        self._current: Target | None = None
        self._retries = 0
        self._rerouted: tuple[str, ...] = ()

    def _final(self) -> GatewayError:
        """The error the client gets; a 429 or 503 always says when to come back.

        When the upstream gave no Retry-After, the gateway's estimate is the
        ceiling of its own next backoff (at least a second).
        """
        exc = most_meaningful(self.errors)
        if exc.retry_after is None and exc.http_status in (429, 503):
            s = self.settings
            exc.retry_after = max(
                1.0, min(s.retry_backoff_max_s, s.retry_backoff_s * 2 ** (self._retries + 1))
            )
        return exc

    # -- the attempts ------------------------------------------------------

    async def first(self) -> Opened:
        return await self._run(None)

    async def after(self, failure: GatewayError) -> Opened:
        """The next attempt after an attempt failed before any content; raises when none."""
        return await self._run(failure)

    async def _run(self, failure: GatewayError | None) -> Opened:
        while True:
            target, delay, probe = self._choose(failure)
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                return await self._open(target, self.request, probe)
            except GatewayError as exc:
                failure = exc

    def _choose(self, failure: GatewayError | None) -> tuple[Target, float, bool]:
        """(target, seconds to wait first, whether it is its circuit's probe)."""
        if failure is not None:
            self.errors.append(failure)
            current = self._current
            assert current is not None
            if isinstance(failure, UpstreamTimeout) and failure.phase == "total":
                raise self._final()
            if failure.is_retryable:
                delay = self._retry_delay(failure, current)
                if delay is not None:
                    self._retries += 1
                    self.observer.retry(current)
                    return current, delay, False
            elif isinstance(failure, UpstreamStatus) and failure.reason is not None:
                self._reroute(failure)
            elif not _config_fault(failure):
                raise self._final()
        return self._next_target()

    def _retry_delay(self, failure: GatewayError, current: Target) -> float | None:
        """Seconds to wait before retrying the same target, or None to move on."""
        if isinstance(failure, UpstreamTimeout) and failure.phase != "connect":
            return None  # a silent upstream is not asked again
        if self._retries >= self.settings.max_retries:
            return None
        if self.upstreams.breaker(current).state != "closed":
            return None  # this failure opened it (or it was the probe): do not hammer
        s = self.settings
        if failure.retry_after is not None:
            if failure.retry_after > s.retry_after_max_s:
                return None
            delay = failure.retry_after
        else:
            delay = backoff(self._retries + 1, s.retry_backoff_s, s.retry_backoff_max_s)
        if self.loop.time() + delay >= self.start + self.upstreams.timeouts(current).total_s:
            return None
        return delay

    def _reroute(self, failure: UpstreamStatus) -> None:
        """Context-length and content-policy rejections go to the alias's own fallbacks."""
        route = self.route
        fallbacks = (
            route.context_window_fallbacks
            if failure.reason == "context_length"
            else route.content_policy_fallbacks
        )
        if not fallbacks or failure.reason in self._rerouted:
            raise self._final()
        assert failure.reason is not None
        self._rerouted += (failure.reason,)
        self._queue = list(fallbacks)

    def _admit(self, target: Target) -> bool | None:
        """None: its circuit is open (recorded as skipped); else whether it is the probe."""
        admission = self.upstreams.breaker(target).admit()
        if admission == "no":
            self.records.append(AttemptRecord(target.name, "skipped", code="circuit_open"))
            return None
        return admission == "probe"

    def _next_target(self) -> tuple[Target, float, bool]:
        while self._queue:
            target = self._queue.pop(0)
            probe = self._admit(target)
            if probe is None:
                continue
            if self._current is not None:
                self.observer.fallback(self._current, target)
            self._current = target
            self._retries = 0
            return target, 0.0, probe
        if self.errors:
            raise self._final()
        wait = min(self.upstreams.breaker(t).retry_in() for t in self.route.targets)
        raise Overloaded(
            "every target of this model is failing (circuit open); retry later",
            code="circuit_open",
            retry_after=max(1.0, wait),
        )

    async def _open(self, target: Target, request: ChatRequest, probe: bool) -> Opened:
        upstreams = self.upstreams
        timeouts = upstreams.timeouts(target)
        breaker = upstreams.breaker(target)
        record = AttemptRecord(target.name)
        self.records.append(record)
        self.observer.attempt(target)
        started = self.loop.time()
        # The provider reads the request when the stream starts (below), so one
        # request object serves every attempt in turn.
        request.model = target.model
        stream = upstreams.provider(target).stream(request)
        opened = Opened(target, stream, [], started, timeouts, record, breaker, probe)
        total_at = self.start + timeouts.total_s
        first_at = started + timeouts.first_token_s
        try:
            async with asyncio.timeout_at(min(first_at, total_at)):
                opened.first = await anext(stream)
        except TimeoutError:
            if first_at < total_at:
                exc: GatewayError = UpstreamTimeout(
                    f"provider '{target.provider}': no answer within the first-token timeout",
                    phase="first_token",
                )
            else:
                exc = UpstreamTimeout(
                    f"provider '{target.provider}': the request exceeded the total timeout",
                    phase="total",
                )
        except StopAsyncIteration:
            exc = UpstreamTruncated(
                f"provider '{target.provider}' closed the stream before it started",
                code="upstream_truncated",
            )
        except GatewayError as e:
            exc = e
        except BaseException:
            await close_stream(stream)
            self.settle(opened, None, cancelled=True)
            raise
        else:
            return opened
        await close_stream(stream)
        self.settle(opened, exc)
        raise exc

    async def continuation(self, partial: str, output_so_far: int) -> tuple[Opened, str] | None:
        """An attempt that continues ``partial`` on a later target that accepts it.

        Returns it with the trailing whitespace that was cut off the partial
        (providers reject an assistant turn ending in whitespace), which the
        relay drops from the continuation's first text if it repeats it.
        """
        stem = partial.rstrip()
        if not self.route.continue_on_failure or not stem:
            return None
        messages = [*self.request.messages, {"role": "assistant", "content": stem}]
        max_tokens = self.request.max_tokens
        if max_tokens is not None:
            max_tokens -= output_so_far  # > 0: the relay checked
        request = replace(self.request, messages=messages, max_tokens=max_tokens, continuation=True)
        upstreams = self.upstreams
        while self._queue:
            target = self._queue.pop(0)
            if not upstreams.accepts_continuation(self.route, target):
                continue
            probe = self._admit(target)
            if probe is None:
                continue
            try:
                opened = await self._open(target, request, probe)
            except GatewayError as exc:
                if _rejects_prefill(exc):
                    # Not asked again: the next broken answer goes elsewhere at once.
                    upstreams.breaker(target).rejects_continuation = True
                    log.info("target %s rejected a continuation; not asked again", target.name)
                continue
            self._current = target
            return opened, partial[len(stem) :]
        return None

    # -- outcomes ------------------------------------------------------------

    def settle(self, opened: Opened, exc: GatewayError | None, *, cancelled: bool = False) -> None:
        """Record how an attempt ended, once, in the end event and its circuit."""
        if opened.settled:
            return
        opened.settled = True
        record, breaker = opened.record, opened.breaker
        record.duration_ms = round((self.loop.time() - opened.started) * 1000)
        if cancelled:
            record.outcome = "cancelled"
            breaker.release(opened.probe)
        elif exc is None:
            record.outcome = "ok"
            breaker.success()
        else:
            record.outcome, record.status = _outcome(exc)
            record.code = exc.code
            if counts_against(exc):
                breaker.failure()
            else:
                breaker.release(opened.probe)


async def close_stream(stream: AsyncIterator[list[ProviderEvent]]) -> None:
    """Close a provider stream (releases its upstream connection)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
