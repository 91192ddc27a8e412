"""``app.ratelimit.MemoryLimits``: the sliding minute and the concurrency cap per client.

The window reads the event loop's clock; ``shifted_loop_time`` moves it on,
so a minute passes without waiting one.
"""

from __future__ import annotations

import pytest

from app.errors import RateLimited
from app.ratelimit import NO_SLOT, WINDOW_S, MemoryLimits
from tests.units import shifted_loop_time


async def test_the_window_slides_rather_than_resets_on_the_minute() -> None:
    limits = MemoryLimits(rpm=2, cap=None)
    with shifted_loop_time() as advance:
        await limits.admit("c")  # t = 0
        advance(30)
        await limits.admit("c")  # t = 30
        advance(1)
        with pytest.raises(RateLimited) as caught:
            await limits.admit("c")  # t = 31: two in the last minute
        exc = caught.value
        assert exc.http_status == 429 and exc.code == "rate_limit_exceeded"
        assert exc.retry_after == pytest.approx(29, abs=0.1)  # when the first one leaves
        assert exc.headers() == {"Retry-After": "29"}
        advance(29.5)  # t = 60.5: the first has left, the second has not
        await limits.admit("c")
        with pytest.raises(RateLimited) as caught:
            await limits.admit("c")
        assert caught.value.retry_after == pytest.approx(29.5, abs=0.1)  # the t = 30 one
        # Another client has a window of its own.
        await limits.admit("other")


async def test_a_refusal_is_not_counted_against_the_window() -> None:
    limits = MemoryLimits(rpm=2, cap=None)
    with shifted_loop_time() as advance:
        await limits.admit("c")
        await limits.admit("c")
        for _ in range(5):
            with pytest.raises(RateLimited):
                await limits.admit("c")
        advance(WINDOW_S + 0.1)  # only the two admitted ones had to leave
        await limits.admit("c")
        await limits.admit("c")


async def test_a_retry_after_is_never_under_a_second() -> None:
    limits = MemoryLimits(rpm=1, cap=None)
    with shifted_loop_time() as advance:
        await limits.admit("c")
        advance(WINDOW_S - 0.2)
        with pytest.raises(RateLimited) as caught:
            await limits.admit("c")
        assert caught.value.retry_after == 1.0


async def test_the_concurrency_cap_counts_running_slots() -> None:
    limits = MemoryLimits(rpm=None, cap=2)
    one = await limits.admit("c")
    two = await limits.admit("c")
    with pytest.raises(RateLimited) as caught:
        await limits.admit("c")
    assert caught.value.code == "too_many_concurrent_streams"
    assert caught.value.headers() == {"Retry-After": "1"}
    await one.release()
    three = await limits.admit("c")
    for slot in (two, three):
        await slot.release()
    assert limits.active == {}  # a client with nothing running is not kept


async def test_releasing_a_slot_twice_frees_one_place() -> None:
    limits = MemoryLimits(rpm=None, cap=2)
    one = await limits.admit("c")
    await limits.admit("c")
    await one.release()
    await one.release()  # idempotent: the other slot still counts
    assert limits.active == {"c": 1}
    await limits.admit("c")
    with pytest.raises(RateLimited):
        await limits.admit("c")


async def test_a_concurrency_refusal_does_not_use_up_a_request() -> None:
    limits = MemoryLimits(rpm=2, cap=1)
    with shifted_loop_time():
        slot = await limits.admit("c")
        with pytest.raises(RateLimited) as caught:
            await limits.admit("c")
        assert caught.value.code == "too_many_concurrent_streams"
        await slot.release()
        await (await limits.admit("c")).release()  # the second of its two
        with pytest.raises(RateLimited) as caught:
            await limits.admit("c")
        assert caught.value.code == "rate_limit_exceeded"


async def test_without_limits_nothing_is_kept() -> None:
    limits = MemoryLimits(rpm=None, cap=None)
    for i in range(100):
        assert await limits.admit(f"c{i}") is NO_SLOT
    assert limits.hits == {} and limits.active == {}


async def test_idle_clients_are_forgotten_once_the_table_is_large() -> None:
    limits = MemoryLimits(rpm=1, cap=None)
    with shifted_loop_time() as advance:
        for i in range(4096):
            await limits.admit(f"c{i}")
        await limits.admit("late")  # every earlier client still has a request in the window
        assert len(limits.hits) == 4097
        advance(WINDOW_S / 2)
        await limits.admit("later")
        assert len(limits.hits) == 4098  # a table of active clients is never pruned
        advance(WINDOW_S / 2 + 0.1)  # the first 4097 have left the window
        await limits.admit("new")
        assert set(limits.hits) == {"later", "new"}
        # A forgotten client starts afresh: its old request no longer counts.
        await limits.admit("c0")
