"""The README's examples, run as written: browser code in headless Chromium, curl and Python."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakes import Scenario
from tests.harness import fake_providers

README = Path(__file__).resolve().parent.parent / "README.md"
CHROMIUM = "/usr/bin/chromium"


def example(after: str, lang: str = "js") -> str:
    """The first ```lang block after the line that starts with ``after``."""
    text = README.read_text()
    start = text.index(after)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no {lang} example after {after!r}"
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


def wait_closed(es: str) -> str:
    return (
        "await new Promise((done) => { const t = setInterval(() => {"
        f" if ({es}.readyState === EventSource.CLOSED) {{ clearInterval(t); done(); }} }}, 20);"
        " });"
    )


def test_the_resumable_example_resumes_after_a_drop_and_stops_on_done(page, openai_fake):
    code = example("In the browser, `EventSource` does the resuming")
    # The first connection is cut after event 2 (no [DONE]): the browser must come
    # back by itself with Last-Event-ID and get the rest from the same generation.
    reads: list[str] = []

    def drop_the_first(route) -> None:
        reads.append(route.request.url)
        if len(reads) > 1:
            route.continue_()
            return
        body = route.fetch().text()
        cut = body.index(":3\n")
        route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body=body[: body.rindex("\n\n", 0, cut) + 2],
        )

    page.route(re.compile(r"/chat/streams/gen_[0-9a-f]{32}/events$"), drop_the_first)
    text = page.evaluate("async () => {" + code + "; " + wait_closed("es") + " return text; }")
    # Chromium adds Last-Event-ID below what the route sees; the text shows it was
    # sent: without it the second read would start over and repeat "Hello, ".
    assert text == "Hello, browser\n!"
    assert len(reads) == 2 and reads[0] == reads[1]
    # Past the longest jittered retry hint (3.6 s): no reconnect after [DONE].
    time.sleep(4)
    assert len(reads) == 2
    assert len([a for a in openai_fake.attempts if a.method == "POST"]) == 1


def test_the_curl_example_resumes_and_stops(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake, default_model="openai/gpt-4o-mini")
    openai_fake.default = Scenario(chunks=[f"w{i} " for i in range(400)], interval=0.02)
    code = example("With curl, while `make run`", "sh")
    assert code.startswith("GW=http://127.0.0.1:8000\n")
    code = f"GW={gw.url}\n" + code.split("\n", 1)[1]
    out = subprocess.run(
        ["bash", "-c", code], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    found = re.search(r"^id: (gen_[0-9a-f]{32}):0$", out, re.M)
    assert found is not None, out[-2000:]
    sid = found.group(1)
    ids = [int(n) for n in re.findall(rf"^id: {sid}:(\d+)$", out, re.M)]
    # Two reads: from the start, then after event 3; each contiguous, both cut by --max-time.
    split = next(i for i in range(1, len(ids)) if ids[i] <= ids[i - 1])
    first, resumed = ids[:split], ids[split:]
    assert first == list(range(len(first))) and len(first) > 4
    assert resumed == list(range(4, 4 + len(resumed))) and resumed[-1] >= first[-1]
    # The DELETE stopped the generation while it still ran, and closed its upstream.
    assert "[DONE]" not in out
    assert out.endswith(f'{{"id":"{sid}","status":"ended","finish_reason":"cancelled"}}')
    openai_fake.wait_closed(0, timeout=3)
    assert not openai_fake.attempts[0].completed
    assert len([a for a in openai_fake.attempts if a.method == "POST"]) == 1


# The README's examples name the two embedded models; here a fake upstream serves
# them under the provider name "local", so the examples run as written, fast.
LOCAL_MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]


@pytest.fixture
def local_gateway(make_gateway, openai_fake):
    local = fake_providers(openai_fake)["compat"] | {"models": LOCAL_MODELS}
    return make_gateway(providers={"local": local}, default_model="local/smollm2-135m-instruct")


def test_the_fanout_curl_example_streams_both_models(local_gateway, openai_fake):
    for i, model in enumerate(LOCAL_MODELS):
        openai_fake.for_model[model] = Scenario(chunks=[f"m{i}-a ", f"m{i}-b"], interval=0.02)
    code = example("Fan-out with curl", "sh")
    assert code.startswith("curl -N http://127.0.0.1:8000/chat/fanout ")
    code = code.replace("http://127.0.0.1:8000", local_gateway.url, 1)
    done = subprocess.run(
        ["bash", "-c", code], capture_output=True, text=True, timeout=20, check=False
    )
    assert done.returncode == 0, done.stderr
    datas = [json.loads(d) for d in re.findall(r"^data: (\{.*\})$", done.stdout, re.M)]
    ends = [d for d in datas if "finish_reason" in d]
    assert sorted((e["index"], e["model"], e["finish_reason"]) for e in ends) == [
        (0, "local/smollm2-135m-instruct", "stop"),
        (1, "local/gemma-3-270m", "stop"),
    ], done.stdout
    for i in range(2):
        text = "".join(d["content"] for d in datas if d.get("index") == i and "content" in d)
        assert text == f"m{i}-a m{i}-b"
    assert done.stdout.rstrip().endswith("data: [DONE]")
    assert done.stdout.count("[DONE]") == 1


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=False
    )


def test_the_websocket_python_example_prints_the_answer(local_gateway, openai_fake):
    openai_fake.default = Scenario(chunks=["Paris ", "is ", "the capital."], interval=0.02)
    code = example("A WebSocket client in Python", "python")
    assert '"ws://127.0.0.1:8000/ws/chat"' in code
    port = local_gateway.url.rsplit(":", 1)[1]
    done = run_python(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Paris is the capital.\n[stop]\n"
    # A refused request (a bad field) gets an error frame and no end: the example stops.
    bad = code.replace('"max_tokens": 40', '"max_tokens": -1')
    assert bad != code
    done = run_python(bad.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("\n[error: ") and "max_tokens" in done.stdout


def run_sh(code: str, gw) -> subprocess.CompletedProcess[str]:
    assert "http://127.0.0.1:8000" in code
    return subprocess.run(
        ["bash", "-c", code.replace("http://127.0.0.1:8000", gw.url)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


CITY_JSON = ['{"city": "Paris", ', '"country": "France", ', '"population": 2148000}']


def test_the_responses_python_example_streams_and_parses(local_gateway, openai_fake):
    openai_fake.default = Scenario(chunks=CITY_JSON, interval=0.01)
    code = example("## OpenAI's Responses API", "python")
    port = local_gateway.url.rsplit(":", 1)[1]
    done = run_python(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "".join(CITY_JSON)  # the streamed text
    assert lines[1].startswith("completed ")
    assert lines[2] == "city='Paris' country='France'"  # responses.parse's object


def test_the_messages_examples_stream_and_answer(local_gateway, openai_fake):
    openai_fake.default = Scenario(chunks=["Paris ", "is the capital."], interval=0.01)
    done = run_sh(example("## Anthropic's Messages API", "sh"), local_gateway)
    assert done.returncode == 0, done.stderr
    assert done.stdout.index("event: message_start") < done.stdout.index("event: message_stop")
    assert '"stop_reason":"end_turn"' in done.stdout
    assert '{"id":"msg_' in done.stdout  # the second command's one message
    code = example("## Anthropic's Messages API", "python")
    port = local_gateway.url.rsplit(":", 1)[1]
    done = run_python(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["Paris is the capital.", "end_turn 11 2"]


def test_the_structured_output_curl_example_ends_with_the_object(local_gateway, openai_fake):
    openai_fake.default = Scenario(chunks=CITY_JSON[::2], interval=0.01)
    done = run_sh(example("## Structured output", "sh"), local_gateway)
    assert done.returncode == 0, done.stderr
    assert "event: partial" in done.stdout
    obj = re.search(r"^event: object\ndata: (.*)$", done.stdout, re.M)
    assert obj is not None, done.stdout
    assert json.loads(obj.group(1))["object"] == {"city": "Paris", "population": 2148000}
