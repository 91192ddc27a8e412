"""Structured output (``response_format``) as it streams.

The simple protocols send ``partial`` events with the object parsed so far
(at most one per upstream read) and a final ``object`` checked against the
schema, or an ``error`` naming what failed; OpenAI-kind upstreams get the
``response_format`` itself, Anthropic a forced tool, the local model a grammar.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from websockets.sync.client import connect

from tests.fakes.scenario import Scenario, ToolCallSpec
from tests.harness import read_sse

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
PIECES = ['{"city": "Pa', 'ris", "popu', 'lation": 2100000}']


def stream_events(gw, body: dict) -> list:
    with httpx.stream("POST", gw.url + "/chat/stream", json=body, timeout=15) as r:
        assert r.status_code == 200, r.read()
        return read_sse(r)


def kinds(events: list) -> list[str]:
    return [e.event for e in events]


def test_partials_grow_and_the_object_is_checked(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    openai_fake.enqueue(Scenario(chunks=PIECES, interval=0.05))  # one upstream read each
    body = {"model": "openai/gpt-4o-mini", "prompt": "Paris?", "response_format": FORMAT}
    events = stream_events(gw, body)

    assert openai_fake.attempts[-1].body["response_format"] == FORMAT  # passed on as it is
    partials = [e.json()["object"] for e in events if e.event == "partial"]
    assert partials[0] == {"city": "Pa"}  # strings show as they grow
    assert partials[-1] == {"city": "Paris", "population": 2100000}
    assert len(partials) <= len(PIECES)  # at most one per upstream read
    obj = [e for e in events if e.event == "object"]
    assert len(obj) == 1 and obj[0].json()["object"] == {"city": "Paris", "population": 2100000}
    names = kinds(events)
    assert names.index("object") < names.index("end")
    assert events[names.index("end")].json()["finish_reason"] == "stop"
    assert events[-1].data == "[DONE]"


def test_an_object_off_its_schema_ends_with_an_error_naming_it(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    openai_fake.enqueue(Scenario(chunks=['{"city": ', '"Paris"}']))
    body = {"model": "openai/gpt-4o-mini", "prompt": "Paris?", "response_format": FORMAT}
    events = stream_events(gw, body)
    names = kinds(events)
    assert "object" not in names
    error = events[names.index("error")].json()["error"]
    assert error["type"] == "invalid_output" and "population" in error["message"]
    assert names[-3:] == ["error", "end", "message"] and events[-1].data == "[DONE]"
    assert events[-2].json()["finish_reason"] == "error"


def test_an_answer_cut_at_max_tokens_is_not_an_object(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    openai_fake.enqueue(Scenario(chunks=['{"city": "Par'], finish_reason="length"))
    body = {"model": "openai/gpt-4o-mini", "prompt": "Paris?", "response_format": FORMAT}
    events = stream_events(gw, body)
    error = next(e for e in events if e.event == "error").json()["error"]
    assert "max_tokens" in error["message"]
    assert next(e for e in events if e.event == "end").json()["finish_reason"] == "error"


def test_anthropic_answers_through_a_forced_tool(make_gateway, anthropic_fake):
    gw = make_gateway(anthropic_fake=anthropic_fake)
    anthropic_fake.enqueue(
        Scenario(
            chunks=[],
            tool_calls=[ToolCallSpec("toolu_1", "json_answer", PIECES)],
            finish_reason="tool_calls",
        )
    )
    body = {"model": "anthropic/claude-haiku-4-5", "prompt": "Paris?", "response_format": FORMAT}
    events = stream_events(gw, body)
    sent = anthropic_fake.attempts[-1].body
    assert sent["tool_choice"] == {"type": "tool", "name": "json_answer"}
    assert sent["tools"][-1]["input_schema"] == CITY
    text = "".join(e.json()["content"] for e in events if e.event == "message" and e.data[0] == "{")
    assert json.loads(text) == {"city": "Paris", "population": 2100000}  # the input, as text
    assert not [e for e in events if e.event == "tool_call"]
    obj = next(e for e in events if e.event == "object").json()["object"]
    assert obj == {"city": "Paris", "population": 2100000}
    assert next(e for e in events if e.event == "end").json()["finish_reason"] == "stop"


def test_openai_clients_get_the_json_text_as_openai_sends_it(make_gateway, anthropic_fake):
    gw = make_gateway(anthropic_fake=anthropic_fake)
    anthropic_fake.enqueue(
        Scenario(chunks=[], tool_calls=[ToolCallSpec("toolu_1", "json_answer", PIECES)])
    )
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0) as client:
        done = client.chat.completions.create(
            model="anthropic/claude-haiku-4-5",
            messages=[{"role": "user", "content": "Paris?"}],
            response_format=FORMAT,  # type: ignore[arg-type]
        )
    assert json.loads(done.choices[0].message.content or "") == {
        "city": "Paris",
        "population": 2100000,
    }
    assert done.choices[0].finish_reason == "stop" and not done.choices[0].message.tool_calls


def test_fanout_and_websocket_send_partials_too(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    openai_fake.for_model["gpt-4o-mini"] = Scenario(chunks=PIECES)
    openai_fake.for_model["gpt-4o"] = Scenario(chunks=PIECES)
    body = {
        "models": ["openai/gpt-4o-mini", "openai/gpt-4o"],
        "prompt": "Paris?",
        "response_format": FORMAT,
    }
    with httpx.stream("POST", gw.url + "/chat/fanout", json=body, timeout=15) as r:
        events = read_sse(r)
    objects = [e.json() for e in events if e.event == "object"]
    assert sorted(o["index"] for o in objects) == [0, 1]
    assert all(o["object"]["city"] == "Paris" for o in objects)

    with connect(gw.url.replace("http", "ws") + "/ws/chat") as ws:
        ws.send(
            json.dumps(
                {"model": "openai/gpt-4o-mini", "prompt": "Paris?", "response_format": FORMAT}
            )
        )
        frames = []
        while not frames or frames[-1]["type"] != "end":
            frames.append(json.loads(ws.recv(timeout=5)))
    types = [f["type"] for f in frames]
    assert "partial" in types and types[-2] == "object"
    assert frames[-2]["object"] == {"city": "Paris", "population": 2100000}


def test_a_resumable_stream_logs_the_partials(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    openai_fake.enqueue(Scenario(chunks=PIECES))
    body = {"model": "openai/gpt-4o-mini", "prompt": "Paris?", "response_format": FORMAT}
    created = httpx.post(gw.url + "/chat/streams", json=body, timeout=10).json()
    with httpx.stream("GET", gw.url + created["events_url"], timeout=15) as r:
        events = read_sse(r)
    obj = next(e for e in events if e.event == "object")
    assert obj.json()["object"]["population"] == 2100000
    assert obj.id.startswith(created["id"] + ":")  # numbered like every logged event


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ({"type": "xml"}, "type must be"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}},
            "not a valid",
        ),
        ({"type": "json_schema"}, "'name' and a 'schema'"),
    ],
)
def test_a_bad_response_format_is_a_400_naming_it(make_gateway, openai_fake, fmt, message):
    gw = make_gateway(openai_fake=openai_fake)
    for path, body in [
        ("/chat/stream", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ]:
        r = httpx.post(
            gw.url + path,
            json={"model": "openai/gpt-4o-mini", **body, "response_format": fmt},
            timeout=10,
        )
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "response_format" and message in err["message"]
    assert openai_fake.attempts == []


@pytest.mark.local_model
def test_the_local_model_follows_the_schema(make_gateway):
    gw = make_gateway(local_enabled=True)
    body = {
        "model": "local/smollm2-135m-instruct",
        "prompt": "What is the capital of France, and its population? Answer in JSON.",
        "max_tokens": 120,
        "response_format": FORMAT,
    }
    events = stream_events(gw, body)
    obj = next((e for e in events if e.event == "object"), None)
    assert obj is not None, [(e.event, e.data) for e in events]
    value = obj.json()["object"]
    assert isinstance(value["city"], str) and isinstance(value["population"], int)
    assert [e.event for e in events].count("partial") >= 2


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"$ref": "#/definitions/nope"}, "does not resolve"),
        ({"$ref": "https://example.com/schema.json"}, "only local references"),
        ({"type": "string", "minLength": 100_000_000}, "add up to more than"),
        (
            {"type": "object", "properties": {f"p{i}": {"maxLength": 5000} for i in range(5)}},
            "add up to more than",
        ),
    ],
    ids=["unresolvable-ref", "remote-ref", "huge-size", "sizes-add-up"],
)
def test_a_schema_that_could_hurt_the_gateway_is_a_400(make_gateway, openai_fake, schema, message):
    """An unresolvable $ref would fail the stream at its end; a huge size keyword would build
    a huge grammar for the local model: both are refused before anything runs."""
    gw = make_gateway(openai_fake=openai_fake)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    r = httpx.post(
        gw.url + "/chat/stream",
        json={"model": "openai/gpt-4o-mini", "prompt": "hi", "response_format": fmt},
        timeout=10,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format" and message in r.text
    assert openai_fake.attempts == []


def test_a_backtracking_pattern_cannot_hold_the_gateway(make_gateway, openai_fake):
    gw = make_gateway(openai_fake=openai_fake)
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^(a|aa)+$"}}}
    openai_fake.enqueue(Scenario(chunks=['{"name": "' + "a" * 60 + '!"}']))
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    started = time.monotonic()
    events = stream_events(
        gw, {"model": "openai/gpt-4o-mini", "prompt": "hi", "response_format": fmt}
    )
    assert time.monotonic() - started < 5  # Python's re would take centuries here
    error = next(e for e in events if e.event == "error").json()["error"]
    assert error["type"] == "invalid_output" and "budget" in error["message"]
    assert httpx.get(gw.url + "/healthz", timeout=2).status_code == 200


def test_partials_thin_out_as_the_answer_grows(make_gateway, openai_fake):
    """Each partial parses the whole text: past a short start, one goes out per eighth of
    growth, so a long answer costs linear work and bytes, not quadratic."""
    gw = make_gateway(openai_fake=openai_fake)
    words = ['{"text": "'] + ["word " for _ in range(400)] + ['"}']
    openai_fake.enqueue(Scenario(chunks=words, interval=0.002))
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    events = stream_events(
        gw, {"model": "openai/gpt-4o-mini", "prompt": "hi", "response_format": fmt}
    )
    partials = [e for e in events if e.event == "partial"]
    reads = len([e for e in events if e.event == "message" and e.data != "[DONE]"])
    assert 10 <= len(partials) <= 80 < reads, (len(partials), reads)
    assert next(e for e in events if e.event == "object").json()["object"]["text"] == "word " * 400
