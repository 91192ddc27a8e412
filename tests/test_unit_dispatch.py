"""``app.dispatch``: the one admission path (drain, process cap, client limits, open) and
the running set, with real limits, capacity and metrics over scripted providers."""

from __future__ import annotations

import pytest

from app.dispatch import Dispatch
from app.errors import Overloaded, RateLimited, ShuttingDown, UpstreamStatus, UpstreamTimeout
from app.ratelimit import NO_SLOT, MemoryLimits
from tests.units import HANG, World, answer, relay


def running(d: Dispatch) -> dict[str, int]:
    """The client slots held (the dispatcher's limits are in memory here)."""
    limits = d.rate_limits
    assert isinstance(limits, MemoryLimits)
    return limits.active


def rate_limited(d: Dispatch, code: str) -> float | None:
    return d.metrics.registry.get_sample_value("gateway_rate_limited_total", {"code": code})


def refused(d: Dispatch, limit: str) -> float | None:
    return d.metrics.registry.get_sample_value("gateway_limit_refusals_total", {"limit": limit})


async def test_a_draining_instance_refuses_before_anything_is_counted() -> None:
    w = World()
    d = w.dispatch(rpm=1)
    d.draining = True
    for _ in range(3):
        with pytest.raises(ShuttingDown) as caught:
            await d.admit("client")
        assert caught.value.http_status == 503 and caught.value.code == "shutting_down"
        assert caught.value.headers() == {"Retry-After": "1"}
    assert d.capacity.open == 0
    d.draining = False
    ticket = await d.admit("client")  # the refusals did not use up its one request
    with pytest.raises(RateLimited):
        await d.admit("client")  # and the rate limit is really 1
    await ticket.release()


async def test_the_process_cap_refuses_before_the_clients_own_limit() -> None:
    w = World()
    d = w.dispatch(rpm=1, max_open=1)
    held = await d.admit("a")
    # a has used its one request, and the process is full: full comes first (a 503,
    # not a's own 429) ...
    with pytest.raises(Overloaded) as caught:
        await d.admit("a")
    assert caught.value.code == "too_many_open_streams" and caught.value.http_status == 503
    # ... and refusing b for it does not use up b's requests.
    with pytest.raises(Overloaded):
        await d.admit("b")
    assert refused(d, "open_streams") == 2
    await held.release()
    ticket = await d.admit("b")
    await ticket.release()
    with pytest.raises(RateLimited) as limited:
        await d.admit("a")
    assert limited.value.code == "rate_limit_exceeded"
    assert rate_limited(d, "rate_limit_exceeded") == 1
    assert d.capacity.open == 0  # the 429 gave its process place back


async def test_a_ticket_is_released_when_nothing_opens() -> None:
    w = World()
    d = w.dispatch(cap=1, max_open=1)
    w.p.script("a", [UpstreamStatus("bad parameter", upstream_status=400)])
    route = w.router.resolve("p/a")
    with pytest.raises(UpstreamStatus):
        await d.start("client", route, w.request())
    assert d.capacity.open == 0 and running(d) == {} and not d.active
    # Both the process place and the client's slot are free again.
    w.p.script("a", answer("ok"))
    gen = await d.start("client", route, w.request())
    await relay(gen)


async def test_open_refuses_when_draining_began_after_admission() -> None:
    w = World()
    d = w.dispatch(cap=1)
    ticket = await d.admit("client")
    d.draining = True
    with pytest.raises(ShuttingDown):
        await d.open(w.router.resolve("p/a"), w.request(), ticket)
    assert w.p.seen == []  # nothing was asked upstream
    assert d.capacity.open == 0 and running(d) == {}


async def test_the_running_set_and_the_ticket_follow_the_generation() -> None:
    w = World()
    d = w.dispatch(cap=2)
    w.p.script("a", answer("one"), answer("two"))
    route = w.router.resolve("p/a")
    first = await d.start("client", route, w.request())
    second = await d.start("client", route, w.request())
    assert d.active == {first, second}
    assert d.capacity.open == 2 and running(d) == {"client": 2}
    with pytest.raises(RateLimited) as caught:
        await d.admit("client")  # its two slots are taken
    assert caught.value.code == "too_many_concurrent_streams"
    await relay(first)
    assert d.active == {second} and d.capacity.open == 1
    assert running(d) == {"client": 1}
    await second.aclose()  # closed without being read: released all the same
    assert not d.active and d.capacity.open == 0 and running(d) == {}
    assert w.live == 0


async def test_a_shared_ticket_is_left_to_its_holder() -> None:
    """Fan-out holds one ticket for several generations (``NO_SLOT`` to ``open``)."""
    w = World()
    d = w.dispatch(cap=1)
    ticket = await d.admit("client")
    w.p.script("a", answer("a"))
    w.q.script("x", answer("x"))
    gens = [await d.open(w.router.resolve(name), w.request(), NO_SLOT) for name in ("p/a", "q/x")]
    assert d.active == set(gens) and d.capacity.open == 1
    for gen in gens:
        await relay(gen)
    assert not d.active and d.capacity.open == 1  # still the holder's
    await ticket.release()
    await ticket.release()  # idempotent
    assert d.capacity.open == 0 and running(d) == {}


async def test_a_generation_cut_off_while_opening_gives_its_ticket_back() -> None:
    w = World(first_token_timeout_s=0.05)
    d = w.dispatch(cap=1)
    w.p.script("a", [HANG])
    with pytest.raises(UpstreamTimeout):
        await d.start("client", w.router.resolve("p/a"), w.request())
    assert d.capacity.open == 0 and running(d) == {} and w.live == 0
