"""Bad input gets a 4xx JSON error naming the problem; never a 500."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.fakes import OpenAIFake
from tests.harness import GatewayServer, fake_providers, make_settings

OK_MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gw(make_gateway, openai_fake):
    return make_gateway(
        openai_fake=openai_fake, default_model="openai/gpt-4o-mini", max_body_bytes=2048
    )


CASES = [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"", 400, "empty"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", {"model": "openai/gpt-4o-mini"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": OK_MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": OK_MSG, "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": OK_MSG, "temperature": 2.5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": OK_MSG, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": OK_MSG, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": OK_MSG, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": OK_MSG, "model": "nope/x"}, 404, "unknown provider"),
    ("/v1/chat/completions", {"messages": OK_MSG, "model": "mystery"}, 404, "unknown model"),
    ("/chat/stream", {}, 400, "prompt or messages"),
    ("/chat/stream", {"prompt": ""}, 400, "prompt"),
    ("/chat/stream", {"prompt": "   "}, 400, "prompt"),
    ("/chat/stream", {"prompt": 5}, 400, "prompt"),
    ("/chat/stream", {"prompt": "hi", "messages": OK_MSG}, 400, "not both"),
    ("/chat/stream", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/chat/stream", {"prompt": "hi", "model": "nope/x"}, 404, "available models"),
]


@pytest.mark.parametrize(("path", "body", "status", "words"), CASES)
def test_bad_bodies(gw, openai_fake, path, body, status, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(gw.url + path, headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"]
    assert "Traceback" not in r.text
    assert openai_fake.attempts == []


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"prompt": ""},
        {"prompt": "x", "max_tokens": "many"},
        {"prompt": "x", "temperature": "warm"},
    ],
)
def test_bad_get_queries(gw, query):
    r = httpx.get(gw.url + "/chat/stream", params=query)
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_body_over_the_limit(gw, openai_fake):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    r = httpx.post(gw.url + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and "2048" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds for chunked bodies too
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}]}'

    r = httpx.post(
        gw.url + "/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert openai_fake.attempts == []


def test_unknown_route_and_method(gw):
    r = httpx.get(gw.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.delete(gw.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


# -- structural limits (issue 11): depth, model length, stop, odd query values ------------

POST_ROUTES = ["/v1/chat/completions", "/chat/stream", "/chat/streams", "/chat/fanout"]
FANOUT_MODELS = ["openai/gpt-4o-mini", "openai/gpt-4o"]


def nested(depth: int) -> dict:
    """``{"a": {"a": ... {}}}``, ``depth`` objects deep."""
    node: dict = {}
    for _ in range(depth - 1):
        node = {"a": node}
    return node


def valid_body(path: str) -> dict:
    """A body the route accepts, to make one field of it bad."""
    if path == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": "hi"}]}
    if path == "/chat/fanout":
        return {"prompt": "hi", "models": FANOUT_MODELS}
    return {"prompt": "hi"}


@pytest.fixture(scope="module")
def strict_env():
    """One gateway for the module (its limits small, so that bodies past them stay small)."""
    fake = OpenAIFake().start()
    settings = make_settings(
        providers=fake_providers(fake),
        default_model="openai/gpt-4o-mini",
        max_json_depth=8,
        max_model_length=40,
        max_list_items=100,
    )
    gw = GatewayServer(settings).start()
    yield gw, fake
    gw.stop()
    fake.stop()
    assert not fake.errors


@pytest.fixture
def strict_gw(strict_env):
    strict_env[1].reset_record()
    return strict_env[0]


@pytest.fixture
def strict_fake(strict_env):
    return strict_env[1]


def post(gw, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(
        gw.url + path, content=content, headers={"content-type": "application/json"}, timeout=10
    )


def assert_refused(r: httpx.Response, status: int, code: str, param: str | None, *words: str):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")  # never a stream
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    for word in words:
        assert word in err["message"], err


def refusals(gw, limit: str) -> float:
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(f'gateway_limit_refusals_total{{limit="{limit}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("path", POST_ROUTES)
def test_json_nested_too_deep_anywhere_is_a_400_naming_the_path(strict_gw, strict_fake, path):
    deep = nested(8)  # 8 objects inside the body: 9 levels
    bodies = {
        "response_format": {**valid_body(path), "response_format": deep},
        "tools": {
            **valid_body(path),
            "tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}],
        },
        "messages": {
            **({"models": FANOUT_MODELS} if path == "/chat/fanout" else {}),
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "image_url", "image_url": deep},
                    ],
                }
            ],
        },
        "x": {**valid_body(path), "x": [[[[[[[[[]]]]]]]]]},  # unknown fields too
    }
    expected = {
        "response_format": "response_format.a.a.a.a.a.a.a",
        "tools": "tools[0].function.parameters.a.a.a.a",
        "messages": "messages[0].content[1].image_url.a.a.a",
        "x": "x[0][0][0][0][0][0][0]",
    }
    before = refusals(strict_gw, "json_depth")
    for field, body in bodies.items():
        r = post(strict_gw, path, body)
        assert_refused(r, 400, "json_too_deep", field, "8 levels")
        assert r.json()["error"]["message"].startswith(expected[field] + ": "), r.text
    # One level less is accepted (the fake answers); an unknown field is ignored.
    ok = {**valid_body(path), "x": nested(7)}
    assert post(strict_gw, path, ok).status_code in (200, 201)
    strict_fake.wait_for_attempts(1)  # /chat/streams answers before its upstream call
    assert refusals(strict_gw, "json_depth") == before + len(bodies)


@pytest.mark.parametrize("path", POST_ROUTES)
def test_json_past_the_parsers_own_limit_is_a_clear_400(strict_gw, strict_fake, path):
    r = post(strict_gw, path, b'{"messages": ' + b"[" * 1100 + b"]" * 1100 + b"}")
    assert_refused(r, 400, "json_too_deep", None, "nested deeper than 8 levels")
    assert "Traceback" not in r.text and strict_fake.attempts == []


@pytest.mark.parametrize("path", POST_ROUTES)
def test_a_model_name_over_the_limit_is_a_400(strict_gw, strict_fake, path):
    before = refusals(strict_gw, "model_length")
    name = "openai/" + "m" * 40
    if path == "/chat/fanout":
        r = post(strict_gw, path, {"prompt": "hi", "models": ["openai/gpt-4o", name]})
        assert_refused(r, 400, "model_too_long", "models", "40 characters")
    else:
        r = post(strict_gw, path, {**valid_body(path), "model": name})
        assert_refused(r, 400, "model_too_long", "model", "40 characters")
    r = httpx.get(strict_gw.url + "/chat/stream", params={"prompt": "hi", "model": name})
    assert_refused(r, 400, "model_too_long", "model")
    assert strict_fake.attempts == []
    assert refusals(strict_gw, "model_length") == before + 2


@pytest.mark.parametrize("path", POST_ROUTES)
def test_a_stop_list_over_the_limit_names_stop(strict_gw, strict_fake, path):
    r = post(strict_gw, path, {**valid_body(path), "stop": ["a", "b", "c", "d", "e"]})
    assert_refused(r, 400, "invalid_value", "stop", "stop: at most 4")
    r = post(strict_gw, path, {**valid_body(path), "stop": [1]})
    assert_refused(r, 400, "invalid_value", "stop.0")
    assert strict_fake.attempts == []


def test_a_message_part_of_an_unknown_type_names_its_type(strict_gw):
    body = {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}
    r = post(strict_gw, "/v1/chat/completions", body)
    assert_refused(r, 400, "invalid_value", "messages.0.content.0.type", "'text'")


@pytest.mark.parametrize("url", [None, 5, {"u": "x"}, ""])
def test_an_image_part_needs_a_url_string(strict_gw, strict_fake, url):
    part = {"type": "image_url", "image_url": {"url": url}}
    r = post(strict_gw, "/chat/stream", {"messages": [{"role": "user", "content": [part]}]})
    assert_refused(r, 400, "invalid_value", "messages.0.content.0.image_url.url")
    assert strict_fake.attempts == []


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"max_tokens": "abc"}, "max_tokens"),
        ({"max_tokens": "1.5"}, "max_tokens"),
        ({"max_tokens": "9" * 5000}, "max_tokens"),
        ({"max_tokens": "0"}, "max_tokens"),
        ({"temperature": "NaN"}, "temperature"),
        ({"temperature": "-inf"}, "temperature"),
        ({"temperature": "3"}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_odd_query_values_name_the_param(strict_gw, strict_fake, query, param):
    r = httpx.get(strict_gw.url + "/chat/stream", params={"prompt": "hi", **query})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert strict_fake.attempts == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "models": ["openai/a"]}, "models"),
        ({"prompt": "hi", "models": "openai/a"}, "models"),
        ({"prompt": "hi", "models": ["openai/a", ""]}, "models.1"),
        ({"prompt": "hi", "models": ["openai/a", 5]}, "models.1"),
        ({"prompt": "hi", "models": [f"openai/m{i}" for i in range(5)]}, "models"),
        ({"models": FANOUT_MODELS}, None),
        ({"prompt": "hi", "models": FANOUT_MODELS, "model": "openai/a"}, None),
        ({"prompt": "hi", "models": FANOUT_MODELS, "max_tokens": "5"}, "max_tokens"),
    ],
)
def test_fanout_bad_bodies_answer_json_before_any_stream(strict_gw, strict_fake, body, param):
    r = post(strict_gw, "/chat/fanout", body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["param"] == param
    assert strict_fake.attempts == []


def test_bad_input_while_draining_is_still_a_400_not_shutting_down(gw):
    gw.call(lambda: setattr(gw.app.state.gateway.dispatch, "draining", True))
    for path in POST_ROUTES:
        r = post(gw, path, {**valid_body(path), "stop": ["a"] * 5})
        assert_refused(r, 400, "invalid_value", "stop")
    r = httpx.get(gw.url + "/chat/stream", params={"prompt": "hi", "max_tokens": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post(gw, "/chat/stream", {"prompt": "hi"})  # a good one: the drain answers
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("messages", [1] * 50_000, "messages"),
        ("messages", [{"role": "user", "content": [{"type": "x"}] * 50_000}], "messages"),
        ("tools", [{"type": "function"}] * 50_000, "tools"),
    ],
    ids=["messages", "content-parts", "tools"],
)
def test_a_list_over_the_limit_is_refused_before_validation(strict_gw, field, value, param):
    # Validating (and describing) 50,000 wrong items would hold the event loop for
    # seconds; the walk that checks depth refuses the list first.
    before = refusals(strict_gw, "list_items")
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    body[field] = value
    r = post(strict_gw, "/v1/chat/completions", body)
    assert_refused(r, 400, "list_too_long", param, "longer than 100 items")
    assert refusals(strict_gw, "list_items") == before + 1
    assert r.elapsed.total_seconds() < 1.0
