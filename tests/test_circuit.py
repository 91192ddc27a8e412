"""The pure parts of resilience: backoff, the breaker's states, classifying rejections."""

from __future__ import annotations

import asyncio
import random

import pytest

from app.circuit import Breaker
from app.errors import UpstreamStatus, UpstreamTimeout
from app.failover import backoff, counts_against, most_meaningful
from app.providers.errors import map_status, reject_reason
from app.relay.watchdog import Watchdog
from app.upstreams import Timeouts


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_is_full_jitter_under_an_exponential_ceiling():
    rng = random.Random(7)
    for retry, ceiling in [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (8, 4.0)]:
        waits = [backoff(retry, 0.25, 4.0, rng) for _ in range(2000)]
        assert min(waits) >= 0 and max(waits) <= ceiling
        # Spread over the whole range, not bunched at the top.
        assert min(waits) < ceiling * 0.05 and max(waits) > ceiling * 0.95


def test_breaker_opens_after_n_failures_and_probes_once_after_the_cool_down():
    clock = Clock()
    b = Breaker(threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        b.failure()
        assert b.admit() == "yes"
    b.success()  # consecutive failures only
    for _ in range(3):
        assert b.admit() == "yes"
        b.failure()
    assert b.state == "open" and b.admit() == "no"
    clock.now += 9.9
    assert b.admit() == "no" and 0 < b.retry_in() <= 0.1
    clock.now += 0.2
    assert b.admit() == "probe"
    assert b.state == "half_open" and b.admit() == "no"  # one at a time
    b.success()
    assert b.state == "closed" and b.admit() == "yes"


def test_a_failed_probe_reopens_and_only_the_probe_frees_its_slot():
    clock = Clock()
    b = Breaker(threshold=1, cooldown_s=5, clock=clock)
    b.failure()
    clock.now += 5
    assert b.admit() == "probe"
    b.release(probe=False)  # an older request without a verdict: the probe still runs
    assert b.admit() == "no"
    b.release(probe=True)  # the probe's client left: another request may probe
    assert b.admit() == "probe"
    b.failure()
    assert b.state == "open" and b.admit() == "no"
    assert b.opened_count == 2


def test_most_meaningful_error():
    bad_param = UpstreamStatus("temperature: must be <= 1", upstream_status=400)
    no_model = UpstreamStatus("The model does not exist.", upstream_status=404)
    limited = UpstreamStatus("slow down", upstream_status=429, retry_after=3600)
    down = UpstreamStatus("overloaded", upstream_status=503)
    assert most_meaningful([down, bad_param, down]) is bad_param
    # A provider's 404 is the gateway's configuration, not the client's request.
    assert most_meaningful([no_model, bad_param]) is bad_param
    assert most_meaningful([no_model, down]) is down
    # A rate limit that says when to come back beats a later outage.
    assert most_meaningful([limited, down]) is limited
    assert most_meaningful([down, UpstreamTimeout("slow", phase="first_token")]).status == 504


def test_total_timeouts_do_not_count_against_a_target():
    assert not counts_against(UpstreamTimeout("budget spent", phase="total"))
    assert counts_against(UpstreamTimeout("silent", phase="first_token"))
    assert counts_against(UpstreamStatus("x", upstream_status=503))
    assert not counts_against(UpstreamStatus("x", upstream_status=400))


@pytest.mark.parametrize(
    ("status", "code", "message", "reason"),
    [
        (400, "context_length_exceeded", "too long", "context_length"),
        (400, None, "This model's maximum context length is 4096 tokens.", "context_length"),
        (400, None, "prompt is too long: 208310 tokens > 200000 maximum", "context_length"),
        (400, "content_policy_violation", "rejected", "content_policy"),
        (400, "content_filter", "The response was filtered", "content_policy"),
        (400, None, "Invalid value for temperature", None),
        (429, None, "maximum context length", None),  # rate limits are never rejections
        (500, None, "maximum context length", None),
    ],
)
def test_rejections_are_recognised_across_providers(status, code, message, reason):
    assert reject_reason(status, code, message)[0] == reason


def test_a_context_rejection_gets_the_uniform_code():
    exc = map_status(
        400,
        b'{"type":"error","error":{"type":"invalid_request_error",'
        b'"message":"prompt is too long: 9 tokens > 8 maximum"}}',
        None,
        "anthropic",
    )
    assert exc.code == "context_length_exceeded" and exc.http_status == 400


async def test_a_deadline_and_a_client_cancel_together_still_cancel():
    """The watchdog undoes only its own cancel(), once; someone else's stands."""
    loop = asyncio.get_running_loop()
    wd = Watchdog(Timeouts(first_token_s=0.01, idle_s=1, total_s=5), loop.time(), loop.time())
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)  # the first-token deadline cancels us
    assert wd.take_expiry() == "first_token" and task.cancelling() == 0

    wd.arm(Timeouts(first_token_s=0.01, idle_s=1, total_s=5), loop.time())
    loop.call_at(wd._handle.when(), task.cancel)  # the client leaves at the same moment
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)
    assert wd.take_expiry() is None  # not ours alone: let it propagate
    assert wd.take_expiry() is None and task.cancelling() == 1  # and undone only once
    task.uncancel()
    wd.stop()


def test_the_table_keeps_the_most_recently_used_targets():
    from app.circuit import Circuits

    clock = Clock()
    table = Circuits(threshold=1, cooldown_s=5, clock=clock, max_targets=3)
    a = table.get("p/a")
    a.failure()
    table.get("p/b")
    table.get("p/c")
    assert table.get("p/a") is a  # used again: now the most recent
    table.get("p/d")  # evicts b, the least recently used
    assert list(table.breakers) == ["p/c", "p/a", "p/d"] and table.evicted == 1
    assert table.get("p/a").state == "open" and table.get("p/b").state == "closed"
    # Each target its own breaker: a's failure is nobody else's.
    assert all(table.get(t).state == "closed" for t in ("p/c", "p/d"))


def test_only_upstream_health_counts_against_a_circuit():
    from app.errors import UpstreamAuthFailed, UpstreamTruncated

    assert counts_against(UpstreamStatus("x", upstream_status=503))
    assert counts_against(UpstreamStatus("x", upstream_status=429))
    assert counts_against(UpstreamTimeout("x", phase="idle"))
    assert counts_against(UpstreamTruncated("x"))
    assert not counts_against(UpstreamTimeout("x", phase="total"))
    assert not counts_against(UpstreamStatus("x", upstream_status=404))
    assert not counts_against(UpstreamStatus("x", upstream_status=400, reason="content_policy"))
    assert not counts_against(UpstreamAuthFailed("x"))
