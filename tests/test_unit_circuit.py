"""``app.circuit``: breakers and their bounded table, on an injected clock (no waiting)."""

from __future__ import annotations

from app.circuit import Breaker, Circuits
from app.routing import Target
from tests.units import ManualClock, World


def test_it_opens_after_n_consecutive_failures() -> None:
    clock = ManualClock()
    b = Breaker(threshold=3, cooldown_s=10, clock=clock)
    b.failure()
    b.failure()
    b.success()  # consecutive only
    for _ in range(2):
        b.failure()
        assert b.state == "closed" and b.admit() == "yes"
    b.failure()
    assert b.state == "open" and b.admit() == "no" and b.opened_count == 1
    assert b.snapshot() == {"state": "open", "consecutive_failures": 3, "retry_in_s": 10.0}


def test_the_cool_down_runs_on_the_clock_it_was_given() -> None:
    clock = ManualClock()
    b = Breaker(threshold=1, cooldown_s=30, clock=clock)
    b.failure()
    clock.advance(29.5)
    assert b.admit() == "no" and b.retry_in() == 0.5
    clock.advance(0.5)
    assert b.retry_in() == 0.0 and b.admit() == "probe"


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    clock = ManualClock()
    b = Breaker(threshold=2, cooldown_s=5, clock=clock)
    b.failure()
    b.failure()
    clock.advance(5)
    assert b.admit() == "probe" and b.state == "half_open"
    assert [b.admit() for _ in range(3)] == ["no", "no", "no"]  # the others keep skipping
    b.success()
    assert (b.state, b.failures, b.admit()) == ("closed", 0, "yes")


def test_a_failed_probe_reopens_for_a_full_cool_down() -> None:
    clock = ManualClock()
    b = Breaker(threshold=5, cooldown_s=5, clock=clock)
    for _ in range(5):
        b.failure()
    clock.advance(6)
    assert b.admit() == "probe"
    b.failure()  # one failure in half-open is enough, whatever the threshold
    assert b.state == "open" and b.opened_count == 2
    assert b.admit() == "no" and b.retry_in() == 5.0
    clock.advance(5)
    assert b.admit() == "probe"


def test_a_probe_without_a_verdict_frees_its_slot_and_only_the_probe_does() -> None:
    clock = ManualClock()
    b = Breaker(threshold=1, cooldown_s=5, clock=clock)
    b.failure()
    clock.advance(5)
    assert b.admit() == "probe"
    b.release(probe=False)  # another request's (not the probe's) client left
    assert b.admit() == "no"
    b.release(probe=True)
    assert b.state == "half_open" and b.admit() == "probe"


def test_the_table_makes_one_breaker_per_target_with_the_clock_given() -> None:
    clock = ManualClock()
    table = Circuits(threshold=1, cooldown_s=10, clock=clock, max_targets=16)
    a = table.get("p/a")
    assert table.get("p/a") is a and table.get("p/b") is not a
    a.failure()
    assert table.get("p/b").state == "closed"  # one failing model id closes no other
    clock.advance(10)
    assert a.admit() == "probe"
    assert table.snapshot()["p/a"]["state"] == "half_open"


def test_eviction_keeps_breakers_that_hold_news() -> None:
    clock = ManualClock()
    table = Circuits(threshold=2, cooldown_s=10, clock=clock, max_targets=4)
    table.get("p/open").failure()
    table.get("p/open").failure()
    table.get("p/failing").failure()
    table.get("p/refuses").rejects_continuation = True
    table.get("p/quiet")
    table.get("p/new")  # over the bound: the oldest that knows nothing goes
    assert list(table.breakers) == ["p/open", "p/failing", "p/refuses", "p/new"]
    assert table.evicted == 1
    # Naming new ids never resets an open circuit (nor frees a target to be retried sooner).
    for i in range(3):
        table.get(f"p/id{i}")
    assert table.get("p/open").state == "open"
    assert table.get("p/failing").failures == 1
    assert table.get("p/refuses").rejects_continuation
    assert len(table.breakers) == 4


def test_when_every_breaker_holds_news_the_least_recently_used_goes() -> None:
    table = Circuits(threshold=1, cooldown_s=10, clock=ManualClock(), max_targets=70)
    names = [f"p/m{i}" for i in range(70)]
    for name in names:
        table.get(name).failure()
    table.get(names[0])  # used again: the most recent
    new = table.get("p/new")
    assert list(table.breakers) == [*names[2:], names[0], "p/new"] and table.evicted == 1
    new.failure()
    assert table.get("p/new").state == "open"


def test_a_new_target_keeps_its_breaker_in_a_small_table_full_of_news() -> None:
    """The eviction scan reaches the newest entry in a table under 64: the new breaker
    must not be the one evicted (it used to be, so its circuit could never open)."""
    table = Circuits(threshold=1, cooldown_s=10, clock=ManualClock(), max_targets=16)
    names = [f"p/m{i}" for i in range(16)]
    for name in names:
        table.get(name).failure()
    table.get("p/new").failure()
    assert table.get("p/new").state == "open"
    assert list(table.breakers) == [*names[1:], "p/new"]


def test_upstreams_hand_their_clock_to_the_breakers() -> None:
    clock = ManualClock()
    w = World(clock=clock, circuit_failure_threshold=2, circuit_cooldown_s=7)
    breaker = w.upstreams.breaker(Target("p", "a"))
    assert breaker is w.upstreams.breaker(Target("p", "a"))
    breaker.failure()
    breaker.failure()
    assert breaker.retry_in() == 7.0
    clock.advance(7)
    assert breaker.admit() == "probe"  # seven "seconds" later, none of them waited
