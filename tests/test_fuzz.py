"""Generated bodies against the generation routes of a running gateway: never a 5xx or a traceback.

Hypothesis throws random JSON (nested dicts, lists, strings, numbers, booleans,
null) and near-valid bodies (a valid body with one field replaced, added or
removed, at the top or inside a message or tool) at every generation route, and
random query strings at ``GET /chat/stream``. The fake upstreams answer every
request normally, so any 5xx is the gateway's own bug. Refusals must be the
JSON error shape; accepted requests must stream to a clean end.

Bounded and reproducible: ``derandomize=True`` and a fixed number of examples
per route (a few seconds each).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fakes import AnthropicFake, OpenAIFake
from tests.harness import GatewayServer, fake_providers, make_settings

ROUTES = ["/v1/chat/completions", "/chat/stream", "/chat/streams", "/chat/fanout"]
MODELS = ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5", "compat/Qwen3-8B"]

FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[GatewayServer, httpx.Client]]:
    """One gateway for the module (Hypothesis runs many examples per test function)."""
    openai_fake, anthropic_fake = OpenAIFake().start(), AnthropicFake().start()
    gw = GatewayServer(
        make_settings(
            providers=fake_providers(openai_fake, anthropic_fake),
            default_model="openai/gpt-4o-mini",
            max_json_depth=16,
        )
    ).start()
    client = httpx.Client(base_url=gw.url, timeout=10)
    try:
        yield gw, client
    finally:
        client.close()
        gw.stop()
        openai_fake.stop()
        anthropic_fake.stop()
    assert not openai_fake.errors and not anthropic_fake.errors


# -- strategies ----------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)

# Names the routes know, so that random bodies reach the validators, not only "unknown field".
FIELDS = [
    "model", "models", "messages", "prompt", "system", "stream", "stream_options", "max_tokens",
    "max_completion_tokens", "temperature", "top_p", "n", "stop", "tools", "tool_choice", "seed",
    "response_format", "presence_penalty", "frequency_penalty", "user", "parallel_tool_calls",
    "logit_bias",
]  # fmt: skip
random_bodies = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6
)

MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id"]


def valid_body(path: str, model: str, stream: bool) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    if path == "/v1/chat/completions":
        return {"model": model, "messages": messages, "tools": tools, "stream": stream}
    if path == "/chat/fanout":
        return {"messages": messages, "models": [model, MODELS[0]], "max_tokens": 5}
    return {"model": model, "messages": messages, "stop": ["\n"]}


@st.composite
def near_valid_bodies(draw: st.DrawFn, path: str) -> dict[str, Any]:
    """A valid body with one field replaced, added or removed (top level or nested)."""
    body = valid_body(path, draw(st.sampled_from(MODELS)), draw(st.booleans()))
    where = draw(st.sampled_from(["top", "message", "part", "image", "call", "tool"]))
    if where == "top":
        target: dict[str, Any] = body
        key = draw(st.sampled_from(FIELDS))
    elif where == "message":
        target = draw(st.sampled_from(body["messages"]))
        key = draw(st.sampled_from(MESSAGE_FIELDS))
    elif where == "part":
        target = draw(st.sampled_from(body["messages"][1]["content"]))
        key = draw(st.sampled_from(["type", "text", "image_url"]))
    elif where == "image":
        target, key = body["messages"][1]["content"][1]["image_url"], "url"
    elif where == "call":
        call = body["messages"][2]["tool_calls"][0]
        target = draw(st.sampled_from([call, call["function"]]))
        key = draw(st.sampled_from(["id", "type", "function", "name", "arguments"]))
    else:
        body.setdefault("tools", [{"type": "function", "function": {"name": "g"}}])
        target = body["tools"][0]["function"]
        key = draw(st.sampled_from(["name", "parameters", "description"]))
    if draw(st.integers(0, 5)) == 0:
        target.pop(key, None)
    else:
        target[key] = draw(json_values)
    return body


query_values = st.text(max_size=12) | st.sampled_from(["NaN", "inf", "-1", "1e9", "0x10", "2"])
queries = st.dictionaries(
    st.sampled_from(
        ["prompt", "model", "system", "max_tokens", "temperature", "stop", "last_event_id", "x"]
    ),
    query_values,
    max_size=5,
)


# -- checks --------------------------------------------------------------------------------


def check(client: httpx.Client, r: httpx.Response, sent: Any) -> None:
    text = r.text
    event(f"status {r.status_code}")  # --hypothesis-show-statistics
    assert r.status_code < 500, (r.status_code, text[:500], sent)
    assert "Traceback" not in text, sent
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), sent
        err = r.json()["error"]
        assert set(err) == {"message", "type", "code", "param"}, err
        assert isinstance(err["message"], str) and err["message"] and err["type"], err
        return
    if r.status_code == 201:  # /chat/streams: its events must end cleanly too
        events = client.get(r.json()["events_url"])
        assert events.status_code in (200, 204), events.text[:500]
        text = events.text
    if r.headers["content-type"].startswith("text/event-stream"):
        # The fake answers every request: a clean end, no error event.
        assert text.rstrip().endswith("data: [DONE]"), (text[-500:], sent)
        assert "event: error" not in text and '"error"' not in text, (text[-500:], sent)
        if r.request.url.path == "/chat/fanout":
            assert text.count("event: end") == len(sent["models"]), (text, sent)


def send(client: httpx.Client, path: str, body: Any) -> None:
    r = client.post(path, content=orjson.dumps(body), headers={"content-type": "application/json"})
    check(client, r, body)


# -- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ROUTES)
@FUZZ
@given(body=random_bodies)
def test_random_bodies(env, path, body):
    send(env[1], path, body)


@pytest.mark.parametrize("path", ROUTES)
@FUZZ
@given(data=st.data())
def test_near_valid_bodies(env, path, data):
    send(env[1], path, data.draw(near_valid_bodies(path)))


@FUZZ
@given(body=json_values | st.binary(max_size=64))
def test_any_json_or_bytes(env, body):
    client = env[1]
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    for path in ROUTES:
        r = client.post(path, content=content, headers={"content-type": "application/json"})
        check(client, r, body)


@FUZZ
@given(query=queries)
def test_get_stream_queries(env, query):
    client = env[1]
    check(client, client.get("/chat/stream", params=query), query)
