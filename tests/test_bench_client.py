"""The bench load client (``bench.client``): its requests, and how it counts each protocol.

Recorded responses fed byte-split to the protocol, then the real gateway's
``/chat/stream`` (POST, and GET with its replay log) read by the client.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from bench.client import (
    REQUESTS,
    SSEClientProtocol,
    StreamResult,
    chat_request,
    one_stream,
    simple_get_request,
    simple_post_request,
)
from tests.fakes import Scenario


class _Transport:
    def __init__(self) -> None:
        self.sent = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def _chunked(body: bytes, size: int = 37) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n\r\n"


def _response(body: bytes, content_type: bytes = b"text/event-stream") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % content_type
        + _chunked(body)
    )


async def _feed(response: bytes, simple: bool, split: int = 0) -> StreamResult:
    """The result of one response, delivered in ``split``-byte reads (0: all at once)."""
    proto = SSEClientProtocol(asyncio.get_running_loop())
    proto.connection_made(_Transport())  # type: ignore[arg-type]
    res = StreamResult()
    waiter = proto.request(b"GET / HTTP/1.1\r\n\r\n", res, simple)
    step = split or len(response)
    for i in range(0, len(response), step):
        proto.data_received(response[i : i + step])
    if not waiter.done():
        proto.connection_lost(None)
    return await waiter


def _end(reason: str = "stop") -> bytes:
    data = {"finish_reason": reason, "usage": {"input_tokens": 1, "output_tokens": 3}}
    return b"id: s:4\nevent: end\ndata: " + orjson.dumps(data) + b"\n\n"


START = b'retry: 3000\nid: s:0\nevent: start\ndata: {"id":"s","model":"m","provider":"p"}\n\n'
CONTENT = b"".join(b'id: s:%d\ndata: {"content":"tok "}\n\n' % n for n in (1, 2, 3))
DONE = b"id: s:5\ndata: [DONE]\n\n"
GOOD = START + b": ping\n\n" + CONTENT + _end() + DONE


@pytest.mark.parametrize("split", [0, 1, 5, 64])
async def test_simple_complete_stream(split):
    res = await _feed(_response(GOOD), simple=True, split=split)
    assert res.ok(3), res
    assert (res.tokens, res.events, res.ended, res.done) == (3, 6, True, True)
    assert res.finish_reason == "stop" and res.error is None and res.ttft is not None


async def test_simple_crlf_separators():
    res = await _feed(_response(GOOD.replace(b"\n", b"\r\n")), simple=True)
    assert res.ok(3), res


async def test_simple_two_deltas_in_one_event_count_as_tokens():
    body = START + b'data: {"content":"tok tok "}\n\n' + _end() + DONE
    res = await _feed(_response(body), simple=True)
    assert res.tokens == 2 and res.ok(2)


async def test_simple_without_done_is_incomplete():
    res = await _feed(_response(START + CONTENT + _end()), simple=True)
    assert res.ended and not res.done
    assert res.failure(3) == "no [DONE]"


async def test_simple_done_without_end_is_an_error():
    res = await _feed(_response(START + CONTENT + DONE), simple=True)
    assert not res.done
    assert res.failure(3) == "protocol"
    assert "without an end" in (res.error or "")


async def test_simple_error_event_then_end():
    error = b'id: s:4\nevent: error\ndata: {"error":{"type":"upstream_error"}}\n\n'
    res = await _feed(_response(START + CONTENT + error + _end("error") + DONE), simple=True)
    assert res.ended and not res.done
    assert res.failure(3) == "error"
    assert "upstream_error" in (res.error or "")


async def test_simple_cancelled_end_is_not_complete():
    res = await _feed(_response(START + CONTENT + _end("cancelled") + DONE), simple=True)
    assert not res.done and res.failure(3) == "protocol"
    assert "cancelled" in (res.error or "")


async def test_simple_content_after_end_is_an_error():
    body = START + _end() + CONTENT + DONE
    res = await _feed(_response(body), simple=True)
    assert res.failure(3) == "protocol"


async def test_simple_event_after_done_is_an_error():
    res = await _feed(_response(GOOD + b'data: {"content":"x"}\n\n'), simple=True)
    assert res.failure(3) == "protocol"
    assert "after [DONE]" in (res.error or "")


async def test_simple_cut_mid_stream():
    response = _response(START + CONTENT)
    res = await _feed(response[: -len(b"0\r\n\r\n")], simple=True)
    assert res.failure(3) == "transport"


async def test_openai_protocol_unchanged():
    chunk = orjson.dumps({"choices": [{"index": 0, "delta": {"content": "tok "}}]})
    body = b"".join(b"data: %s\n\n" % chunk for _ in range(3)) + b"data: [DONE]\n\n"
    res = await _feed(_response(body), simple=False)
    assert res.ok(3) and res.events == 4 and not res.ended
    # Read as the OpenAI protocol, [DONE] alone completes a stream.
    res = await _feed(_response(body), simple=False, split=3)
    assert res.ok(3)


def _split_request(raw: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def test_request_builders():
    lines, body = _split_request(simple_post_request("127.0.0.1", 8000, "bench/bench-5-0"))
    assert lines[0] == b"POST /chat/stream HTTP/1.1"
    assert b"Authorization: Bearer bench-key" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert orjson.loads(body) == {"prompt": "hi", "model": "bench/bench-5-0"}

    lines, body = _split_request(simple_get_request("127.0.0.1", 8000, "bench/bench-5-0", "a b"))
    method, target, _ = lines[0].decode().split(" ")
    assert method == "GET" and body == b""
    url = urlsplit(target)
    assert url.path == "/chat/stream"
    assert parse_qs(url.query) == {"prompt": ["a b"], "model": ["bench/bench-5-0"]}
    assert b"Accept: text/event-stream" in lines

    lines, _ = _split_request(chat_request("127.0.0.1", 8000, "m"))
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert set(REQUESTS) == {"openai", "simple-post", "simple-get"}


@pytest.mark.parametrize("route", ["simple-post", "simple-get"])
async def test_against_the_gateway(make_gateway, openai_fake, route):
    openai_fake.default = Scenario(chunks=["tok "] * 5)
    gw = make_gateway(openai_fake=openai_fake, default_model="openai/gpt-4o-mini")
    url = urlsplit(gw.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    payload = REQUESTS[route](host, port, "openai/gpt-4o-mini")
    streams = [one_stream(host, port, payload, simple=True) for _ in range(3)]
    results = await asyncio.gather(*streams)
    for res in results:
        assert res.ok(5), res
        assert res.ended and res.finish_reason == "stop"
        assert res.events == 8  # start, 5 deltas, end, [DONE]
