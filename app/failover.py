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
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from app.circuit import Breaker
from app.errors import (
    GatewayError,
    Overloaded,
    UpstreamAuthFailed,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamTruncated,
)
from app.events import AttemptRecord, ChatEvent
from app.providers.base import ChatRequest

if TYPE_CHECKING:
    from app.routing import Route, Router, Target


@dataclass(slots=True, frozen=True)
class Limits:
    first_token_s: float
    idle_s: float
    total_s: float


@dataclass(slots=True)
class Opened:
    """An attempt whose upstream accepted the request."""

    target: Target
    stream: AsyncIterator[list[ChatEvent]]
    first: list[ChatEvent]
    started: float  # loop time the attempt began
    limits: Limits
    record: AttemptRecord
    breaker: Breaker
    settled: bool = False


def backoff(retry: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full jitter (AWS architecture blog, "Exponential Backoff And Jitter")."""
    ceiling = min(cap, base * (2 ** max(0, retry - 1)))
    return (rng or random).uniform(0.0, ceiling)


def counts_against(exc: GatewayError) -> bool:
    """Does this failure say something about the target's health?"""
    return exc.is_retryable or isinstance(exc, UpstreamAuthFailed | UpstreamTimeout)


def _outcome(exc: GatewayError) -> tuple[str, int | None]:
    status = exc.upstream_status if isinstance(exc, UpstreamStatus) else None
    return ("timeout" if isinstance(exc, UpstreamTimeout) else "error"), status


def most_meaningful(errors: list[GatewayError]) -> GatewayError:
    """A client error explains more than a later outage; otherwise the last one."""
    for exc in errors:
        if 400 <= exc.http_status < 500 and exc.http_status not in (408, 409, 429):
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
        "records",
        "request",
        "route",
        "router",
        "settings",
        "start",
    )

    def __init__(self, router: Router, route: Route, request: ChatRequest) -> None:
        self.router = router
        self.route = route
        self.request = request
        self.settings = router.settings
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.records: list[AttemptRecord] = []
        self.errors: list[GatewayError] = []
        self._queue: list[Target] = list(route.targets)  # short: pop(0) is fine
        self._current: Target | None = None
        self._retries = 0
        self._rerouted: tuple[str, ...] = ()

    # -- the attempts ------------------------------------------------------

    async def first(self) -> Opened:
        return await self._run(None)

    async def after(self, failure: GatewayError) -> Opened:
        """The next attempt after an attempt failed before any content; raises when none."""
        return await self._run(failure)

    async def _run(self, failure: GatewayError | None) -> Opened:
        while True:
            target, delay = self._choose(failure)
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                return await self._open(target, self.request)
            except GatewayError as exc:
                failure = exc

    def _choose(self, failure: GatewayError | None) -> tuple[Target, float]:
        if failure is not None:
            self.errors.append(failure)
            current = self._current
            assert current is not None
            if isinstance(failure, UpstreamTimeout) and failure.phase == "total":
                raise most_meaningful(self.errors)
            if failure.is_retryable:
                delay = self._retry_delay(failure, current)
                if delay is not None:
                    self._retries += 1
                    self.router.metrics.retries.labels(current.name).inc()
                    return current, delay
            elif isinstance(failure, UpstreamStatus) and failure.reason is not None:
                self._reroute(failure)
            elif not self._config_fault(failure):
                raise most_meaningful(self.errors)
        return self._next_target(), 0.0

    def _retry_delay(self, failure: GatewayError, current: Target) -> float | None:
        """Seconds to wait before retrying the same target, or None to move on."""
        if isinstance(failure, UpstreamTimeout) and failure.phase != "connect":
            return None  # a silent upstream is not asked again
        if self._retries >= self.settings.max_retries:
            return None
        if self.router.circuits.get(current.name).state != "closed":
            return None  # this failure opened it: do not hammer
        s = self.settings
        if failure.retry_after is not None:
            if failure.retry_after > s.retry_after_max_s:
                return None
            delay = failure.retry_after
        else:
            delay = backoff(self._retries + 1, s.retry_backoff_s, s.retry_backoff_max_s)
        if self.loop.time() + delay >= self.start + self.router.limits(current).total_s:
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
            raise most_meaningful(self.errors)
        assert failure.reason is not None
        self._rerouted += (failure.reason,)
        self._queue = list(fallbacks)

    @staticmethod
    def _config_fault(failure: GatewayError) -> bool:
        """The gateway's own configuration failed (bad key, unknown model): try elsewhere."""
        if isinstance(failure, UpstreamAuthFailed):
            return True
        return isinstance(failure, UpstreamStatus) and failure.upstream_status == 404

    def _next_target(self) -> Target:
        circuits = self.router.circuits
        while self._queue:
            target = self._queue.pop(0)
            if circuits.get(target.name).allow():
                if self._current is not None:
                    self.router.metrics.fallbacks.labels(self._current.name, target.name).inc()
                self._current = target
                self._retries = 0
                return target
            self.records.append(AttemptRecord(target.name, "skipped", code="circuit_open"))
        if self.errors:
            raise most_meaningful(self.errors)
        wait = min(circuits.get(t.name).retry_in() for t in self.route.targets)
        raise Overloaded(
            "every target of this model is failing (circuit open); retry later",
            code="circuit_open",
            retry_after=max(1.0, wait),
        )

    async def _open(self, target: Target, request: ChatRequest) -> Opened:
        router = self.router
        limits = router.limits(target)
        breaker = router.circuits.get(target.name)
        record = AttemptRecord(target.name)
        self.records.append(record)
        router.metrics.attempts.labels(target.name).inc()
        started = self.loop.time()
        # The provider reads the request when the stream starts (below), so one
        # request object serves every attempt in turn.
        request.model = target.model
        stream = router.providers[target.provider].stream(request)
        total_at = self.start + limits.total_s
        first_at = started + limits.first_token_s
        try:
            async with asyncio.timeout_at(min(first_at, total_at)):
                first = await anext(stream)
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
            await _aclose(stream)
            self._settle(record, breaker, started, cancelled=True)
            raise
        else:
            return Opened(target, stream, first, started, limits, record, breaker)
        await _aclose(stream)
        self._settle(record, breaker, started, exc)
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
            max_tokens = max(1, max_tokens - output_so_far)
        request = replace(self.request, messages=messages, max_tokens=max_tokens, continuation=True)
        router = self.router
        while self._queue:
            target = self._queue.pop(0)
            if not router.configs[target.provider].accepts_continuation:
                continue
            if not router.circuits.get(target.name).allow():
                self.records.append(AttemptRecord(target.name, "skipped", code="circuit_open"))
                continue
            try:
                opened = await self._open(target, request)
            except GatewayError:
                continue
            self._current = target
            return opened, partial[len(stem) :]
        return None

    # -- outcomes ------------------------------------------------------------

    def _settle(
        self,
        record: AttemptRecord,
        breaker: Breaker,
        started: float,
        exc: GatewayError | None = None,
        *,
        cancelled: bool = False,
    ) -> None:
        record.duration_ms = round((self.loop.time() - started) * 1000)
        if cancelled:
            record.outcome = "cancelled"
            breaker.release()
        elif exc is None:
            record.outcome = "ok"
            breaker.success()
        else:
            record.outcome, record.status = _outcome(exc)
            record.code = exc.code
            if counts_against(exc):
                breaker.failure()
            else:
                breaker.release()

    def succeeded(self, opened: Opened) -> None:
        """The attempt delivered content: its target is healthy."""
        opened.breaker.success()

    def settle(self, opened: Opened, exc: GatewayError | None, *, cancelled: bool = False) -> None:
        if not opened.settled:
            opened.settled = True
            self._settle(opened.record, opened.breaker, opened.started, exc, cancelled=cancelled)


async def _aclose(stream: AsyncIterator[list[ChatEvent]]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
