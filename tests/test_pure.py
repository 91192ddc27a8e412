"""The pure cores: the SSE decoder and the providers' normalisers, on recorded bytes."""

from __future__ import annotations

import orjson
import pytest

from app.events import Finish, TextDelta, ToolCallDelta, Usage
from app.providers.anthropic import AnthropicNormaliser, to_anthropic
from app.providers.openai import normalise_chunk
from app.providers.sse import SSEDecoder

STREAM = (
    b'event: message_start\r\ndata: {"a":1}\r\n\r\n'
    b": a comment\n"
    b"data: line one\ndata: line two\n\n"
    b"id: 7\nretry: 100\ndata:no-space\n\n"
    b"data: \xe2\x80\xa8 stays\rdata: x\r\r"
    b"data: unfinished"
)
EXPECTED = [
    (b"message_start", b'{"a":1}'),
    (b"message", b"line one\nline two"),
    (b"message", b"no-space"),
    (b"message", b"\xe2\x80\xa8 stays\nx"),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_decoder_any_split(size):
    decoder = SSEDecoder()
    got = []
    for i in range(0, len(STREAM), size):
        got += decoder.feed(STREAM[i : i + size])
    assert got == EXPECTED


def test_openai_chunk_normalised():
    chunk = orjson.loads(
        b'{"choices":[{"index":0,"delta":{"content":"hi","tool_calls":[{"index":1,"id":"c",'
        b'"function":{"name":"f","arguments":""}}]},"finish_reason":"tool_calls"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    )
    assert normalise_chunk(chunk) == [
        TextDelta("hi"),
        ToolCallDelta(1, "c", "f", ""),
        Finish("tool_calls"),
        Usage(3, 4),
    ]


def test_anthropic_events_normalised():
    norm = AnthropicNormaliser()
    feed = [
        {
            "type": "message_start",
            "message": {
                "usage": {"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 2}
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "A"}},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": "{}"},
        },
        {
            "type": "message_delta",
            "delta": {"stop_reason": "refusal"},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    ]
    out = [ev for obj in feed for ev in norm.feed(obj)]
    assert out == [
        Usage(7, 1),
        TextDelta("A"),
        ToolCallDelta(0, "t1", "f", ""),
        ToolCallDelta(0, None, None, "{}"),
        Usage(None, 9),
        Finish("content_filter"),
    ]
    assert norm.done


@pytest.mark.parametrize(
    ("reason", "mapped"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("stop_sequence", "stop"),
    ],
)
def test_anthropic_stop_reasons(reason, mapped):
    out = AnthropicNormaliser().feed({"type": "message_delta", "delta": {"stop_reason": reason}})
    assert out == [Finish(mapped)]


def test_messages_to_anthropic():
    system, messages = to_anthropic(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"x":1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]
    )
    assert system == "S"
    assert messages == [
        {"role": "user", "content": [{"type": "text", "text": "Q"}]},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "c1", "name": "f", "input": {"x": 1}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "42"}],
        },
    ]
