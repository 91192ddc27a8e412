"""``app.relay``: a generation's events over scripted upstreams, and its watchdog.

Every stream is checked for an honest ending (``tests.units.honest``: one
``End``, last, an ``Error`` only just before it) and for its upstream
released (``World.live == 0``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from app.errors import (
    Cancelled,
    ShuttingDown,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamTruncated,
    UpstreamUnavailable,
)
from app.events import End, Error, Finish, Start, TextDelta, ToolCallDelta, Usage
from app.relay.watchdog import Watchdog
from app.routing import Target
from app.upstreams import Timeouts
from tests.units import HANG, Closes, Sleep, World, answer, batches, honest, relay, texts, until


def kinds(events: Sequence[object]) -> list[str]:
    return [type(ev).__name__ for ev in events]


async def test_an_answer_is_relayed_with_one_end_carrying_its_usage() -> None:
    w = World()
    w.p.script(
        "a",
        [
            [Start(upstream_model="a-2024"), Usage(input_tokens=5)],
            [TextDelta("Hel"), TextDelta("lo")],
            [Usage(output_tokens=7), Finish("stop")],
        ],
    )
    gen = await w.generation("duo")
    closes = Closes()
    gen.on_close = closes
    events = await relay(gen)
    assert kinds(events) == ["Start", "TextDelta", "TextDelta", "End"]
    start, end = events[0], events[-1]
    assert isinstance(start, Start) and isinstance(end, End)
    assert (start.model, start.provider, start.upstream_model) == ("p/a", "p", "a-2024")
    assert (end.finish_reason, end.input_tokens, end.output_tokens) == ("stop", 5, 7)
    assert (end.model, end.provider) == ("p/a", "p")
    assert [(a.target, a.outcome) for a in end.attempts] == [("p/a", "ok")]
    assert end.ttft_ms is not None and end.ttft_ms <= end.duration_ms
    assert w.observer.ends == [(end, Target("p", "a"))]  # reported once
    assert closes.calls == 1 and w.live == 0
    assert w.breaker_of("p/a").failures == 0


async def test_start_is_held_until_the_first_content() -> None:
    w = World()
    w.p.script("a", [[Start()], Sleep(0.01), [TextDelta("hi")], [Usage(1, 1), Finish("stop")]])
    gen = await w.generation("duo")
    got = await batches(gen)
    # Nothing was sent before the content; Start comes with it.
    assert kinds(got[0]) == ["Start", "TextDelta"]
    honest([ev for batch in got for ev in batch])


async def test_a_stream_without_a_finish_reason_is_a_truncation() -> None:
    w = World(max_retries=0)
    w.p.script("a", [[Start()], [TextDelta("par")], [TextDelta("tial")]])
    gen = await w.generation("p/a")
    events = await relay(gen)
    assert kinds(events) == ["Start", "TextDelta", "TextDelta", "Error", "End"]
    error, end = events[-2], events[-1]
    assert isinstance(error, Error) and isinstance(error.error, UpstreamTruncated)
    assert isinstance(end, End) and end.finish_reason == "error"
    assert end.output_tokens == 2  # no count came: one per delta
    assert w.breaker_of("p/a").failures == 1 and w.live == 0


async def test_a_failure_mid_stream_after_content_ends_with_an_error() -> None:
    w = World()
    w.p.script("a", [[Start()], [TextDelta("so far")], UpstreamUnavailable("reset")])
    w.q.script("x", answer("unused"))
    gen = await w.generation("duo")  # "duo" does not continue broken answers
    events = await relay(gen)
    assert texts(events) == "so far"
    error = events[-2]
    assert isinstance(error, Error) and isinstance(error.error, UpstreamUnavailable)
    assert w.q.seen == [] and w.live == 0


async def test_a_failure_before_content_fails_over_invisibly() -> None:
    w = World(max_retries=0)
    w.p.script("a", [[Start()], UpstreamTruncated("cut before any content")])
    w.q.script("x", answer("from x"))
    gen = await w.generation("duo")
    assert gen.model == "p/a"  # opened on a
    events = await relay(gen)
    assert kinds(events) == ["Start", "TextDelta", "End"]  # no error: the client saw nothing
    start, end = events[0], events[-1]
    assert isinstance(start, Start) and (start.model, start.provider) == ("q/x", "q")
    assert isinstance(end, End) and (end.model, end.finish_reason) == ("q/x", "stop")
    assert [(a.target, a.outcome) for a in end.attempts] == [("p/a", "error"), ("q/x", "ok")]
    assert w.live == 0


async def test_a_failure_before_content_with_nowhere_to_go_is_reported() -> None:
    w = World(max_retries=0)
    w.p.script("a", [[Start()], UpstreamTruncated("cut")])
    w.q.script("x", [status_503()])
    events = await relay(await w.generation("duo"))
    # The Start held back still comes first: the stream had opened.
    assert kinds(events) == ["Start", "Error", "End"]
    error = events[1]
    assert isinstance(error, Error) and error.error.http_status == 503


def status_503() -> UpstreamStatus:
    return UpstreamStatus("overloaded", upstream_status=503)


async def test_a_silent_upstream_after_its_start_times_out_on_the_first_token() -> None:
    w = World(first_token_timeout_s=0.05)
    w.p.script("a", [[Start()], HANG])
    events = await relay(await w.generation("p/a"))
    assert kinds(events) == ["Start", "Error", "End"]
    error, end = events[1], events[2]
    assert isinstance(error, Error) and isinstance(error.error, UpstreamTimeout)
    assert error.error.phase == "first_token"
    assert isinstance(end, End) and end.finish_reason == "timeout" and w.live == 0


async def test_a_first_token_timeout_moves_to_the_next_target_invisibly() -> None:
    w = World(first_token_timeout_s=0.05)
    w.p.script("a", [[Start()], HANG])
    w.q.script("x", answer("x answers"))
    events = await relay(await w.generation("duo"))
    assert texts(events) == "x answers" and not any(isinstance(e, Error) for e in events)
    end = events[-1]
    assert isinstance(end, End)
    assert [(a.target, a.outcome) for a in end.attempts] == [("p/a", "timeout"), ("q/x", "ok")]
    assert w.p.calls("a") == 1 and w.live == 0


async def test_an_idle_upstream_ends_with_a_timeout() -> None:
    w = World(idle_timeout_s=0.05)
    w.p.script("a", [[Start()], [TextDelta("some")], HANG])
    events = await relay(await w.generation("p/a"))
    assert kinds(events) == ["Start", "TextDelta", "Error", "End"]
    error, end = events[2], events[3]
    assert isinstance(error, Error) and isinstance(error.error, UpstreamTimeout)
    assert error.error.phase == "idle" and error.error.code == "timeout"
    assert isinstance(end, End) and end.finish_reason == "timeout"
    assert w.breaker_of("p/a").failures == 1 and w.live == 0


async def test_the_total_timeout_ends_a_stream_that_keeps_talking() -> None:
    w = World(total_timeout_s=0.15, idle_timeout_s=1.0)
    chatter = [[TextDelta(".")] if i % 2 else Sleep(0.02) for i in range(40)]
    w.p.script("a", [[Start()], *chatter])  # type: ignore[list-item]
    events = await relay(await w.generation("p/a"))
    error = events[-2]
    assert isinstance(error, Error) and isinstance(error.error, UpstreamTimeout)
    assert error.error.phase == "total"
    # The request's own budget says nothing about the target's health.
    assert w.breaker_of("p/a").failures == 0 and w.live == 0


async def test_after_the_finish_reason_a_silent_upstream_ends_the_answer_well() -> None:
    """The finish reason came, the usage never does: the tail wait ends it, no error."""
    w = World(idle_timeout_s=0.05)
    w.p.script("a", [[Start()], [TextDelta("done")], [Finish("length")], HANG])
    events = await relay(await w.generation("p/a"))
    end = events[-1]
    assert kinds(events) == ["Start", "TextDelta", "End"]
    assert isinstance(end, End) and end.finish_reason == "length" and w.live == 0


async def test_a_cut_after_the_finish_reason_does_not_undo_the_answer() -> None:
    w = World()
    w.p.script("a", [[Start()], [TextDelta("done"), Finish("stop")], UpstreamTruncated("cut")])
    events = await relay(await w.generation("p/a"))
    end = events[-1]
    assert isinstance(end, End) and end.finish_reason == "stop"
    assert w.breaker_of("p/a").failures == 0


async def test_stop_by_the_client_ends_cancelled_without_an_error() -> None:
    w = World()
    w.p.script("a", [[Start()], [TextDelta("one")], HANG])
    gen = await w.generation("p/a")
    closes = Closes()
    gen.on_close = closes
    got = []
    events = gen.events()
    got += await anext(events)
    gen.stop(Cancelled("stopped by the client", code="cancelled"))
    got += [ev async for batch in events for ev in batch]
    honest(got)
    assert kinds(got) == ["Start", "TextDelta", "End"]
    end = got[-1]
    assert isinstance(end, End) and end.finish_reason == "cancelled"
    assert end.attempts[0].outcome == "cancelled"
    assert w.breaker_of("p/a").failures == 0  # not the upstream's fault
    assert closes.calls == 1 and w.live == 0


async def test_stop_for_a_shutdown_tells_why_and_ends_cancelled() -> None:
    w = World()
    w.p.script("a", [[Start()], [TextDelta("one")], HANG])
    gen = await w.generation("p/a")
    events = gen.events()
    got = await anext(events)
    gen.stop(ShuttingDown("the server is shutting down", code="shutting_down"))
    got += [ev async for batch in events for ev in batch]
    honest(got)
    error, end = got[-2], got[-1]
    assert isinstance(error, Error) and isinstance(error.error, ShuttingDown)
    assert isinstance(end, End) and end.finish_reason == "cancelled" and w.live == 0


async def test_a_stop_before_the_stream_is_read_lands_at_once() -> None:
    """``streams/producer.py`` stops a generation before reading it when its stream was
    stopped while opening, and the upstream's first content arrives at once: the first
    content re-arms the watchdog, which must keep the pending interrupt due (it used to
    wait for the idle deadline)."""
    w = World(idle_timeout_s=5.0)
    w.p.script("a", [[Start()], [TextDelta("one")], HANG])
    gen = await w.generation("p/a")
    gen.stop(ShuttingDown("the server is shutting down", code="shutting_down"))
    async with asyncio.timeout(0.5):  # not the idle timeout's 5 s
        events = await relay(gen)
    end = events[-1]
    assert isinstance(end, End) and end.finish_reason == "cancelled" and w.live == 0


async def test_stop_while_failing_over_ends_at_once() -> None:
    w = World(max_retries=2, retry_backoff_s=5.0, retry_backoff_max_s=5.0)
    w.p.script("a", [[Start()], UpstreamTruncated("cut")], answer("unused"))
    gen = await w.generation("p/a")
    task = asyncio.create_task(relay(gen))
    await until(lambda: w.observer.of("retry") != [])  # waiting out a backoff (up to 5 s)
    gen.stop(Cancelled("stopped", code="cancelled"))
    events = await asyncio.wait_for(task, 2)
    end = events[-1]
    assert isinstance(end, End) and end.finish_reason == "cancelled" and w.live == 0


async def test_on_close_is_called_exactly_once() -> None:
    w = World()
    w.p.script("a", answer("x"), [[Start()], HANG])
    gen = await w.generation("p/a")
    closes = Closes()
    gen.on_close = closes
    await relay(gen)
    await gen.aclose()  # the route's own close after the body: nothing more
    assert closes.calls == 1
    # A generation closed without ever being read releases all the same.
    gen2 = await w.generation("p/a")
    closes2 = Closes()
    gen2.on_close = closes2
    assert w.live == 1
    await gen2.aclose()
    await gen2.aclose()
    assert closes2.calls == 1 and w.live == 0
    assert w.breaker_of("p/a").failures == 0


async def test_a_paused_consumer_is_never_cancelled_by_a_deadline() -> None:
    """The idle deadline falls while the client's send is slow: the send completes, and the
    stream goes on (the deadline counts upstream silence, not the client)."""
    w = World(idle_timeout_s=0.03)
    w.p.script("a", [[Start()], [TextDelta("a")], [TextDelta("b")], [Usage(1, 2), Finish("stop")]])
    gen = await w.generation("p/a")
    got = []
    async with asyncio.timeout(2):
        async for batch in gen.events():
            got += batch
            await asyncio.sleep(0.1)  # a slow send: three idle timeouts long
    end = honest(got)
    assert texts(got) == "ab" and end.finish_reason == "stop"


async def test_the_watchdog_waits_while_paused_then_cancels_the_read() -> None:
    loop = asyncio.get_running_loop()
    wd = Watchdog(Timeouts(first_token_s=0.02, idle_s=1, total_s=5), loop.time(), loop.time())
    deadline = wd._handle.when()
    wd.paused = True  # handed over to the consumer
    await until(lambda: wd._handle.when() > deadline)  # the deadline passed and waited
    assert wd.expired is None
    wd.paused = False
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)  # the next upstream read
    assert wd.take_expiry() == "first_token"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    wd.stop()


async def test_usage_is_folded_into_the_end_and_a_later_usage_overrides() -> None:
    w = World()
    w.p.script(
        "a",
        [
            [Start(), Usage(10, 1)],
            [TextDelta("t")],
            [Usage(output_tokens=4)],
            [Finish("stop")],
        ],
    )
    events = await relay(await w.generation("p/a"))
    end = events[-1]
    assert isinstance(end, End) and (end.input_tokens, end.output_tokens) == (10, 4)


async def test_a_cut_after_content_is_continued_on_the_next_target() -> None:
    w = World()
    w.p.script(
        "a", [[Start()], [TextDelta("Once ")], [TextDelta("upon a ")], UpstreamTruncated("cut")]
    )
    w.q.script("x", [[Start()], [TextDelta(" time.")], [Usage(20, 3), Finish("stop")]])
    request = w.request(max_tokens=50)
    events = await relay(await w.generation("cont", request))
    # One whole answer: the seam's repeated space is dropped.
    assert texts(events) == "Once upon a time."
    assert kinds(events) == ["Start", "TextDelta", "TextDelta", "Start", "TextDelta", "End"]
    first, seam, end = events[0], events[3], events[-1]
    assert isinstance(first, Start) and not first.continuation and first.model == "p/a"
    assert isinstance(seam, Start) and seam.continuation and seam.model == "q/x"
    assert isinstance(end, End)
    assert (end.finish_reason, end.model, end.provider) == ("stop", "q/x", "q")
    assert (end.input_tokens, end.output_tokens) == (20, 2 + 3)  # both attempts' output
    asked = w.q.seen[0]
    assert asked.continuation and asked.max_tokens == 48
    assert asked.messages[-1] == {"role": "assistant", "content": "Once upon a"}
    assert w.breaker_of("p/a").failures == 1 and w.live == 0


async def test_a_failed_continuation_reports_the_original_failure() -> None:
    w = World()
    original = UpstreamTruncated("the first cut")
    w.p.script("a", [[Start(), Usage(input_tokens=8)], [TextDelta("Half")], original])
    w.q.script("x", [[Start()], UpstreamUnavailable("x broke too")])
    events = await relay(await w.generation("cont"))
    assert texts(events) == "Half"
    error, end = events[-2], events[-1]
    assert isinstance(error, Error) and error.error is original
    assert isinstance(end, End) and end.finish_reason == "error"
    assert (end.model, end.provider, end.input_tokens, end.output_tokens) == ("p/a", "p", 8, 1)
    assert w.q.calls("x") == 1 and w.live == 0


async def test_a_tool_call_is_never_continued() -> None:
    w = World()
    w.p.script(
        "a",
        [
            [Start()],
            [TextDelta("Let me look that up.")],
            [ToolCallDelta(0, id="call_1", name="lookup", arguments='{"q":')],
            UpstreamTruncated("cut"),
        ],
    )
    w.q.script("x", answer(" unused"))
    events = await relay(await w.generation("cont"))
    error = events[-2]
    assert isinstance(error, Error) and isinstance(error.error, UpstreamTruncated)
    assert w.q.seen == [] and w.live == 0


async def test_a_target_that_does_not_accept_continuation_is_not_asked() -> None:
    w = World(providers={"q": {"accepts_continuation": False}})
    w.p.script("a", [[Start()], [TextDelta("Half")], UpstreamTruncated("cut")])
    events = await relay(await w.generation("cont"))
    assert isinstance(events[-2], Error) and w.q.seen == []


async def test_an_answer_that_used_its_max_tokens_is_not_continued() -> None:
    w = World()
    w.p.script("a", [[Start()], [TextDelta("a")], [TextDelta("b")], UpstreamTruncated("cut")])
    events = await relay(await w.generation("cont", w.request(max_tokens=2)))
    assert isinstance(events[-2], Error) and w.q.seen == []
