"""``streamResumable`` (``app/static/gateway-client.js``) in headless Chromium.

It starts a stream with ``POST /chat/streams`` and follows its ``events_url`` over ``fetch``;
Playwright routes cut or fail the events responses, as a dropped connection would.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes import Scenario
from tests.test_browser import MODEL, Page, browser, listed_providers  # noqa: F401
from tests.test_readme_examples import example

CHUNKS = ["Hello", ", ", "browser", "\n", "!"]
EVENTS = re.compile(r"/chat/streams/(gen_[0-9a-f]{32})/events$")

# streamResumable(body, options) with recording callbacks; never throws, returns what happened.
RUN = """async ([body, options]) => {
  const m = await import('/static/gateway-client.js');
  const tokens = [];
  const events = [];
  const started = performance.now();
  const seen = () => ({ tokens, events, ms: performance.now() - started });
  const late = new Promise((_, reject) => {
    setTimeout(() => reject(new Error('no result within 15 s')), 15000);
  });
  try {
    const r = await Promise.race([late, m.streamResumable(body, {
      ...options,
      onToken: (t) => tokens.push(t),
      onEvent: (e) => events.push({ event: e.event, id: e.id, done: e.data === '[DONE]' }),
    })]);
    return { ok: true, ...r, ...seen() };
  } catch (e) {
    return { ok: false, name: e.name, message: e.message, code: e.code, status: e.status,
             error: e.error, text: e.text, reconnects: e.reconnects, ...seen() };
  }
}"""


@pytest.fixture
def gw(make_gateway: Any, openai_fake: Any) -> Any:
    # A long grace: only a DELETE stops a stream that lost its reader within a test.
    return make_gateway(
        providers=listed_providers(openai_fake), default_model=MODEL, resume_grace_s=60
    )


@pytest.fixture
def tab(browser: Any, gw: Any, openai_fake: Any) -> Iterator[Page]:  # noqa: F811
    openai_fake.default = Scenario(chunks=CHUNKS, interval=0.05)
    page = Page(browser, gw.url)
    try:
        page.open()
        yield page
    finally:
        page.context.close()


class Reads:
    """A route on events_url: notes each request (Last-Event-ID, time), and answers the
    first with the real stream cut (``cut`` makes the body) and the later ones with ``then``."""

    def __init__(self, tab: Page, cut: Any = None, then: Any = None) -> None:
        self.cut, self.then = cut, then
        self.sids: list[str] = []
        self.last_ids: list[str | None] = []
        self.times: list[float] = []
        tab.page.route(EVENTS, self)

    def __call__(self, route: Any) -> None:
        found = EVENTS.search(route.request.url)
        assert found is not None
        self.sids.append(found.group(1))
        self.last_ids.append(route.request.headers.get("last-event-id"))
        if len(self.sids) == 1 and self.cut is not None:
            response = route.fetch()
            if response.status != 200:  # nothing to cut: pass it on
                route.fulfill(response=response)
            else:
                route.fulfill(
                    status=200,
                    headers={"Content-Type": "text/event-stream"},
                    body=self.cut(response.text(), found.group(1)),
                )
        elif len(self.sids) > 1 and self.then is not None:
            self.then(route)
        else:
            route.continue_()
        self.times.append(time.monotonic())


def between_events(body: str, sid: str) -> str:
    """The stream up to event 2's end: events 3, 4, ... and [DONE] never come."""
    cut = body.index(f"id: {sid}:3\n")
    return body[: body.rindex("\n\n", 0, cut) + 2]


def inside_an_event(body: str, sid: str) -> str:
    """Cut in the middle of event 3, after its id line: that event was never dispatched."""
    line = f"id: {sid}:3\n"
    return body[: body.index(line) + len(line) + len('data: {"con')]


def generations(openai_fake: Any) -> int:
    return len([a for a in openai_fake.attempts if a.method == "POST"])


@pytest.mark.parametrize("cut", [between_events, inside_an_event])
def test_a_cut_stream_resumes_after_the_last_event_without_duplicates(
    tab: Page, openai_fake: Any, cut: Any
) -> None:
    reads = Reads(tab, cut=cut)
    result = tab.page.evaluate(RUN, [{"prompt": "hi"}, {}])
    assert result["ok"], result
    sid = result["id"]
    assert result["text"] == "".join(CHUNKS)
    assert result["tokens"] == CHUNKS
    assert result["reconnects"] == 1 and result["end"]["finish_reason"] == "stop"
    # Every event handed over once, in order: start, content..., end, [DONE].
    ids = [e["id"] for e in result["events"]]
    assert ids == [f"{sid}:{n}" for n in range(len(CHUNKS) + 3)]
    assert result["events"][-1]["done"] and result["events"][-2]["event"] == "end"
    # The reconnect asked for what came after the last event dispatched (2), not after
    # an id line whose event never completed.
    assert reads.sids == [sid, sid]
    assert reads.last_ids == [None, f"{sid}:2"]
    # It waited for the server's retry hint (2.4-3.6 s) before coming back.
    assert reads.times[1] - reads.times[0] > 2.0
    assert generations(openai_fake) == 1
    assert len(tab.stream_requests("/chat/streams")) == 1
    tab.assert_clean()


def test_an_uninterrupted_stream_reads_once(tab: Page, openai_fake: Any) -> None:
    reads = Reads(tab)
    result = tab.page.evaluate(RUN, [{"prompt": "hi", "model": MODEL}, {}])
    assert result["ok"], result
    assert result["reconnects"] == 0
    assert result["text"] == "".join(CHUNKS) and result["tokens"] == CHUNKS
    assert result["error"] is None and result["end"]["finish_reason"] == "stop"
    assert re.fullmatch(r"gen_[0-9a-f]{32}", result["id"])
    assert reads.sids == [result["id"]] and reads.last_ids == [None]
    assert result["events"][0]["event"] == "start"
    assert result["events"][-1]["done"]
    assert generations(openai_fake) == 1
    tab.assert_clean()


def test_abort_stops_reading_and_deletes_the_stream(tab: Page, gw: Any, openai_fake: Any) -> None:
    openai_fake.default = Scenario(chunks=[f"t{i} " for i in range(60)], interval=0.2)
    result = tab.page.evaluate(
        """async () => {
          const m = await import('/static/gateway-client.js');
          const ac = new AbortController();
          const tokens = [];
          let id = null;
          try {
            await m.streamResumable({ prompt: 'long' }, {
              signal: ac.signal,
              onEvent: (e) => { if (e.event === 'start') id = e.data.id; },
              onToken: (t) => { tokens.push(t); if (tokens.length === 3) ac.abort(); },
            });
            return { name: 'resolved' };
          } catch (e) {
            const n = tokens.length;
            await new Promise((r) => setTimeout(r, 600));
            return { name: e.name, id, tokens: n, later: tokens.length - n };
          }
        }"""
    )
    assert result["name"] == "AbortError", result
    assert result["tokens"] == 3 and result["later"] == 0
    sid = result["id"]
    tab.poll(lambda: ("DELETE", f"{gw.url}/chat/streams/{sid}") in tab.requests, timeout=3)
    # The generation stopped (the grace is 60 s: leaving alone would not have closed it).
    openai_fake.wait_closed(0, timeout=3)
    attempt = openai_fake.attempts[0]
    assert attempt.closed_by_client and not attempt.completed
    log = httpx.get(f"{gw.url}/chat/streams/{sid}/events", timeout=5).text
    assert '"finish_reason":"cancelled"' in log and log.endswith("data: [DONE]\n\n")
    assert generations(openai_fake) == 1
    tab.assert_clean()


def test_abort_in_a_callback_hands_over_nothing_more(tab: Page) -> None:
    # The whole stream in one piece: the events after the abort are already read.
    Reads(tab, cut=lambda body, sid: body)
    result = tab.page.evaluate(
        """async () => {
          const m = await import('/static/gateway-client.js');
          const ac = new AbortController();
          const tokens = [];
          const onToken = (t) => { tokens.push(t); if (tokens.length === 2) ac.abort(); };
          try {
            await m.streamResumable({ prompt: 'hi' }, { signal: ac.signal, onToken });
            return { name: 'resolved', tokens };
          } catch (e) {
            return { name: e.name, tokens };
          }
        }"""
    )
    assert result == {"name": "AbortError", "tokens": CHUNKS[:2]}
    tab.assert_clean()


def test_abort_while_waiting_to_reconnect(tab: Page, gw: Any) -> None:
    reads = Reads(tab, cut=between_events)
    result = tab.page.evaluate(
        """async () => {
          const m = await import('/static/gateway-client.js');
          const ac = new AbortController();
          let aborted = null;
          // The first read is cut after event 2; the client then waits ~3 s to come back:
          // abort during that wait.
          const onEvent = (e) => {
            if (e.id.endsWith(':2')) {
              setTimeout(() => { aborted = performance.now(); ac.abort(); }, 500);
            }
          };
          try {
            await m.streamResumable({ prompt: 'hi' }, { signal: ac.signal, onEvent });
            return { name: 'resolved' };
          } catch (e) {
            return { name: e.name, ms: aborted === null ? null : performance.now() - aborted };
          }
        }"""
    )
    assert result["name"] == "AbortError", result
    assert result["ms"] is not None and result["ms"] < 300, "the wait did not end at the abort"
    assert len(reads.sids) == 1, "it reconnected after the abort"
    sid = reads.sids[0]
    tab.poll(lambda: ("DELETE", f"{gw.url}/chat/streams/{sid}") in tab.requests, timeout=3)
    tab.page.wait_for_timeout(3500)  # past the longest retry hint: no reconnect came
    assert len(reads.sids) == 1
    tab.assert_clean()


def test_gives_up_after_max_retries_failed_reconnects(tab: Page, openai_fake: Any) -> None:
    # Every reconnect fails (a client that ignored maxRetries gets through on the 6th).
    reads = Reads(
        tab,
        cut=between_events,
        then=lambda route: route.abort() if len(reads.sids) <= 6 else route.continue_(),
    )
    result = tab.page.evaluate(RUN, [{"prompt": "hi"}, {"maxRetries": 2, "maxRetryDelay": 100}])
    assert not result["ok"], result
    sid = reads.sids[0]
    assert result["code"] == "reconnect_failed"
    assert result["message"].startswith(f"gave up on stream {sid} after 2 failed reconnects")
    assert result["text"] == "Hello, " and result["reconnects"] == 2
    # The first read and two reconnects, each asking for what came after event 2.
    assert reads.last_ids == [None, f"{sid}:2", f"{sid}:2"]
    # maxRetryDelay capped the server's ~3 s hint.
    assert result["ms"] < 2000, result["ms"]
    assert generations(openai_fake) == 1
    tab.assert_clean(allow=("ERR_FAILED",))


def test_a_reconnect_to_an_expired_stream_rejects_with_the_404(
    browser: Any,  # noqa: F811
    make_gateway: Any,
    openai_fake: Any,
) -> None:
    openai_fake.default = Scenario(chunks=CHUNKS, interval=0.05)
    gw = make_gateway(
        providers=listed_providers(openai_fake), default_model=MODEL, stream_ttl_s=0.3
    )
    tab = Page(browser, gw.url)
    try:
        tab.open()
        # The stream ends while the first (cut) read is fetched, and is gone by the reconnect.
        reads = Reads(tab, cut=between_events)
        result = tab.page.evaluate(RUN, [{"prompt": "hi"}, {"maxRetryDelay": 1000}])
        assert not result["ok"], result
        assert result["status"] == 404 and result["error"]["code"] == "stream_not_found"
        assert "unknown or expired" in result["message"]
        assert len(reads.sids) == 2, "it kept trying after the 404"
        tab.assert_clean(allow=("status of 404",))
    finally:
        tab.context.close()


def test_an_http_error_on_start_rejects_like_stream_chat(tab: Page, openai_fake: Any) -> None:
    reads = Reads(tab)
    result = tab.page.evaluate(RUN, [{"prompt": "hi", "model": "nope/nope"}, {}])
    assert not result["ok"], result
    assert result["status"] == 404 and result["error"]["type"]
    assert result["message"].startswith("HTTP 404") and "nope/nope" in result["message"]
    assert reads.sids == [] and generations(openai_fake) == 0
    tab.assert_clean(allow=("status of 404",))


def test_headers_go_with_every_request(
    browser: Any,  # noqa: F811
    make_gateway: Any,
    openai_fake: Any,
) -> None:
    key = "test-client-key-0123456789"
    openai_fake.default = Scenario(chunks=CHUNKS, interval=0.05)
    gw = make_gateway(
        providers=listed_providers(openai_fake),
        default_model=MODEL,
        api_keys=[key],
        resume_grace_s=60,
    )
    tab = Page(browser, gw.url)
    try:
        # Not the demo page (it would need the key); and no favicon fetch, whose 404
        # would land in the console at a time of its own.
        tab.page.route("**/favicon.ico", lambda route: route.fulfill(status=204))
        tab.page.goto(gw.url + "/healthz")
        reads = Reads(tab, cut=between_events)
        auth = {"headers": {"Authorization": f"Bearer {key}"}, "maxRetryDelay": 100}
        result = tab.page.evaluate(RUN, [{"prompt": "hi"}, auth])
        assert result["ok"], result
        assert result["text"] == "".join(CHUNKS) and result["reconnects"] == 1
        assert len(reads.sids) == 2
        # Without the key: a 401 from the POST.
        result = tab.page.evaluate(RUN, [{"prompt": "hi"}, {}])
        assert not result["ok"] and result["status"] == 401, result
        # The DELETE carries the key too: it stops the generation (a 401 would not).
        openai_fake.default = Scenario(chunks=[f"t{i} " for i in range(60)], interval=0.2)
        result = tab.page.evaluate(
            """async (options) => {
              const m = await import('/static/gateway-client.js');
              const ac = new AbortController();
              const onToken = () => ac.abort();
              try { await m.streamResumable({ prompt: 'long' }, { ...options, onToken,
                                                                  signal: ac.signal }); }
              catch (e) { return e.name; }
            }""",
            auth,
        )
        assert result == "AbortError"
        openai_fake.wait_closed(1, timeout=3)
        assert generations(openai_fake) == 2
        tab.assert_clean(allow=("status of 401",))
    finally:
        tab.context.close()


def test_the_readme_example_runs(tab: Page) -> None:
    code = example("`streamResumable(body,")
    head = 'import { streamResumable } from "/static/gateway-client.js";\n'
    assert code.startswith(head)
    code = (
        "const { streamResumable } = await import('/static/gateway-client.js');\n"
        + code[len(head) :]
    )
    result = tab.page.evaluate("async () => {" + code + "; return { text, reconnects }; }")
    assert result == {"text": "".join(CHUNKS), "reconnects": 0}
    tab.assert_clean()
