"""The pure parts of resilience: backoff, the breaker's states, classifying rejections."""

from __future__ import annotations

import random

import pytest

from app.circuit import Breaker
from app.failover import backoff
from app.providers.errors import map_status, reject_reason


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
        assert b.allow()
    b.success()  # consecutive failures only
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow()
    clock.now += 9.9
    assert not b.allow() and 0 < b.retry_in() <= 0.1
    clock.now += 0.2
    assert b.allow()  # the probe
    assert b.state == "half_open" and not b.allow()  # one at a time
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_a_failed_probe_reopens_and_an_abandoned_one_frees_the_slot():
    clock = Clock()
    b = Breaker(threshold=1, cooldown_s=5, clock=clock)
    b.failure()
    clock.now += 5
    assert b.allow()
    b.release()  # the client left: another request may probe
    assert b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    assert b.opened_count == 2


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
