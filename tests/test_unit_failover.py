"""``app.failover``: which attempt comes next after which failure, over scripted providers.

Each test drives ``Failover.first()`` (and ``after()`` as the relay does)
against ``tests.units.Scripted`` upstreams; what happened is read from the
providers' ``seen`` requests, the attempt records and the observer.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from app.errors import (
    GatewayError,
    Overloaded,
    RejectReason,
    UpstreamAuthFailed,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamTruncated,
    UpstreamUnavailable,
)
from app.events import Start
from app.failover import Failover, Opened, backoff, close_stream
from tests.units import HANG, ManualClock, Sleep, World, answer, until


def status(
    upstream: int,
    *,
    code: str | None = None,
    retry_after: float | None = None,
    reason: RejectReason | None = None,
) -> UpstreamStatus:
    return UpstreamStatus(
        f"upstream said {upstream}",
        upstream_status=upstream,
        code=code,
        retry_after=retry_after,
        reason=reason,
    )


def outcomes(fo: Failover) -> list[tuple[str, str, int | None]]:
    return [(r.target, r.outcome, r.status) for r in fo.records]


async def succeed(fo: Failover, opened: Opened) -> None:
    """What the relay does with an attempt that ended well: settle it and close its stream."""
    fo.settle(opened, None)
    await close_stream(opened.stream)


async def test_retries_a_5xx_and_a_connect_error_on_the_same_target_after_a_backoff() -> None:
    w = World(retry_backoff_s=0.02, retry_backoff_max_s=0.08)
    w.p.script("a", [status(503)], [UpstreamUnavailable("connect failed")], answer("ok"))
    fo = w.failover("duo")
    state = random.getstate()
    random.seed(1234)  # full jitter from the module's random: the same draws as Random(1234)
    try:
        began = fo.loop.time()
        opened = await fo.first()
        waited = fo.loop.time() - began
    finally:
        random.setstate(state)
    rng = random.Random(1234)
    expected = backoff(1, 0.02, 0.08, rng) + backoff(2, 0.02, 0.08, rng)
    assert expected <= waited + 0.002 < expected + 0.5
    assert opened.target.name == "p/a" and w.p.calls("a") == 3 and w.q.calls("x") == 0
    assert outcomes(fo) == [("p/a", "error", 503), ("p/a", "error", None), ("p/a", "ok", None)]
    assert w.observer.log == [
        ("attempt", "p/a"),
        ("retry", "p/a"),
        ("attempt", "p/a"),
        ("retry", "p/a"),
        ("attempt", "p/a"),
    ]
    await succeed(fo, opened)
    assert w.live == 0 and w.breaker_of("p/a").failures == 0  # success resets the count


async def test_after_max_retries_it_moves_to_the_next_target() -> None:
    w = World(max_retries=1)
    w.p.script("a", [status(500)], [status(502)])
    w.q.script("x", answer("ok"))
    fo = w.failover("duo")
    opened = await fo.first()
    assert opened.target.name == "q/x" and w.p.calls("a") == 2
    assert ("fallback", "p/a", "q/x") in w.observer.log
    await succeed(fo, opened)


async def test_an_upstream_retry_after_is_waited_out() -> None:
    w = World()
    w.p.script("a", [status(429, retry_after=0.06)], answer("ok"))
    fo = w.failover("duo")
    opened = await fo.first()
    assert opened.target.name == "p/a"
    assert fo.loop.time() - fo.start >= 0.06 - 0.002
    assert w.observer.of("retry") == [("retry", "p/a")]
    await succeed(fo, opened)


async def test_a_retry_after_over_the_maximum_moves_on_at_once() -> None:
    w = World(retry_after_max_s=1.0, total_timeout_s=600)  # the budget would allow the wait
    w.p.script("a", [status(429, retry_after=30)])
    w.q.script("x", answer("ok"))
    fo = w.failover("duo")
    async with asyncio.timeout(2):
        opened = await fo.first()
    assert opened.target.name == "q/x" and fo.loop.time() - fo.start < 0.5
    assert w.observer.of("retry") == [] and ("fallback", "p/a", "q/x") in w.observer.log
    await succeed(fo, opened)


async def test_a_retry_that_would_outlast_the_total_timeout_moves_on() -> None:
    w = World(total_timeout_s=0.5)
    w.p.script("a", [status(503, retry_after=0.6)])  # under retry_after_max_s, over the budget
    w.q.script("x", answer("ok"))
    fo = w.failover("duo")
    opened = await fo.first()
    assert opened.target.name == "q/x" and fo.loop.time() - fo.start < 0.4
    await succeed(fo, opened)


async def test_a_silent_upstream_moves_to_the_next_target_and_is_never_asked_again() -> None:
    w = World(first_token_timeout_s=0.05, max_retries=2)
    w.p.script("a", [HANG])
    w.q.script("x", [[Start()], HANG])  # x: accepted, then silent
    fo = w.failover("duo")
    opened = await fo.first()
    assert opened.target.name == "q/x"
    assert w.p.calls("a") == 1  # a timeout is not retried
    assert fo.records[0].outcome == "timeout" and fo.records[0].code == "timeout"
    assert w.p.live == 0  # the silent attempt's stream was closed
    fo.settle(opened, UpstreamTimeout("silent", phase="first_token"))
    await close_stream(opened.stream)
    # The relay reports the second silence: nothing is left (a is never tried again).
    with pytest.raises(UpstreamTimeout) as caught:
        await fo.after(UpstreamTimeout("silent", phase="first_token"))
    assert caught.value.http_status == 504
    assert w.p.calls("a") == 1 and w.q.calls("x") == 1 and w.live == 0


async def test_a_400_is_final() -> None:
    w = World()
    w.p.script("a", [status(503)], [status(400)])
    fo = w.failover("trio")
    with pytest.raises(UpstreamStatus) as caught:
        await fo.first()
    assert caught.value.upstream_status == 400
    assert w.p.calls("b") == 0 and w.q.calls("x") == 0  # nothing after the 400
    assert caught.value.headers() == {}  # a client error says nothing about retrying


async def test_a_400_beats_a_later_outage() -> None:
    """Rerouted after a context-length 400, every fallback is down: the client is told
    about its prompt, which it can fix, not about the outage."""
    w = World(max_retries=1)
    too_long = status(400, code="context_length_exceeded", reason="context_length")
    w.p.script("a", [too_long])
    w.q.script("y", [status(503)], [status(503)])
    fo = w.failover("big")
    with pytest.raises(UpstreamStatus) as caught:
        await fo.first()
    assert caught.value is too_long
    assert w.q.calls("y") == 2 and w.p.calls("b") == 0


async def test_a_404_or_a_refused_gateway_key_moves_on_without_retrying() -> None:
    w = World()
    w.p.script("a", [status(404)])
    w.p.script("b", [UpstreamAuthFailed("the provider refused the gateway's key")])
    w.q.script("x", answer("ok"))
    fo = w.failover("trio")
    opened = await fo.first()
    assert opened.target.name == "q/x"
    assert (w.p.calls("a"), w.p.calls("b")) == (1, 1) and w.observer.of("retry") == []
    # The gateway's own configuration is not the target's health.
    assert w.breaker_of("p/a").failures == 0 and w.breaker_of("p/b").failures == 0
    await succeed(fo, opened)


async def test_when_every_target_is_misconfigured_the_last_failure_is_told() -> None:
    w = World()
    w.p.script("a", [status(404)])
    refused = UpstreamAuthFailed("the provider refused the gateway's key")
    w.q.script("x", [refused])
    with pytest.raises(UpstreamAuthFailed) as caught:
        await w.failover("duo").first()
    assert caught.value is refused


async def test_a_context_length_rejection_goes_to_the_aliases_context_fallbacks() -> None:
    w = World()
    w.p.script("a", [status(400, reason="context_length")])
    w.q.script("y", answer("ok"))
    fo = w.failover("big")
    opened = await fo.first()
    assert opened.target.name == "q/y" and w.p.calls("b") == 0  # instead of the remaining
    assert ("fallback", "p/a", "q/y") in w.observer.log
    await succeed(fo, opened)


async def test_a_content_policy_rejection_goes_to_the_aliases_policy_fallbacks() -> None:
    w = World()
    w.p.script("a", [status(400, reason="content_policy")])
    w.q.script("x", answer("ok"))
    fo = w.failover("big")
    opened = await fo.first()
    assert opened.target.name == "q/x" and w.q.calls("y") == 0
    await succeed(fo, opened)


async def test_a_rejection_is_rerouted_once_and_final_without_fallbacks() -> None:
    w = World()
    first = status(400, reason="context_length")
    w.p.script("a", [first])
    w.q.script("y", [status(400, reason="context_length")])
    with pytest.raises(UpstreamStatus) as caught:
        await w.failover("big").first()
    # Not rerouted to the same fallbacks again; the first rejection is told.
    assert caught.value is first
    assert w.q.calls("y") == 1 and w.p.calls("b") == 0
    # Without fallbacks (an alias without them): final, its reason kept.
    w2 = World()
    refused = status(400, code="content_policy_violation", reason="content_policy")
    w2.p.script("a", [refused])
    with pytest.raises(UpstreamStatus) as caught:
        await w2.failover("trio").first()
    assert caught.value is refused and caught.value.reason == "content_policy"
    assert w2.p.calls("b") == 0


async def test_an_open_circuit_is_skipped_and_recorded() -> None:
    clock = ManualClock()
    w = World(clock=clock, circuit_failure_threshold=1)
    w.breaker_of("p/a").failure()
    w.q.script("x", answer("ok"))
    fo = w.failover("duo")
    opened = await fo.first()
    assert opened.target.name == "q/x" and w.p.calls("a") == 0
    skipped = fo.records[0]
    assert (skipped.target, skipped.outcome, skipped.code) == ("p/a", "skipped", "circuit_open")
    await succeed(fo, opened)


async def test_all_circuits_open_is_a_503_that_says_when_to_come_back() -> None:
    clock = ManualClock()
    w = World(clock=clock, circuit_failure_threshold=1, circuit_cooldown_s=30)
    w.breaker_of("p/a").failure()
    clock.advance(5)
    w.breaker_of("q/x").failure()
    clock.advance(5)  # a: 20 s of cool-down left, x: 25 s
    fo = w.failover("duo")
    with pytest.raises(Overloaded) as caught:
        await fo.first()
    exc = caught.value
    assert exc.http_status == 503 and exc.code == "circuit_open"
    assert exc.headers() == {"Retry-After": "20"}
    assert [r.outcome for r in fo.records] == ["skipped", "skipped"]
    assert w.p.seen == [] and w.q.seen == []


async def test_after_the_cool_down_one_request_probes_and_the_others_skip() -> None:
    clock = ManualClock()
    w = World(clock=clock, circuit_failure_threshold=1, circuit_cooldown_s=30)
    w.breaker_of("p/a").failure()
    clock.advance(30)
    w.p.script("a", answer("ok"))
    w.q.script("x", answer("ok"))
    probing = w.failover("duo")
    probe = await probing.first()
    assert probe.target.name == "p/a" and probe.probe
    other = w.failover("duo")
    opened = await other.first()  # the probe is out: a is skipped meanwhile
    assert opened.target.name == "q/x" and other.records[0].outcome == "skipped"
    await succeed(probing, probe)
    await succeed(other, opened)
    assert w.breaker_of("p/a").state == "closed"


async def test_the_total_timeout_is_final() -> None:
    w = World(total_timeout_s=0.1, first_token_timeout_s=1.0)
    w.p.script("a", [HANG])
    fo = w.failover("duo")
    with pytest.raises(UpstreamTimeout) as caught:
        await fo.first()
    assert caught.value.phase == "total" and caught.value.http_status == 504
    assert w.q.seen == [] and w.live == 0
    # The request's own budget says nothing about the target's health.
    assert w.breaker_of("p/a").failures == 0


async def test_a_failure_after_the_start_is_reported_back_and_failed_over() -> None:
    """What the relay does when an accepted attempt breaks before any content."""
    w = World(max_retries=0)
    w.p.script("a", [[Start()], HANG])
    w.q.script("x", answer("ok"))
    fo = w.failover("duo")
    first = await fo.first()
    cut = UpstreamTruncated("cut")
    fo.settle(first, cut)
    await close_stream(first.stream)
    second = await fo.after(cut)
    assert second.target.name == "q/x"
    assert outcomes(fo) == [("p/a", "error", None), ("q/x", "ok", None)]
    await succeed(fo, second)
    assert w.live == 0


async def test_settle_counts_only_upstream_health() -> None:
    w = World(circuit_failure_threshold=1)
    w.p.script("a", [status(400)])
    with pytest.raises(UpstreamStatus):
        await w.failover("duo").first()
    assert w.breaker_of("p/a").state == "closed" and w.breaker_of("p/a").failures == 0
    w.p.script("a", [status(503)])
    w.q.script("x", answer("ok"))
    fo = w.failover("duo")
    opened = await fo.first()
    assert w.breaker_of("p/a").state == "open"  # a 5xx is the target's health
    assert opened.target.name == "q/x" and w.p.calls("a") == 2  # no retry into an open circuit
    await succeed(fo, opened)
    fo.settle(opened, status(503))  # settled once: a later verdict changes nothing
    assert w.breaker_of("q/x").failures == 0


async def test_a_400_from_the_probe_frees_the_probe_slot() -> None:
    clock = ManualClock()
    w = World(clock=clock, circuit_failure_threshold=1)
    w.breaker_of("p/a").failure()
    clock.advance(60)
    w.p.script("a", [status(400)])
    with pytest.raises(UpstreamStatus):
        await w.failover("duo").first()
    breaker = w.breaker_of("p/a")
    assert breaker.state == "half_open" and breaker.admit() == "probe"


async def test_a_cancelled_attempt_releases_its_probe() -> None:
    clock = ManualClock()
    w = World(clock=clock, circuit_failure_threshold=1)
    breaker = w.breaker_of("p/a")
    breaker.failure()
    clock.advance(60)
    w.p.script("a", [Sleep(30)])  # the probe's upstream takes its time
    fo = w.failover("duo")
    task = asyncio.create_task(fo.first())
    await until(lambda: w.p.live == 1)
    assert breaker.probing
    task.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fo.records[0].outcome == "cancelled" and w.live == 0
    assert breaker.failures == 1 and breaker.admit() == "probe"  # no verdict, slot free


async def test_a_final_503_without_retry_after_gets_the_gateways_estimate() -> None:
    w = World(max_retries=0, retry_backoff_s=1.5, retry_backoff_max_s=4.0)
    w.p.script("a", [status(503)])
    w.q.script("x", [status(503)])
    with pytest.raises(GatewayError) as caught:
        await w.failover("duo").first()
    assert caught.value.http_status == 503
    # The ceiling of its own next backoff: min(4.0, 1.5 * 2**1).
    assert caught.value.headers() == {"Retry-After": "3"}
