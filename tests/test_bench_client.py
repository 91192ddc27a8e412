"""The bench load client (``bench.client``): its requests, and how it counts each protocol.

Recorded responses (the simple protocol's; the fake upstream's own Responses and
Messages streams) fed byte-split to the protocol, then the real gateway's routes
read by the client; the bare relay (``bench.bare``) in front of the fake upstream
as real processes; and how ``bench.report`` judges the gateway against the bare relay.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from bench.client import (
    REQUESTS,
    SSEClientProtocol,
    StreamResult,
    chat_request,
    http_get,
    messages_request,
    one_stream,
    responses_request,
    simple_get_request,
    simple_post_request,
)
from bench.report import render
from bench.runner import FULL, spawn_ready, stop_process
from bench.upstream import HEADERS, Script
from tests.fakes import OpenAIFake, Scenario


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


async def _feed(response: bytes, protocol: str, split: int = 0) -> StreamResult:
    """The result of one response, delivered in ``split``-byte reads (0: all at once)."""
    proto = SSEClientProtocol(asyncio.get_running_loop())
    proto.connection_made(_Transport())  # type: ignore[arg-type]
    res = StreamResult()
    waiter = proto.request(b"GET / HTTP/1.1\r\n\r\n", res, protocol)
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
async def test_simple_complete_stream(split: int) -> None:
    res = await _feed(_response(GOOD), protocol="simple-post", split=split)
    assert res.ok(3), res
    assert (res.tokens, res.events, res.ended, res.done) == (3, 6, True, True)
    assert res.finish_reason == "stop" and res.error is None and res.ttft is not None


async def test_simple_crlf_separators() -> None:
    res = await _feed(_response(GOOD.replace(b"\n", b"\r\n")), protocol="simple-post")
    assert res.ok(3), res


async def test_simple_two_deltas_in_one_event_count_as_tokens() -> None:
    body = START + b'data: {"content":"tok tok "}\n\n' + _end() + DONE
    res = await _feed(_response(body), protocol="simple-post")
    assert res.tokens == 2 and res.ok(2)


async def test_simple_without_done_is_incomplete() -> None:
    res = await _feed(_response(START + CONTENT + _end()), protocol="simple-post")
    assert res.ended and not res.done
    assert res.failure(3) == "no [DONE]"


async def test_simple_done_without_end_is_an_error() -> None:
    res = await _feed(_response(START + CONTENT + DONE), protocol="simple-post")
    assert not res.done
    assert res.failure(3) == "protocol"
    assert "without an end" in (res.error or "")


async def test_simple_error_event_then_end() -> None:
    error = b'id: s:4\nevent: error\ndata: {"error":{"type":"upstream_error"}}\n\n'
    res = await _feed(
        _response(START + CONTENT + error + _end("error") + DONE), protocol="simple-post"
    )
    assert res.ended and not res.done
    assert res.failure(3) == "error"
    assert "upstream_error" in (res.error or "")


async def test_simple_cancelled_end_is_not_complete() -> None:
    res = await _feed(_response(START + CONTENT + _end("cancelled") + DONE), protocol="simple-post")
    assert not res.done and res.failure(3) == "protocol"
    assert "cancelled" in (res.error or "")


async def test_simple_content_after_end_is_an_error() -> None:
    body = START + _end() + CONTENT + DONE
    res = await _feed(_response(body), protocol="simple-post")
    assert res.failure(3) == "protocol"


async def test_simple_event_after_done_is_an_error() -> None:
    res = await _feed(_response(GOOD + b'data: {"content":"x"}\n\n'), protocol="simple-post")
    assert res.failure(3) == "protocol"
    assert "after [DONE]" in (res.error or "")


async def test_simple_cut_mid_stream() -> None:
    response = _response(START + CONTENT)
    res = await _feed(response[: -len(b"0\r\n\r\n")], protocol="simple-post")
    assert res.failure(3) == "transport"


async def test_openai_protocol_unchanged() -> None:
    chunk = orjson.dumps({"choices": [{"index": 0, "delta": {"content": "tok "}}]})
    body = b"".join(b"data: %s\n\n" % chunk for _ in range(3)) + b"data: [DONE]\n\n"
    res = await _feed(_response(body), protocol="openai")
    assert res.ok(3) and res.events == 4 and not res.ended
    # Read as the OpenAI protocol, [DONE] alone completes a stream.
    res = await _feed(_response(body), protocol="openai", split=3)
    assert res.ok(3)


def _split_request(raw: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def test_request_builders() -> None:
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
    assert set(REQUESTS) == {"openai", "simple-post", "simple-get", "responses", "messages"}

    lines, body = _split_request(responses_request("127.0.0.1", 8000, "m"))
    assert lines[0] == b"POST /v1/responses HTTP/1.1"
    assert b"Authorization: Bearer bench-key" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert orjson.loads(body) == {"model": "m", "input": "hi", "stream": True}

    lines, body = _split_request(messages_request("127.0.0.1", 8000, "m"))
    assert lines[0] == b"POST /v1/messages HTTP/1.1"
    assert b"Authorization: Bearer bench-key" in lines
    sent = orjson.loads(body)
    assert sent["model"] == "m" and sent["stream"] is True and sent["max_tokens"] > 0
    assert sent["messages"] == [{"role": "user", "content": "hi"}]


# -- Responses and Messages: the fake upstream's own streams (bench.upstream) --------------------


def _events(kind: str, chunks: int) -> tuple[list[bytes], bytes, list[bytes]]:
    """The fake upstream's stream of ``kind`` as SSE events: (opening, one content, closing)."""
    script = Script(kind, "bench-3-0", chunks, 0, 0, 0, False)

    def sse(framed: bytes) -> list[bytes]:
        out, pos = b"", 0
        while (eol := framed.find(b"\r\n", pos)) >= 0:
            size = int(framed[pos:eol], 16)
            out += framed[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
        return [event + b"\n\n" for event in out.split(b"\n\n") if event]

    [content] = sse(script.content)
    return sse(script.head[len(HEADERS) :]), content, sse(script.tail)


def _named(name: str, data: bytes) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), data)


@pytest.mark.parametrize("kind", ["responses", "messages"])
@pytest.mark.parametrize("split", [0, 1, 7, 64])
async def test_dialect_complete_stream(kind: str, split: int) -> None:
    opening, content, closing = _events(kind, 3)
    body = b"".join([*opening, content * 3, *closing])
    res = await _feed(_response(body), protocol=kind, split=split)
    # The closing events repeat the whole text ("tok tok tok "): not counted again.
    assert res.ok(3), res
    assert res.tokens == 3 and res.done and res.error is None and res.ttft is not None
    assert res.events == len(opening) + 3 + len(closing)


@pytest.mark.parametrize("kind", ["responses", "messages"])
async def test_dialect_crlf_and_pings(kind: str) -> None:
    opening, content, closing = _events(kind, 2)
    body = b"".join([*opening, b": ping\n\n", content * 2, *closing]).replace(b"\n", b"\r\n")
    assert (await _feed(_response(body), kind)).ok(2)


@pytest.mark.parametrize("kind", ["responses", "messages"])
async def test_dialect_without_terminal_event_is_incomplete(kind: str) -> None:
    opening, content, closing = _events(kind, 3)
    res = await _feed(_response(b"".join([*opening, content * 3, *closing[:-1]])), kind)
    assert res.tokens == 3 and not res.done
    assert res.failure(3) == "no [DONE]"


@pytest.mark.parametrize("kind", ["responses", "messages"])
async def test_dialect_event_after_terminal_is_an_error(kind: str) -> None:
    opening, content, closing = _events(kind, 3)
    res = await _feed(_response(b"".join([*opening, content * 3, *closing, content])), kind)
    assert res.failure(3) == "protocol"
    assert "after the terminal event" in (res.error or "")


async def test_responses_failed_is_an_error() -> None:
    opening, content, _ = _events("responses", 3)
    error = _named("error", b'{"type":"error","code":"upstream_error","message":"x"}')
    failed = _named("response.failed", b'{"type":"response.failed","response":{}}')
    res = await _feed(_response(b"".join([*opening, content * 2, error, failed])), "responses")
    assert not res.done and res.failure(3) == "error"
    assert "upstream_error" in (res.error or "")


async def test_responses_incomplete_is_not_complete() -> None:
    opening, content, _ = _events("responses", 3)
    incomplete = _named("response.incomplete", b'{"type":"response.incomplete"}')
    res = await _feed(_response(b"".join([*opening, content * 3, incomplete])), "responses")
    assert not res.ok(3) and res.failure(3) == "error"


async def test_messages_error_event() -> None:
    opening, content, _ = _events("messages", 3)
    error = _named("error", b'{"type":"error","error":{"type":"overloaded_error"}}')
    res = await _feed(_response(b"".join([*opening, content, error])), "messages")
    assert not res.done and res.failure(3) == "error"
    assert "overloaded_error" in (res.error or "")


@pytest.mark.parametrize("route", ["simple-post", "simple-get"])
async def test_against_the_gateway(
    make_gateway: Callable[..., Any], openai_fake: OpenAIFake, route: str
) -> None:
    openai_fake.default = Scenario(chunks=["tok "] * 5)
    gw = make_gateway(openai_fake=openai_fake, default_model="openai/gpt-4o-mini")
    url = urlsplit(gw.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    payload = REQUESTS[route](host, port, "openai/gpt-4o-mini")
    streams = [one_stream(host, port, payload, protocol=route) for _ in range(3)]
    results = await asyncio.gather(*streams)
    for res in results:
        assert res.ok(5), res
        assert res.ended and res.finish_reason == "stop"
        assert res.events == 8  # start, 5 deltas, end, [DONE]


@pytest.mark.parametrize("route", ["responses", "messages"])
async def test_dialects_against_the_gateway(
    make_gateway: Callable[..., Any], openai_fake: OpenAIFake, route: str
) -> None:
    openai_fake.default = Scenario(chunks=["tok "] * 5)
    gw = make_gateway(openai_fake=openai_fake, default_model="openai/gpt-4o-mini")
    url = urlsplit(gw.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    payload = REQUESTS[route](host, port, "openai/gpt-4o-mini")
    results = await asyncio.gather(
        *(one_stream(host, port, payload, protocol=route) for _ in range(3))
    )
    for res in results:
        assert res.ok(5), res


async def test_bare_relay_streams_every_protocol_and_held_streams_release(tmp_path: Path) -> None:
    """bench.bare in front of bench.upstream (real processes): each API streams through
    byte for byte; a stream held by a group larger than its streams goes on at /release."""
    upstream, up_port = spawn_ready(
        [sys.executable, "-m", "bench.upstream", "--port", "0"], tmp_path / "up.log", "upstream"
    )
    try:
        bare, port = spawn_ready(
            [sys.executable, "-m", "bench.bare", "--upstream", f"http://127.0.0.1:{up_port}"],
            tmp_path / "bare.log",
            "bare relay",
        )
        try:
            for protocol in ("openai", "responses", "messages"):
                for target in (up_port, port):
                    payload = REQUESTS[protocol]("127.0.0.1", target, "bench-4-1")
                    res = await one_stream("127.0.0.1", target, payload, protocol=protocol)
                    assert res.ok(4), (protocol, target, res)
            held = [
                asyncio.ensure_future(
                    one_stream(
                        "127.0.0.1",
                        port,
                        REQUESTS[protocol]("127.0.0.1", port, "bench-2-0-60000-99"),
                        protocol=protocol,
                    )
                )
                for protocol in ("openai", "responses")
            ]
            _, body = await http_get("127.0.0.1", up_port, "/stats")
            deadline = time.monotonic() + 10
            while orjson.loads(body)["active"] < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                _, body = await http_get("127.0.0.1", up_port, "/stats")
            assert orjson.loads(body)["active"] == 2
            assert not any(task.done() for task in held)
            status, answer = await http_get("127.0.0.1", up_port, "/release", method="POST")
            assert (status, orjson.loads(answer)) == (200, {"released": 2})
            results = await asyncio.wait_for(asyncio.gather(*held), 10)
            assert all(res.ok(2) for res in results), results
        finally:
            stop_process(bare)
    finally:
        stop_process(upstream)


def test_report_judges_the_gateway_against_the_bare_relay() -> None:
    """Ratios are gateway / bare (added TTFT: each over direct); a target without both
    figures is not judged; two-part targets show both verdicts."""

    def side(p50: float, per_request: float | None = None) -> dict[str, Any]:
        return {"ttft_ms": {"p50": p50, "p99": p50}, "cpu_per_request_us": per_request}

    out = {
        "meta": {"sizes": asdict(FULL)},
        "parts": {
            "ttft": {"direct": side(0.2), "bare": side(1.2, 900), "gateway": side(2.2, 350)},
            "unbatched": {
                "bare": {"cpu_per_chunk_us": 20.0},
                "gateway": {"cpu_per_chunk_us": 28.0},
            },
            "saturated": {"bare": {"cpu_per_chunk_us": 4.0}, "gateway": {"cpu_per_chunk_us": 8.0}},
            "burst": {"bare": {"complete": 1000}, "gateway": {"complete": 999}},
        },
    }
    text, summary = render(out)
    targets = summary["targets"]
    assert targets["ttft_added_ratio"]["value"] == pytest.approx(2.0)  # (2.2-0.2)/(1.2-0.2)
    assert targets["ttft_added_ratio"]["ok"] is False
    assert targets["cpu_per_request_us"]["ok"] is True
    assert targets["cpu_per_chunk_unbatched_us"]["ok"] is True
    assert targets["cpu_per_chunk_unbatched_ratio"]["value"] == pytest.approx(1.4)
    assert targets["cpu_per_chunk_saturated_ratio"]["ok"] is False
    assert targets["burst_complete"]["ok"] is False
    assert targets["burst_ttft_p50_ratio"]["ok"] is None  # no TTFT figures: not judged
    assert set(summary["missed"]) == {
        "ttft_added_ratio",
        "cpu_per_chunk_saturated_ratio",
        "burst_complete",
    }
    unbatched = next(line for line in text.splitlines() if line.startswith("CPU per chunk, unb"))
    assert "1.40x" in unbatched and unbatched.rstrip().endswith("ok / ok")
