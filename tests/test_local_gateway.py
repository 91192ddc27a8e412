"""The default set-up end to end: no configuration, the embedded models answer."""

from __future__ import annotations

import time

import httpx
import openai
import orjson
import pytest

from tests.harness import read_sse, sse

pytestmark = pytest.mark.local_model

SMOL = "local/smollm2-135m-instruct"
GEMMA = "local/gemma-3-270m"


@pytest.fixture(scope="module")
def gw():
    from tests.harness import GatewayServer, make_settings

    server = GatewayServer(make_settings(local_enabled=True)).start()
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the embedded model did not load"
        time.sleep(0.1)
    yield server
    server.stop()


def test_simple_stream_from_the_embedded_model(gw):
    events = read_sse(
        httpx.get(
            gw.url + "/chat/stream", params={"prompt": "The sea is", "max_tokens": 8}, timeout=60
        )
    )
    start = events[0].json()
    assert start["model"] == SMOL and start["provider"] == "local"
    texts = [e.json()["content"] for e in events if e.event == "message" and e.data != "[DONE]"]
    assert len(texts) >= 2 and "".join(texts).strip()
    end = next(e.json() for e in events if e.event == "end")
    assert end["finish_reason"] in ("length", "stop")
    assert end["usage"]["input_tokens"] > 0 and 0 < end["usage"]["output_tokens"] <= 8
    assert events[-1].data == "[DONE]"


def test_a_factual_question_is_answered_and_the_answer_stops_by_itself(gw):
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x") as client:
        models = [m.id for m in client.models.list()]
        assert models[:2] == [SMOL, GEMMA]
        result = client.chat.completions.create(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            model=SMOL,
            max_tokens=64,
            temperature=0,
        )
    choice = result.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    assert result.usage is not None and result.usage.completion_tokens < 64


def test_the_default_model_answers_a_plain_request(gw):
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == SMOL and body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] <= 6


def test_fanout_across_the_two_local_models(gw):
    with httpx.stream(
        "POST",
        gw.url + "/chat/fanout",
        json={"prompt": "Name a colour.", "models": [SMOL, GEMMA], "max_tokens": 12},
        timeout=120,
    ) as r:
        assert r.status_code == 200
        events = read_sse(r)
    ends = {}
    for e in events:
        if e.event == "end":
            data = e.json()
            ends[data["index"]] = data
    assert sorted(ends) == [0, 1]
    assert [ends[i]["model"] for i in (0, 1)] == [SMOL, GEMMA]
    for end in ends.values():
        assert end["finish_reason"] in ("stop", "length")
        assert end["usage"]["input_tokens"] > 0 and 0 < end["usage"]["output_tokens"] <= 12
    assert events[-1].data == "[DONE]"


def test_a_cancelled_local_stream_reports_its_input_tokens(gw):
    r = httpx.post(
        gw.url + "/chat/streams",
        json={"prompt": "Tell me about the moon.", "max_tokens": 300},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    events = []
    texts = 0
    with httpx.stream("GET", gw.url + f"/chat/streams/{sid}/events", timeout=60) as s:
        for ev in sse(s):  # read on to the end after the stop
            events.append(ev)
            if ev.event == "message" and ev.data != "[DONE]":
                texts += 1
                if texts == 2:
                    stop = httpx.delete(gw.url + f"/chat/streams/{sid}", timeout=10)
                    assert stop.status_code == 200, stop.text
    end = next(orjson.loads(e.data) for e in events if e.event == "end")
    assert end["finish_reason"] == "cancelled"
    assert end["usage"]["input_tokens"] > 0
    assert end["usage"]["output_tokens"] < 300


def test_the_readmes_first_curl_gets_a_sensible_answer_that_stops(gw):
    """The first command a new user pastes (README, Try it), run as written."""
    import re
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.compile(r"```sh\n(.*?)```", re.S).search(readme, readme.index("## Try it"))
    assert block is not None
    first = next(line for line in block.group(1).splitlines() if line.startswith("curl "))
    assert "http://127.0.0.1:8000/" in first
    command = first.replace("http://127.0.0.1:8000", gw.url, 1)
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True
    )
    datas = [line[6:] for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    text = "".join(orjson.loads(d).get("content", "") for d in datas[1:-2])
    end = orjson.loads(datas[-2])
    assert "Paris" in text
    assert end["finish_reason"] == "stop" and end["usage"]["output_tokens"] < 60


def test_a_gateway_whose_routes_do_not_name_the_model_loads_it_on_first_use(
    make_gateway, openai_fake
):
    """Memory is not paid for nothing: with another default model, the embedded one is
    loaded by the first request that names it, not at start."""
    gw = make_gateway(
        openai_fake=openai_fake, local_enabled=True, default_model="openai/gpt-4o-mini"
    )
    local = gw.app.state.gateway.upstreams.providers["local"]
    ready = httpx.get(gw.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["providers"]["local"] == "ready"
    assert local.loaded() is None
    assert httpx.post(gw.url + "/chat/stream", json={"prompt": "hi"}, timeout=10).is_success
    assert local.loaded() is None  # the default model's traffic does not load it
    events = read_sse(
        httpx.post(
            gw.url + "/chat/stream",
            json={"model": SMOL, "prompt": "The sea is", "max_tokens": 4},
            timeout=60,
        )
    )
    assert events[-2].json()["finish_reason"] in ("stop", "length")
    assert local.loaded() is not None
