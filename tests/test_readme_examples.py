"""The README's `fetch` and `EventSource` examples, run as written in headless Chromium."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.fakes import Scenario

README = Path(__file__).resolve().parent.parent / "README.md"
CHROMIUM = "/usr/bin/chromium"


def example(after: str) -> str:
    """The first ```js block after the line that starts with ``after``."""
    text = README.read_text()
    start = text.index(after)
    match = re.compile(r"```js\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no js example after {after!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed (the dev extra)")
    assert Path(CHROMIUM).exists(), "Debian's chromium is not installed (.ci/run installs it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake, default_model="openai/gpt-4o-mini")
    openai_fake.default = Scenario(chunks=["Hello", ", ", "browser", "\n", "!"], interval=0.05)
    page = browser.new_page()
    page.goto(gw.url + "/")
    yield page
    page.close()


def test_the_fetch_example_gets_the_whole_text(page, openai_fake):
    code = example("Streaming with `fetch`")
    assert len(code.strip().splitlines()) <= 10
    text = page.evaluate(f"async () => {{ {code}; return text; }}")
    assert text == "Hello, browser\n!"


def test_the_eventsource_example_gets_the_whole_text_and_does_not_reconnect(page, openai_fake):
    code = example("With `EventSource`")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/chat/stream" in r.url else None)
    text = page.evaluate(
        "async () => {" + code + "; await new Promise((done) => { const t = setInterval(() => {"
        " if (es.readyState === EventSource.CLOSED) { clearInterval(t); done(); } }, 20); });"
        " return text; }"
    )
    assert text == "Hello, browser\n!"
    # Past the longest jittered retry hint (3.6 s): the browser did not reconnect.
    time.sleep(4)
    assert len(requests) == 1
    assert len([a for a in openai_fake.attempts if a.method == "POST"]) == 1
