"""The Gemini provider kind: its pure translation both ways, and the gateway in front of
the Gemini fake (tests/fakes/gemini.py) through the OpenAI SDK and the simple protocol."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import openai
import orjson
import pydantic
import pytest

from app.errors import InvalidRequest, UpstreamAuthFailed, UpstreamStatus
from app.events import Finish, TextDelta, ToolCallDelta, Usage
from app.logs import JsonFormatter
from app.providers.errors import Scrubber
from app.providers.gemini import (
    SKIP_SIGNATURE,
    GeminiNormaliser,
    api_base,
    build_body,
    gemini_status,
    model_ids,
    model_path,
)
from app.providers.sse import SSEDecoder
from app.requests import ChatRequest
from tests.fakes import Scenario, ToolCallSpec
from tests.fakes.gemini import GeminiFake
from tests.harness import read_sse

KEY = "AIzaSyTEST-gemini-upstream-key-012345678"
MODEL = "gemini/gemini-2.5-flash"
MSG = [{"role": "user", "content": "hi"}]


# -- pure: the answer, from recorded bytes --------------------------------------------------

# A function call as gemini-2.5-flash streams it (recorded; signature shortened): the call
# whole in one part, the finish and the full usage (thinking included) in the same chunk.
RECORDED_CALL = (
    b'data: {"candidates": [{"content": {"parts": [{"functionCall": {"name": "getWeather",'
    b'"args": {"location": "Tokyo"}},"thoughtSignature": "CikBcsjafFK168Ibt"}],'
    b'"role": "model"},"finishReason": "STOP","index": 0,'
    b'"finishMessage": "Model generated function call(s)."}],"usageMetadata": '
    b'{"promptTokenCount": 83,"candidatesTokenCount": 14,"totalTokenCount": 201,'
    b'"promptTokensDetails": [{"modality": "TEXT","tokenCount": 83}],"thoughtsTokenCount": 104},'
    b'"modelVersion": "gemini-2.5-flash","responseId": "qpc2afWVFJK4vr0Pq6WiyAU"}\r\n\r\n'
)

# Text as Gemini 3 streams it: CRLF CRLF framing, usage in every chunk, and a last chunk
# with an empty text part (its thought signature) and the finish.
RECORDED_TEXT = (
    b'data: {"candidates": [{"content": {"role": "model","parts": [{"text": "Hello!\\n"}]}}],'
    b'"usageMetadata": {"promptTokenCount": 4,"totalTokenCount": 4},'
    b'"modelVersion": "gemini-3-flash-preview","responseId": "tTCwacuEBMvnitYP06qsgQY"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"role": "model","parts": '
    b'[{"text": "a\xe2\x80\xa8b \xc3\xa9"}]}}],'
    b'"usageMetadata": {"promptTokenCount": 4,"totalTokenCount": 4},'
    b'"modelVersion": "gemini-3-flash-preview","responseId": "tTCwacuEBMvnitYP06qsgQY"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"role": "model","parts": [{"text": "",'
    b'"thoughtSignature": "AY89a18iOcFus5wr5bW5"}]},"finishReason": "STOP"}],'
    b'"usageMetadata": {"promptTokenCount": 4,"candidatesTokenCount": 9,"totalTokenCount": 13},'
    b'"modelVersion": "gemini-3-flash-preview","responseId": "tTCwacuEBMvnitYP06qsgQY"}\r\n\r\n'
)


def normalise(raw: bytes, step: int | None = None) -> list[Any]:
    """Decode ``raw`` as the provider does, in reads of ``step`` bytes (all at once: None)."""
    decoder, norm = SSEDecoder(), GeminiNormaliser()
    events: list[Any] = []
    size = step or len(raw)
    for at in range(0, len(raw), size):
        for _name, data in decoder.feed(raw[at : at + size]):
            events += norm.feed(orjson.loads(data))
    return events


def test_a_recorded_function_call_is_one_whole_delta():
    (call, usage, finish) = normalise(RECORDED_CALL)
    assert isinstance(call, ToolCallDelta)
    assert (call.index, call.name, call.arguments) == (0, "getWeather", '{"location":"Tokyo"}')
    assert call.id is not None and call.id.startswith("call_") and len(call.id) == 29
    # Thinking is output as OpenAI counts it: candidates + thoughts.
    assert (usage.input_tokens, usage.output_tokens) == (83, 14 + 104)
    assert finish == Finish("tool_calls")


@pytest.mark.parametrize("step", [None, 1, 7])
def test_recorded_text_in_any_split_of_reads(step):
    """CRLF framing, U+2028 inside the text and a character split across reads."""
    events = normalise(RECORDED_TEXT, step)
    assert events == [
        TextDelta("Hello!\n"),
        Usage(4, None),  # the prompt's count once, early: a cut later still reports it
        TextDelta("a\u2028b \u00e9"),
        Usage(4, 9),
        Finish("stop"),
    ]


def test_thought_summaries_and_empty_parts_are_not_the_answer():
    chunk = {
        "candidates": [
            {
                "content": {
                    "parts": [{"text": "thinking...", "thought": True}, {"text": ""}, {"text": "A"}]
                }
            }
        ]
    }
    assert GeminiNormaliser().feed(chunk) == [TextDelta("A")]


def test_a_call_without_args_is_an_empty_object_and_calls_are_numbered():
    norm = GeminiNormaliser()
    parts = [{"functionCall": {"name": "now"}}, {"functionCall": {"name": "w", "args": {"c": 1}}}]
    first, second = norm.feed({"candidates": [{"content": {"parts": parts}}]})
    assert (first.index, first.name, first.arguments) == (0, "now", "{}")
    assert (second.index, second.arguments) == (1, '{"c":1}')
    assert first.id != second.id


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("LANGUAGE", "stop"),
        ("OTHER", "stop"),
    ],
)
def test_finish_reasons(reason, expected):
    events = GeminiNormaliser().feed({"candidates": [{"finishReason": reason}]})
    assert events == [Finish(expected)]


def test_a_prompt_blocked_before_any_candidate_is_a_content_filter_finish():
    chunk = {
        "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
        "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
    }
    assert GeminiNormaliser().feed(chunk) == [Usage(7, 0), Finish("content_filter")]


def test_an_error_inside_the_stream_is_raised_scrubbed():
    norm = GeminiNormaliser("gemini", Scrubber([KEY]))
    error = {"error": {"code": 503, "message": f"overloaded ({KEY})", "status": "UNAVAILABLE"}}
    with pytest.raises(UpstreamStatus) as caught:
        norm.feed(error)
    assert caught.value.upstream_status == 503 and caught.value.is_retryable
    assert KEY not in caught.value.message and caught.value.code == "unavailable"


# -- pure: the request --------------------------------------------------------------------


def req(**kw: Any) -> ChatRequest:
    return ChatRequest(model="gemini-2.5-flash", **{"messages": MSG, **kw})


def test_messages_become_contents():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "where", "arguments": ""},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_b", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_a", "content": "Paris"},
        {"role": "user", "content": "Thanks"},
    ]
    body = build_body(req(messages=messages))
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief.\n\nUse metric."}]}
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "Weather here?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
            ],
        },
        {
            "role": "model",
            "parts": [
                # The first call of a turn carries Google's placeholder signature.
                {"functionCall": {"name": "where", "args": {}}, "thoughtSignature": SKIP_SIGNATURE},
                {"functionCall": {"name": "weather", "args": {"city": "Paris"}}},
            ],
        },
        {
            # Results are matched to calls by name; one user turn, alternating roles.
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "weather", "response": {"temp": 21}}},
                {"functionResponse": {"name": "where", "response": {"output": "Paris"}}},
                {"text": "Thanks"},
            ],
        },
    ]


def test_a_tool_result_for_an_unknown_call_is_a_400_naming_messages():
    messages = [*MSG, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]
    with pytest.raises(InvalidRequest) as caught:
        build_body(req(messages=messages))
    assert caught.value.param == "messages"


def test_sampling_structured_output_and_tools():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    weather = {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    now = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    body = build_body(
        req(
            max_tokens=50,
            temperature=1.5,
            top_p=0.9,
            stop=["END"],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            tools=[weather, now],
            tool_choice={"type": "function", "function": {"name": "weather"}},
        )
    )
    assert body["generationConfig"] == {
        "maxOutputTokens": 50,
        "temperature": 1.5,
        "topP": 0.9,
        "stopSequences": ["END"],
        "responseMimeType": "application/json",
        "responseJsonSchema": schema,
    }
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "weather",
                    "description": "Weather",
                    "parametersJsonSchema": weather["function"]["parameters"],
                },
                {"name": "now"},  # no parameters: left unset
            ]
        }
    ]
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}
    }
    plain = build_body(req(response_format={"type": "json_object"}))
    assert plain["generationConfig"] == {"responseMimeType": "application/json"}
    assert "tools" not in plain and "toolConfig" not in plain


@pytest.mark.parametrize(
    ("choice", "mode"),
    [("auto", {"mode": "AUTO"}), ("none", {"mode": "NONE"}), ("required", {"mode": "ANY"})],
)
def test_tool_choice_modes(choice, mode):
    tool = {"type": "function", "function": {"name": "f"}}
    body = build_body(req(tools=[tool], tool_choice=choice))
    assert body["toolConfig"] == {"functionCallingConfig": mode}


def test_model_ids_stay_one_path_segment():
    assert model_path("gemini-2.5-flash") == "models/gemini-2.5-flash"
    assert model_path("models/gemini-2.5-pro") == "models/gemini-2.5-pro"
    assert model_path("tunedModels/my-model") == "tunedModels/my-model"
    assert model_path("x/../../files?key=1:generateContent") == (
        "models/x%2F..%2F..%2Ffiles%3Fkey%3D1%3AgenerateContent"
    )


def test_api_base():
    assert api_base(None) == "https://generativelanguage.googleapis.com/v1beta"
    assert api_base("http://proxy:8080/") == "http://proxy:8080/v1beta"
    assert api_base("http://proxy:8080/google/v1beta") == "http://proxy:8080/google/v1beta"


def test_model_list_keeps_what_can_generate():
    listing = {
        "models": [
            {"name": "models/gemini-2.5-flash", "supportedGenerationMethods": ["generateContent"]},
            {"name": "models/text-embedding-004", "supportedGenerationMethods": ["embedContent"]},
            {"name": "models/future"},
        ]
    }
    assert model_ids(listing) == ["gemini-2.5-flash", "future"]
    assert model_ids({"error": {}}) == []


# -- pure: errors before the stream ---------------------------------------------------------


def _err(error: dict[str, Any]) -> bytes:
    return orjson.dumps({"error": error})


def test_429_says_when_to_come_back_from_retry_info_or_the_header():
    body = _err(
        {
            "code": 429,
            "message": "You exceeded your current quota.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "38s"},
            ],
        }
    )
    found = gemini_status(429, body, None, "gemini")
    assert isinstance(found, UpstreamStatus) and found.is_retryable
    assert (found.retry_after, found.http_status, found.code) == (38.0, 429, "resource_exhausted")
    assert found.body()["error"]["type"] == "rate_limit_error"
    assert gemini_status(429, body, "5", "gemini").retry_after == 5.0


def test_400_is_final_and_names_the_field():
    body = _err(
        {
            "code": 400,
            "message": "Invalid value at 'contents[0].role'",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "contents[0].role", "description": "bad"}],
                }
            ],
        }
    )
    found = gemini_status(400, body, None, "gemini")
    assert isinstance(found, UpstreamStatus) and not found.is_retryable
    assert (found.http_status, found.code, found.param) == (
        400,
        "invalid_argument",
        "contents[0].role",
    )


def test_a_prompt_too_long_is_a_context_length_rejection():
    message = (
        "The input token count (1234567) exceeds the maximum number of tokens allowed (1048576)."
    )
    found = gemini_status(400, _err({"code": 400, "message": message}), None, "gemini")
    assert isinstance(found, UpstreamStatus)
    assert (found.reason, found.code) == ("context_length", "context_length_exceeded")


def test_a_bad_key_is_the_gateways_credentials_even_as_a_400():
    body = _err(
        {
            "code": 400,
            "message": f"API key not valid: {KEY}",
            "status": "INVALID_ARGUMENT",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
            ],
        }
    )
    found = gemini_status(400, body, None, "gemini")
    assert isinstance(found, UpstreamAuthFailed) and KEY not in found.message
    assert isinstance(gemini_status(403, b"", None, "gemini"), UpstreamAuthFailed)


def test_an_unreadable_error_body_still_maps_by_status():
    found = gemini_status(503, b"<html>Service Unavailable</html>", None, "gemini")
    assert isinstance(found, UpstreamStatus) and found.http_status == 503 and found.is_retryable


# -- through the gateway ------------------------------------------------------------------


def gemini_provider(fake: GeminiFake, **extra: Any) -> dict[str, Any]:
    return {"gemini": {"kind": "gemini", "base_url": fake.base_url, "api_key": KEY, **extra}}


@pytest.fixture
def gw(make_gateway, gemini_fake):
    gemini_fake.api_key = KEY  # the fake refuses any other key, as Google does
    return make_gateway(
        providers=gemini_provider(gemini_fake),
        default_model=MODEL,
        first_token_timeout_s=1.0,
        idle_timeout_s=0.5,
        total_timeout_s=5.0,
        connect_timeout_s=1.0,
        max_retries=0,
    )


@pytest.fixture
def client(gw):
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def simple(gw, **body: Any) -> tuple[httpx.Response, list[Any]]:
    with httpx.stream(
        "POST", gw.url + "/chat/stream", json={"prompt": "hi", **body}, timeout=10
    ) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, read_sse(r)


def ending(events: list[Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(error payload or None, end payload); exactly one end, then [DONE]."""
    assert events[-1].data == "[DONE]" and events[-2].event == "end"
    assert [e.event for e in events].count("end") == 1
    error = events[-3].json()["error"] if events[-3].event == "error" else None
    return error, events[-2].json()


def texts(events: list[Any]) -> list[str]:
    return [e.json()["content"] for e in events if e.event == "message" and e.data != "[DONE]"]


def test_openai_sdk_stream_with_usage(client, gemini_fake):
    gemini_fake.default = Scenario(chunks=["Hel", "lo", " there"], input_tokens=9, output_tokens=3)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "Be kind."}, *MSG],
            max_tokens=64,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert {c.model for c in chunks} == {MODEL}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (9, 3)
    (sent,) = gemini_fake.attempts
    assert sent.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert sent.query == "alt=sse"  # the key is never in the URL
    assert sent.headers["x-goog-api-key"] == KEY and "authorization" not in sent.headers
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "systemInstruction": {"parts": [{"text": "Be kind."}]},
        "generationConfig": {"maxOutputTokens": 64},
    }


def test_openai_sdk_without_streaming(client, gemini_fake):
    gemini_fake.default = Scenario(chunks=["Hello", " world"], input_tokens=5, output_tokens=2)
    result = client.chat.completions.create(model=MODEL, messages=MSG, temperature=0.3)
    assert result.choices[0].message.content == "Hello world"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None and result.usage.total_tokens == 7
    assert gemini_fake.attempts[0].body["generationConfig"] == {"temperature": 0.3}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


class GetTime(pydantic.BaseModel):
    """The current time; takes no arguments."""


def test_tool_calls_and_their_results_round_trip(client, gemini_fake):
    calls = [
        ToolCallSpec("ignored", "get_weather", ['{"city": ', '"Paris"}']),
        ToolCallSpec("ignored", "GetTime", []),
    ]
    gemini_fake.enqueue(
        Scenario(chunks=["Checking."], tool_calls=calls, finish_reason="tool_calls"),
        Scenario(chunks=["21 degrees at noon."]),
    )
    tools = [WEATHER, openai.pydantic_function_tool(GetTime)]
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MSG, tools=tools, tool_choice="auto", stream=True
        )
    )
    found: dict[int, Any] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls if c.choices else None) or ():
            found[tc.index] = tc
    assert [(t.function.name, t.function.arguments) for t in found.values()] == [
        ("get_weather", '{"city":"Paris"}'),
        ("GetTime", "{}"),
    ]
    assert all(t.id.startswith("call_") for t in found.values())
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    first = gemini_fake.attempts[0].body
    assert [d["name"] for d in first["tools"][0]["functionDeclarations"]] == [
        "get_weather",
        "GetTime",
    ]
    assert first["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    # The client runs the tools and sends the results back under the ids it got.
    history = [
        *MSG,
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": t.id,
                    "type": "function",
                    "function": {"name": t.function.name, "arguments": t.function.arguments},
                }
                for t in found.values()
            ],
        },
        {"role": "tool", "tool_call_id": found[1].id, "content": "12:00"},
        {"role": "tool", "tool_call_id": found[0].id, "content": '{"temp": 21}'},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=tools)
    assert answer.choices[0].message.content == "21 degrees at noon."
    contents = gemini_fake.attempts[1].body["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    assert contents[2]["parts"] == [
        {"functionResponse": {"name": "GetTime", "response": {"output": "12:00"}}},
        {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
    ]


def test_the_sdk_tool_helper_parses_a_zero_argument_call(client, gemini_fake):
    call = Scenario(chunks=[], tool_calls=[ToolCallSpec("x", "GetTime", [])], finish_reason="stop")
    gemini_fake.enqueue(call)
    with client.chat.completions.stream(
        model=MODEL,
        messages=MSG,
        tools=[openai.pydantic_function_tool(GetTime)],  # type: ignore[list-item]
    ) as stream:
        final = stream.get_final_completion()
    (tc,) = final.choices[0].message.tool_calls or []
    assert tc.function.arguments == "{}"
    assert tc.function.parsed_arguments == GetTime()  # type: ignore[union-attr]
    # A tool-only answer: content null, as OpenAI sends it; STOP with a call is tool_calls.
    assert final.choices[0].message.content is None
    assert final.choices[0].finish_reason == "tool_calls"


def test_simple_protocol_text_tools_and_end(gw, gemini_fake):
    gemini_fake.default = Scenario(
        chunks=["a", "b"],
        tool_calls=[ToolCallSpec("x", "get_weather", ['{"city":"Oslo"}'])],
        finish_reason="tool_calls",
        input_tokens=12,
        output_tokens=4,
    )
    r, events = simple(gw, tools=[WEATHER], tool_choice="required")
    assert r.status_code == 200
    assert [e.event for e in events] == [
        "start",
        "message",
        "message",
        "tool_call",
        "end",
        "message",
    ]
    assert events[0].json()["model"] == MODEL and events[0].json()["provider"] == "gemini"
    call = events[3].json()
    assert (call["index"], call["name"], call["arguments"]) == (0, "get_weather", '{"city":"Oslo"}')
    error, end = ending(events)
    assert error is None and end["finish_reason"] == "tool_calls"
    assert end["usage"] == {"input_tokens": 12, "output_tokens": 4}
    assert gemini_fake.attempts[0].body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ("length", "length"),
        ("content_filter", "content_filter"),
        ("RECITATION", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("OTHER", "stop"),
    ],
)
def test_finish_reasons_reach_the_client(gw, client, gemini_fake, upstream, expected):
    gemini_fake.default = Scenario(chunks=["x"], finish_reason=upstream)
    _r, events = simple(gw)
    error, end = ending(events)
    assert error is None and end["finish_reason"] == expected
    result = client.chat.completions.create(model=MODEL, messages=MSG)
    assert result.choices[0].finish_reason == expected


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [(429, "7", 429), (429, None, 429), (500, None, 502), (503, None, 503), (404, None, 404)],
)
def test_upstream_error_status_before_the_stream(gw, gemini_fake, status, retry_after, expected):
    gemini_fake.enqueue(Scenario(fault="status", status=status, retry_after=retry_after))
    r, _ = simple(gw)
    assert r.status_code == expected
    error = r.json()["error"]
    assert error["message"] and error["code"]
    if retry_after is not None:
        assert r.headers["retry-after"] == retry_after  # the upstream's, kept
    elif expected in (429, 503):
        assert int(r.headers["retry-after"]) >= 1
    r, events = simple(gw)  # healthy right after
    assert r.status_code == 200 and ending(events)[0] is None


def test_a_400_is_passed_on_and_not_retried(make_gateway, gemini_fake):
    gw = make_gateway(providers=gemini_provider(gemini_fake), default_model=MODEL, max_retries=2)
    gemini_fake.enqueue(
        Scenario(fault="status", status=400, error_message="Invalid value at 'contents[0]'")
    )
    r, _ = simple(gw)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Invalid value at 'contents[0]'"
    assert r.json()["error"]["code"] == "invalid_argument"
    assert len(gemini_fake.attempts) == 1


def test_the_gateways_key_refused_is_a_502_without_the_key(make_gateway, gemini_fake):
    gemini_fake.api_key = "AIzaSy-the-right-key-is-another-one-000"
    gw = make_gateway(providers=gemini_provider(gemini_fake), default_model=MODEL)
    r, _ = simple(gw)
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_auth_error"
    assert KEY not in r.text


@pytest.mark.parametrize("route", ["/chat/stream", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("fault", "error_type"),
    [("cut", "upstream_truncated"), ("malformed", "upstream_truncated"), ("stall", "timeout")],
)
def test_mid_stream_faults_end_honestly(gw, gemini_fake, route, fault, error_type):
    gemini_fake.default = Scenario(chunks=["a", "b", "c"], fault=fault, fault_after=2)
    if route == "/chat/stream":
        _r, events = simple(gw)
        error, end = ending(events)
        assert error is not None and error["type"] == error_type
        assert end["finish_reason"] == ("timeout" if fault == "stall" else "error")
        # What was sent is a prefix (a cut may take bytes read but not yet handed over).
        assert texts(events) == ["a", "b"][: len(texts(events))]
    else:
        body = {"model": MODEL, "messages": MSG, "stream": True}
        with httpx.stream("POST", gw.url + route, json=body, timeout=10) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        # OpenAI's way: an error object as the last chunk before [DONE], no finish_reason stop.
        assert lines[-1] == "data: [DONE]"
        last = orjson.loads(lines[-2].removeprefix("data: "))
        assert last["error"]["type"] == error_type
        finishes = [
            c["choices"][0].get("finish_reason")
            for c in map(lambda line: orjson.loads(line[6:]), lines[:-2])
            if c.get("choices")
        ]
        assert "stop" not in finishes
    if fault != "malformed":  # (after which the fake ends its body: pooled, not closed)
        gemini_fake.wait_closed(0, timeout=2)


def test_an_error_event_inside_the_stream(gw, gemini_fake):
    gemini_fake.default = Scenario(
        chunks=["a", "b"],
        fault="error_event",
        fault_after=1,
        error_type="UNAVAILABLE",
        error_message="The model is overloaded.",
    )
    _r, events = simple(gw)
    error, end = ending(events)
    assert error is not None and error["message"] == "The model is overloaded."
    assert end["finish_reason"] == "error" and texts(events) == ["a"]


def test_a_stream_without_a_finish_reason_is_a_truncation(gw, gemini_fake):
    """Gemini sends no [DONE]: a body that ends without finishReason was cut short."""
    part = b'data: {"candidates": [{"content": {"parts": [{"text": "half"}],"role": "model"}}]}'
    part += b"\r\n\r\n"
    gemini_fake.default = Scenario(raw_parts=[part])
    _r, events = simple(gw)
    error, end = ending(events)
    assert error is not None and error["type"] == "upstream_truncated"
    assert end["finish_reason"] == "error" and texts(events) == ["half"]


def test_leaving_mid_stream_closes_the_upstream(gw, gemini_fake):
    gemini_fake.default = Scenario(chunks=[f"t{i}" for i in range(200)], interval=0.05)
    with httpx.stream("POST", gw.url + "/chat/stream", json={"prompt": "hi"}, timeout=10) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith('data: {"content"'):
                seen += 1
                if seen >= 3:
                    break
    left = time.monotonic()
    closed = gemini_fake.wait_closed(0, timeout=3)
    assert closed - left < 1.0
    assert gemini_fake.attempts[0].closed_by_client and not gemini_fake.attempts[0].completed


def test_a_503_from_gemini_falls_back_to_openai(make_gateway, gemini_fake, openai_fake):
    gw = make_gateway(
        openai_fake=openai_fake,
        providers=gemini_provider(gemini_fake),
        aliases={"chat": {"targets": [MODEL, "openai/gpt-4o-mini"]}},
        default_model="chat",
        max_retries=0,
    )
    gemini_fake.enqueue(Scenario(fault="status", status=503))
    openai_fake.default = Scenario(chunks=["from ", "openai"])
    _r, events = simple(gw)
    error, end = ending(events)
    assert error is None and "".join(texts(events)) == "from openai"
    assert end["model"] == "openai/gpt-4o-mini"
    assert [(a["target"], a["outcome"]) for a in end["attempts"]] == [
        (MODEL, "error"),
        ("openai/gpt-4o-mini", "ok"),
    ]


@pytest.mark.parametrize("fault", ["cut", "stall"])
def test_a_broken_gemini_answer_is_continued_by_another_target(
    make_gateway, gemini_fake, openai_fake, fault
):
    gw = make_gateway(
        openai_fake=openai_fake,
        providers={
            **gemini_provider(gemini_fake),
            "compat": {
                "kind": "openai-compatible",
                "base_url": openai_fake.base_url,
                "models": ["Qwen3-8B"],
                "accepts_continuation": True,
            },
        },
        aliases={"chat": {"targets": [MODEL, "compat/Qwen3-8B"], "continue_on_failure": True}},
        default_model="chat",
        max_retries=0,
        idle_timeout_s=0.5,
    )
    gemini_fake.enqueue(
        Scenario(chunks=["The quick ", "brown ", "fox"], fault=fault, fault_after=2)
    )
    openai_fake.enqueue(Scenario(chunks=[" fox", " jumps."]))
    _r, events = simple(gw)
    error, end = ending(events)
    assert error is None and end["finish_reason"] == "stop"
    text = "".join(texts(events))
    # (A cut may also lose "brown ", which aiohttp had buffered but not handed over;
    # the continuation then starts from what the client did receive.)
    assert text == "The quick brown fox jumps." or (
        fault == "cut" and text == "The quick fox jumps."
    )
    assert end["model"] == "compat/Qwen3-8B"
    assert [a["outcome"] for a in end["attempts"]] == [
        "timeout" if fault == "stall" else "error",
        "ok",
    ]
    cont = openai_fake.attempts[0].body
    partial = text.removesuffix(" fox jumps.")
    assert cont["messages"][-1] == {"role": "assistant", "content": partial}
    assert cont["continue_final_message"] is True
    gemini_fake.wait_closed(0, timeout=2)


def test_gemini_is_not_asked_to_continue_by_default(make_gateway, gemini_fake, openai_fake):
    gw = make_gateway(
        openai_fake=openai_fake,
        providers=gemini_provider(gemini_fake),
        aliases={"chat": {"targets": ["openai/gpt-4o-mini", MODEL], "continue_on_failure": True}},
        default_model="chat",
        max_retries=0,
    )
    openai_fake.enqueue(Scenario(chunks=["a", "b", "c"], fault="malformed", fault_after=2))
    _r, events = simple(gw)
    error, _end = ending(events)
    assert error is not None and error["type"] == "upstream_truncated"
    assert gemini_fake.attempts == []


def test_models_are_listed_from_the_upstream(gw, client, gemini_fake):
    ids = [m.id for m in client.models.list()]
    assert {"gemini/gemini-2.5-flash", "gemini/gemini-2.5-pro"} <= set(ids)
    assert "gemini/text-embedding-004" not in ids  # cannot generate content
    (asked,) = [a for a in gemini_fake.attempts if a.method == "GET"]
    assert asked.path == "/v1beta/models" and "key" not in asked.query
    assert asked.headers["x-goog-api-key"] == KEY


def test_a_model_id_cannot_leave_its_path_segment(gw, gemini_fake):
    r, events = simple(gw, model="gemini/x/..%2F?alt=json")
    assert r.status_code == 200 and ending(events)[0] is None
    (sent,) = gemini_fake.attempts
    # One segment (aiohttp may unescape what is harmless in a path, such as "=").
    assert sent.path.startswith("/v1beta/models/x%2F..%252F%3Falt")
    assert sent.path.count("/") == 3 and sent.path.endswith(":streamGenerateContent")
    assert sent.model == "x/..%2F?alt=json" and sent.query == "alt=sse"


def test_the_key_is_never_in_a_response_or_a_log_line(gw, gemini_fake, caplog):
    leak = f"key {KEY} rejected at {gemini_fake.base_url}/v1beta/models?key={KEY}"
    gemini_fake.enqueue(
        Scenario(fault="status", status=400, error_message=leak),
        Scenario(fault="status", status=500, error_message=leak),
        Scenario(chunks=["a", "b"], fault="error_event", fault_after=1, error_message=leak),
    )
    seen = []
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            r = httpx.post(gw.url + "/chat/stream", json={"prompt": "x"}, timeout=10)
            seen.append(r.text)
    assert len(gemini_fake.attempts) == 3
    logs = "\n".join(JsonFormatter().format(rec) for rec in caplog.records)
    client_text = "\n".join(seen)
    # The messages got through, scrubbed (the relay logs a mid-stream fault's message).
    assert "rejected at gemini" in client_text and "rejected at gemini" in logs
    for text in (client_text, logs):
        assert KEY not in text and gemini_fake.base_url not in text


# -- the fake itself: what the tests above stand on ------------------------------------------


def test_the_fake_speaks_geminis_bytes_and_refuses_what_google_refuses(gemini_fake):
    gemini_fake.default = Scenario(chunks=["Hi"], input_tokens=3, output_tokens=1)
    base = gemini_fake.base_url + "/v1beta/models/gemini-2.5-flash"
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    r = httpx.post(base + ":streamGenerateContent?alt=sse", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    first, last, rest = r.content.split(b"\r\n\r\n")
    assert first.startswith(
        b'data: {"candidates": [{"content": {"parts": [{"text": "Hi"}],"role": "model"},'
        b'"index": 0}],"usageMetadata": {"promptTokenCount": 3,'
    )
    assert b'"finishReason": "STOP"' in last and b'"candidatesTokenCount": 1' in last
    assert rest == b""
    whole = httpx.post(base + ":generateContent", json=body).json()
    assert whole["candidates"][0]["content"]["parts"] == [{"text": "Hi"}]
    for bad in (
        {"contents": []},
        {**body, "generation_config": {"max_tokens": 5}},  # (snake_case names are fine)
        {"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]},
        {"contents": [{"role": "user", "parts": []}]},
    ):
        refused = httpx.post(base + ":streamGenerateContent?alt=sse", json=bad)
        assert (
            refused.status_code == 400 and refused.json()["error"]["status"] == "INVALID_ARGUMENT"
        )
    assert httpx.post(base + ":streamGenerateContent", json=body).status_code == 400
