"""The demo page and ``app/static/gateway-client.js`` in a real headless Chromium.

Playwright drives Debian's ``/usr/bin/chromium`` (Playwright's own browser downloads are not
used). A missing browser or Playwright package fails these tests; it never skips them.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import Scenario
from tests.harness import fake_providers

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
MODEL = "openai/gpt-4o-mini"
CSP_PARTS = ("default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the Python package 'playwright' is missing: pip install -e '.[dev]'", pytrace=False
        )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium",
            pytrace=False,
        )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """A browser tab on the gateway, noting console errors, page errors and requests."""

    def __init__(self, browser: Any, base_url: str, **context: Any) -> None:
        self.base = base_url
        self.context = browser.new_context(base_url=base_url, **context)
        self.page = self.context.new_page()
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.page.on(
            "console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None
        )
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append((r.method, r.url)))

    def open(self) -> Any:
        response = self.page.goto(self.base + "/")
        assert response is not None and response.status == 200, "GET / must serve the page"
        csp = response.headers.get("content-security-policy", "")
        assert all(part in csp for part in CSP_PARTS), csp
        self.page.wait_for_selector("body[data-ready=true]", timeout=5000)
        return response

    def ask(self, prompt: str, model: str | None = MODEL) -> None:
        if model is not None:
            self.page.select_option("#model", model)
        self.page.fill("#prompt", prompt)
        self.page.click("#send")

    def compare(self, models: list[str]) -> None:
        self.page.check("#compare")
        assert self.page.is_visible("#compare-models")
        boxes = self.page.locator("#compare-models input[type=checkbox]")
        for i in range(boxes.count()):
            boxes.nth(i).uncheck()
        for model in models:
            self.page.check(f'#compare-models input[value="{model}"]')

    def text(self, selector: str = ".answer", nth: int = 0) -> str:
        return str(self.page.locator(selector).nth(nth).inner_text())

    def wait_status(self, state: str, nth: int = 0, timeout: float = 10.0) -> None:
        self.page.locator(".status").nth(nth).and_(
            self.page.locator(f'[data-state="{state}"]')
        ).wait_for(timeout=timeout * 1000)

    def poll(self, until: Callable[[], bool], timeout: float = 10.0, every: float = 0.03) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out waiting in the page"
            self.page.wait_for_timeout(every * 1000)

    def stream_requests(self, path: str) -> list[tuple[str, str]]:
        return [(m, u) for m, u in self.requests if u.split("?")[0].endswith(path)]

    def assert_clean(self, allow: tuple[str, ...] = ()) -> None:
        """No script errors, no CSP violations, no failed loads except the allowed ones."""
        assert not self.page_errors, self.page_errors
        csp = [e for e in self.console_errors if "Content Security Policy" in e]
        assert not csp, csp
        other = [e for e in self.console_errors if not any(a in e for a in allow)]
        assert not other, other


def listed_providers(openai_fake: Any, anthropic_fake: Any = None) -> dict[str, Any]:
    """The fakes, with their model lists configured so that /v1/models names them."""
    providers = fake_providers(openai_fake, anthropic_fake)
    providers["openai"]["models"] = ["gpt-4o-mini", "gpt-4o"]
    if anthropic_fake is not None:
        providers["anthropic"]["models"] = ["claude-haiku-4-5"]
    return providers


@pytest.fixture
def gw(make_gateway: Any, openai_fake: Any, anthropic_fake: Any) -> Any:
    return make_gateway(
        providers=listed_providers(openai_fake, anthropic_fake), default_model=MODEL
    )


@pytest.fixture
def tab(browser: Any, gw: Any) -> Iterator[Page]:
    page = Page(browser, gw.url)
    try:
        yield page
    finally:
        page.context.close()


MARKDOWN_CHUNKS = [
    "Streaming **works**:",
    "\n\n- first `item`",
    "\n- second item",
    "\n- third *item*",
    "\n\n```python\nprint('hi')",
    "\n```",
    "\n\nSee [the docs](https://example.com/docs?a=1&b=2).",
    " <img src=x onerror=window.__xss=1>",
    " Done.",
]


def test_page_streams_growing_text(tab: Page, openai_fake: Any) -> None:
    openai_fake.default = Scenario(chunks=MARKDOWN_CHUNKS, interval=0.2, first_token_delay=0.1)
    tab.open()
    models = tab.page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert {MODEL, "openai/gpt-4o", "anthropic/claude-haiku-4-5"} <= set(models)
    tab.ask("show me markdown")

    seen: list[str] = []
    shot = False
    deadline = time.monotonic() + 10
    while tab.page.locator(".status").get_attribute("data-state") != "done":
        assert time.monotonic() < deadline, f"no end; saw {seen!r}"
        text = tab.text()
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        if len(seen) == 4 and not shot:
            ARTIFACTS.mkdir(exist_ok=True)
            tab.page.screenshot(path=str(ARTIFACTS / "page-midstream.png"), full_page=True)
            shot = True
        tab.page.wait_for_timeout(30)
    final = tab.text()
    intermediate = [s for s in seen if s != final]
    assert len(intermediate) >= 3, seen
    assert all(len(a) < len(b) for a, b in itertools.pairwise(intermediate))

    answer = tab.page.locator(".answer")
    assert answer.locator("strong").inner_text() == "works"
    assert answer.locator("li").count() == 3
    assert answer.locator("li em").inner_text() == "item"
    assert answer.locator("pre code").inner_text() == "print('hi')"
    assert answer.locator("a").get_attribute("href") == "https://example.com/docs?a=1&b=2"
    assert answer.locator("img").count() == 0 and "<img src=x" in final
    assert tab.page.evaluate("window.__xss") is None
    assert answer.locator(".cursor").count() == 0  # the typing cursor goes with the end

    stats = tab.text(".stats")
    assert "TTFT" in stats and f"{len(MARKDOWN_CHUNKS)} tokens" in stats and "tok/s" in stats
    assert len(tab.stream_requests("/chat/stream")) == 1
    tab.assert_clean()


def test_typing_cursor_while_streaming(tab: Page, openai_fake: Any) -> None:
    openai_fake.default = Scenario(chunks=["a", "b", "c", "d"], interval=0.3)
    tab.open()
    tab.ask("cursor")
    tab.page.locator(".answer .cursor").wait_for(timeout=5000)
    assert tab.page.locator(".status").get_attribute("data-state") == "streaming"
    tab.wait_status("done")
    assert tab.page.locator(".answer .cursor").count() == 0
    assert tab.text() == "abcd"


def test_stop_aborts_the_stream(tab: Page, openai_fake: Any) -> None:
    openai_fake.default = Scenario(chunks=[f"t{i} " for i in range(60)], interval=0.2)
    tab.open()
    tab.ask("long answer")
    tab.poll(lambda: tab.text().startswith("t0"))
    assert tab.page.is_enabled("#stop") and not tab.page.is_enabled("#send")
    tab.page.click("#stop")
    tab.wait_status("cancelled", timeout=3)
    assert tab.text(".status") == "cancelled"
    openai_fake.wait_closed(0, timeout=3)
    attempt = openai_fake.attempts[0]
    assert attempt.closed_by_client and not attempt.completed
    assert tab.page.is_enabled("#send") and not tab.page.is_enabled("#stop")
    text = tab.text()
    tab.page.wait_for_timeout(500)
    assert tab.text() == text, "text kept coming after Stop"
    tab.assert_clean()


def test_compare_mode_streams_models_side_by_side(
    tab: Page, openai_fake: Any, anthropic_fake: Any
) -> None:
    openai_fake.default = Scenario(chunks=[f"oa{i} " for i in range(8)], interval=0.2)
    anthropic_fake.default = Scenario(chunks=[f"an{i} " for i in range(8)], interval=0.2)
    tab.open()
    wanted = [MODEL, "anthropic/claude-haiku-4-5"]
    tab.compare(wanted)
    tab.ask("compare", model=None)

    panels = tab.page.locator(".panel")
    panels.nth(1).wait_for(timeout=5000)
    assert panels.count() == 2
    assert [panels.nth(i).get_attribute("data-model") for i in range(2)] == wanted

    def both_partial() -> bool:
        a, b = tab.text(nth=0), tab.text(nth=1)
        states = [panels.nth(i).get_attribute("data-state") for i in range(2)]
        assert "done" not in states, f"a column ended before both had text: {a!r} {b!r}"
        return bool(a) and bool(b)

    tab.poll(both_partial, timeout=5)
    ARTIFACTS.mkdir(exist_ok=True)
    tab.page.screenshot(path=str(ARTIFACTS / "page-compare-midstream.png"), full_page=True)
    tab.wait_status("done", nth=0)
    tab.wait_status("done", nth=1)
    assert tab.text(nth=0) == "".join(f"oa{i} " for i in range(8)).strip()
    assert tab.text(nth=1) == "".join(f"an{i} " for i in range(8)).strip()
    for i in range(2):
        assert "8 tokens" in tab.text(".stats", nth=i)
    assert len(tab.stream_requests("/chat/fanout")) == 1
    assert not tab.stream_requests("/chat/stream")
    tab.assert_clean()


def test_compare_mode_one_model_fails_the_other_goes_on(tab: Page, openai_fake: Any) -> None:
    openai_fake.default = Scenario(chunks=["fine ", "answer"], interval=0.2)
    openai_fake.for_model["gpt-4o"] = Scenario(
        fault="status", status=400, error_message="bad things"
    )
    tab.open()
    tab.compare([MODEL, "openai/gpt-4o"])
    tab.ask("compare", model=None)
    tab.wait_status("error", nth=1)
    assert "bad things" in tab.text(".error", nth=1)
    tab.wait_status("done", nth=0)
    assert tab.text(nth=0) == "fine answer"
    assert not tab.page.locator(".error").nth(0).is_visible()
    tab.assert_clean()


def test_auto_scroll_follows_only_a_reader_at_the_bottom(
    browser: Any, gw: Any, openai_fake: Any
) -> None:
    openai_fake.default = Scenario(chunks=[f"line {i}\n\n" for i in range(120)], interval=0.04)
    tab = Page(browser, gw.url, viewport={"width": 800, "height": 500})
    try:
        tab.open()
        tab.ask("long")
        answer = tab.page.locator(".answer")

        def gap() -> int:
            return int(answer.evaluate("a => a.scrollHeight - a.scrollTop - a.clientHeight"))

        tab.poll(lambda: answer.evaluate("a => a.scrollHeight > a.clientHeight + 300"))
        assert gap() < 10, "does not follow the text at the bottom"
        answer.evaluate("a => a.scrollTo(0, 0)")  # the reader scrolls up
        tab.page.wait_for_timeout(400)
        assert answer.evaluate("a => a.scrollTop") == 0, "pulled back down while reading"
        assert tab.page.locator(".status").get_attribute("data-state") == "streaming"
        answer.evaluate("a => a.scrollTo(0, a.scrollHeight)")  # and back to the bottom
        tab.wait_status("done")
        assert gap() < 10, "stopped following after the reader came back to the bottom"
        tab.assert_clean()
    finally:
        tab.context.close()


@pytest.mark.parametrize(
    "scenario",
    [
        Scenario(fault="status", status=400, error_message="bad things"),
        Scenario(chunks=["partial ", "answer ", "never"], fault="cut", fault_after=2),
    ],
    ids=["upstream-400", "cut-mid-stream"],
)
def test_upstream_failure_shows_an_error(tab: Page, openai_fake: Any, scenario: Scenario) -> None:
    openai_fake.default = scenario
    tab.open()
    tab.ask("fail please")
    tab.wait_status("error")
    error = tab.page.locator(".error")
    assert error.is_visible()
    message = error.inner_text()
    if scenario.fault == "status":
        assert "bad things" in message
    else:
        assert message
        assert tab.text() == "partial answer"
    assert tab.page.is_enabled("#send")
    tab.assert_clean(allow=("status of 4", "status of 5"))


def test_idle_timeout_shows_the_timeout_state(
    browser: Any, make_gateway: Any, openai_fake: Any
) -> None:
    openai_fake.default = Scenario(
        chunks=["slow ", "then ", "nothing"], fault="stall", fault_after=1
    )
    gw = make_gateway(
        providers=listed_providers(openai_fake),
        default_model=MODEL,
        first_token_timeout_s=1.0,
        idle_timeout_s=0.5,
    )
    tab = Page(browser, gw.url)
    try:
        tab.open()
        tab.ask("stall")
        tab.wait_status("timeout")
        assert tab.text() == "slow"
        assert tab.page.locator(".error").is_visible()
        tab.assert_clean()
    finally:
        tab.context.close()


def test_http_error_before_the_stream(tab: Page) -> None:
    tab.open()
    # An unknown model: the gateway answers 4xx with a JSON error before any event.
    tab.page.evaluate(
        """() => {
          const s = document.querySelector('#model');
          s.add(new Option('nope/nope', 'nope/nope'));
        }"""
    )
    tab.ask("hello", model="nope/nope")
    tab.wait_status("error")
    assert "HTTP 4" in tab.text(".error")
    assert "nope/nope" in tab.text(".error")
    tab.assert_clean(allow=("status of 4",))


def test_event_source_helper_closes_on_done(tab: Page, openai_fake: Any) -> None:
    openai_fake.default = Scenario(chunks=["Hel", "lo ", "via ", "EventSource"], interval=0.05)
    tab.open()
    result = tab.page.evaluate(
        """async () => {
          const m = await import('/static/gateway-client.js');
          return await new Promise((resolve, reject) => {
            const events = [];
            const tokens = [];
            const es = m.openEventStream('/chat/stream?prompt=hi&model=openai/gpt-4o-mini', {
              onToken: (t) => tokens.push(t),
              onEvent: (e) => events.push(e.event + (e.data === '[DONE]' ? ':[DONE]' : '')),
              onDone: (r) => resolve({ ...r, events, tokens, state: es.readyState }),
            });
            setTimeout(() => reject(new Error('no [DONE] within 10 s')), 10000);
          });
        }"""
    )
    assert result["text"] == "Hello via EventSource"
    assert result["tokens"] == ["Hel", "lo ", "via ", "EventSource"]
    assert result["end"]["finish_reason"] == "stop"
    assert result["events"][0] == "start" and result["events"][-2:] == ["end", "message:[DONE]"]
    assert result["state"] == 2  # EventSource.CLOSED
    assert not result.get("failed")
    # The gateway's retry hint is 2-4 s: a reconnecting EventSource would be back by then.
    tab.page.wait_for_timeout(4500)
    assert len(tab.stream_requests("/chat/stream")) == 1
    assert len([a for a in openai_fake.attempts if a.method == "POST"]) == 1
    tab.assert_clean()


def test_sse_parser_in_the_browser(tab: Page) -> None:
    tab.open()
    result = tab.page.evaluate(
        r"""async () => {
          const m = await import('/static/gateway-client.js');
          const chunks = [
            '\uFEFFretry: 3000\r\nid: s:0\r\nevent: start\r\nda',
            'ta: {"a":1}\r',
            '\n\r\n: ping\n\ndata: line1\ndata: line2\n',
            '\nid: s:1\rdata:no-space\r\r',
            'event: end\ndata\n\n',
            'id\n\n: comment only\n\n',
            'data: [DONE]\n\n',
            'data: unfinished, dropped at the end',
          ];
          const run = (pieces) => {
            const out = [];
            const p = m.createSSEParser((e) => out.push(e));
            pieces.forEach((c) => p.feed(c));
            p.end();
            return { out, retry: p.retry, lastEventId: p.lastEventId };
          };
          const whole = run(chunks);
          const byChar = run([...chunks.join('')]);
          return { whole, byChar };
        }"""
    )
    expected = [
        {"event": "start", "data": '{"a":1}', "id": "s:0", "retry": 3000},
        {"event": "message", "data": "line1\nline2", "id": "s:0"},
        {"event": "message", "data": "no-space", "id": "s:1"},
        {"event": "end", "data": "", "id": "s:1"},
        {"event": "message", "data": "[DONE]", "id": ""},
    ]
    for run in ("whole", "byChar"):
        assert result[run]["out"] == expected, run
        assert result[run]["retry"] == 3000 and result[run]["lastEventId"] == ""
    tab.assert_clean()


def test_stream_chat_errors_and_markdown_safety(tab: Page) -> None:
    tab.open()
    result = tab.page.evaluate(
        """async () => {
          const client = await import('/static/gateway-client.js');
          const md = await import('/static/markdown.js');
          let http = null;
          try { await client.streamChat({ prompt: 'x', model: 'nope/nope' }); }
          catch (e) { http = { status: e.status, type: e.error && e.error.type, msg: e.message }; }
          const ac = new AbortController();
          ac.abort();
          let aborted = null;
          try { await client.streamChat({ prompt: 'x' }, { signal: ac.signal }); }
          catch (e) { aborted = e.name; }
          const html = md.renderMarkdown(
            '<script>alert(1)</script> [x](javascript:alert(1)) [y](https://a.b/?q="z")\\n' +
            '"quote" & **b** *i* `<b>code</b>`'
          );
          return { http, aborted, html };
        }"""
    )
    assert result["http"]["status"] in (400, 404, 422) and result["http"]["msg"]
    assert result["aborted"] == "AbortError"
    html = result["html"]
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="javascript' not in html
    assert '<a href="https://a.b/?q=&quot;z&quot;"' in html
    assert "<strong>b</strong>" in html and "<em>i</em>" in html
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    tab.assert_clean(allow=("status of 4",))


def test_page_fits_a_phone(browser: Any, gw: Any, openai_fake: Any) -> None:
    openai_fake.default = Scenario(chunks=["A phone-sized answer " * 20])
    tab = Page(browser, gw.url, viewport={"width": 375, "height": 740}, is_mobile=True)
    try:
        tab.open()
        tab.ask("phone")
        tab.wait_status("done")
        width = tab.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"the page scrolls sideways on a phone ({width}px)"
        ARTIFACTS.mkdir(exist_ok=True)
        tab.page.screenshot(path=str(ARTIFACTS / "page-phone.png"), full_page=True)
        tab.assert_clean()
    finally:
        tab.context.close()


def test_compare_local_models_says_they_answer_in_turn(
    browser: Any, make_gateway: Any, openai_fake: Any
) -> None:
    # A fake upstream under the provider name "local", as /v1/models lists the embedded
    # models; the second answers only after a delay, as it would waiting for the first.
    local = fake_providers(openai_fake)["compat"] | {"models": ["small", "other"]}
    providers = listed_providers(openai_fake) | {"local": local}
    gw = make_gateway(providers=providers, default_model="local/small")
    openai_fake.for_model["small"] = Scenario(chunks=[f"s{i} " for i in range(6)], interval=0.15)
    openai_fake.for_model["other"] = Scenario(chunks=["o1 ", "o2"], first_token_delay=1.5)
    tab = Page(browser, gw.url)
    try:
        tab.open()
        note = tab.page.locator("[data-testid=compare-note]")
        tab.compare(["local/small", MODEL])
        assert not note.is_visible(), "one local model does not wait for anything"
        tab.compare(["local/small", "local/other"])
        assert note.is_visible() and "one after the other" in note.inner_text()
        tab.ask("compare", model=None)
        tab.wait_status("streaming", nth=0)
        tab.wait_status("queued", nth=1, timeout=3)
        assert tab.text(".status", nth=1) == "waiting for the model…"
        assert "local/small" in tab.text(nth=1)
        tab.wait_status("done", nth=1)
        tab.wait_status("done", nth=0)
        assert tab.text(nth=1) == "o1 o2"
        assert tab.text(nth=0) == "".join(f"s{i} " for i in range(6)).strip()
        tab.assert_clean()
    finally:
        tab.context.close()


def test_compare_is_off_with_one_listed_model(
    browser: Any, make_gateway: Any, openai_fake: Any
) -> None:
    gw = make_gateway(
        providers={"compat": fake_providers(openai_fake)["compat"]}, default_model="compat/Qwen3-8B"
    )
    tab = Page(browser, gw.url)
    try:
        tab.open()
        assert tab.page.is_disabled("#compare")
        assert "two models" in str(tab.page.get_attribute("#compare-toggle", "title"))
        tab.assert_clean()
    finally:
        tab.context.close()


def test_the_page_shows_a_structured_answer_filling_in(tab: Page, openai_fake: Any) -> None:
    pieces = ['{"city": "Pa', 'ris", "popu', 'lation": 2100000}']
    openai_fake.default = Scenario(chunks=pieces, interval=0.3)
    tab.open()
    tab.page.click("#schema-box summary")
    schema = (
        '{"type": "object", "required": ["city", "population"], "properties": '
        '{"city": {"type": "string"}, "population": {"type": "integer"}}}'
    )
    tab.page.fill("#schema", schema)
    tab.ask("Paris?")
    shown = tab.page.locator(".object")
    seen: list[str] = []

    def complete() -> bool:
        # The state first: once it says complete, the text read after it is the last.
        done = shown.get_attribute("data-state") == "complete"
        text = str(shown.inner_text()) if shown.is_visible() else ""
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        return done

    tab.poll(complete)
    assert '"city": "Pa"' in seen[0]  # the partial object, before the rest came
    assert '"population": 2100000' in seen[-1]
    sent = openai_fake.attempts[-1].body["response_format"]
    assert sent["json_schema"]["schema"]["required"] == ["city", "population"]
    tab.wait_status("done")

    tab.page.fill("#schema", "{not json")
    tab.page.click("#send")
    assert "not valid JSON" in tab.text("#form-error")
