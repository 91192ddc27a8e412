"""A very cheap fake streaming LLM server: OpenAI Chat Completions, and (for the
bare relay and "direct" rows of the route comparison) OpenAI Responses and
Anthropic Messages.

Raw asyncio Protocol on uvloop, HTTP/1.1 keep-alive, chunked transfer encoding,
one SSE event per HTTP chunk in each API's format. ``POST .../chat/completions``::

    data: {"id":"chatcmpl-bench","object":"chat.completion.chunk",...}\\n\\n

``POST .../responses``: ``event: response.created`` ... one
``response.output_text.delta`` per content chunk ... ``response.completed``.
``POST .../messages``: ``event: message_start`` ... one ``content_block_delta``
per content chunk ... ``message_stop``.

The model id says what to stream: ``bench-<chunks>-<interval_ms>[-<delay_ms>[-<group>]]``
(a ``provider/`` prefix is ignored). The stream is the opening events and the first
content chunk at once, then (after ``delay_ms`` if given) one ``"tok "`` content
chunk every ``interval_ms`` (as fast as flow control allows when 0), then the
closing events (Chat Completions: the finish chunk, the usage chunk when
``stream_options.include_usage`` is set, and ``data: [DONE]``). All bytes are
precomputed per (API, model, include_usage). Timed streams are driven by one shared
1 ms timer wheel, not a sleep per stream, so 1,000 slow streams cost little.
``group`` holds each stream after its first chunk until that many wait (or
``delay_ms``, 10 s if 0, from the first): with a group larger than the streams
sent, ``POST /release`` is what lets them go on (``{"released": n}``).

``GET /stats`` returns counters as JSON. Run: ``python -m bench.upstream --port P``;
with ``--port 0`` it prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from typing import Any

import orjson
import uvloop

from bench.common import parse_model, raise_nofile

CONTENT = "tok "
BLOCK = 16  # content chunks per write when streaming as fast as possible
WRITES_PER_TURN = 4  # then yield to the loop so one stream cannot starve the others
CREATED = 1_700_000_000
CHUNK_ID = "chatcmpl-bench"

STATS = {
    "connections": 0,
    "requests": 0,
    "streams": 0,
    "active": 0,
    "completed": 0,
    "aborted": 0,
    "errors": 0,
}


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: Any) -> bytes:
    return _frame(b"data: " + orjson.dumps(obj) + b"\n\n")


# The streaming APIs served, by path suffix: OpenAI Chat Completions, OpenAI
# Responses, Anthropic Messages (the last two for ``bench.bare`` and "direct": the
# gateway itself always calls this server's Chat Completions).
KINDS = {"/chat/completions": "chat", "/responses": "responses", "/messages": "messages"}
HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Connection: keep-alive\r\n"
    b"Cache-Control: no-cache\r\n"
    b"x-request-id: req_bench\r\n"
    b"openai-processing-ms: 0\r\n"
    b"\r\n"
)


def _named(kind: str, obj: dict[str, Any]) -> bytes:
    """One ``event: <type>`` SSE event (Responses, Messages) as one HTTP chunk."""
    return _frame(b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps({"type": kind, **obj})))


def _chat(model: str, chunks: int, usage: bool) -> tuple[bytes, bytes, bytes]:
    """Chat Completions: (role chunk, one content chunk, finish [+ usage] + [DONE])."""

    def chunk(choices: list[Any], **extra: Any) -> bytes:
        obj: dict[str, Any] = {
            "id": CHUNK_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_bench",
            "choices": choices,
        }
        if usage:
            obj["usage"] = None
        obj.update(extra)
        return _event(obj)

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[Any]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    role = chunk(choice({"role": "assistant", "content": "", "refusal": None}))
    content = chunk(choice({"content": CONTENT}))
    tail = chunk(choice({}, "stop"))
    if usage:
        tail += _event(
            {
                "id": CHUNK_ID,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_bench",
                "choices": [],
                "usage": {
                    "prompt_tokens": 8,
                    "completion_tokens": chunks,
                    "total_tokens": 8 + chunks,
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {
                        "reasoning_tokens": 0,
                        "audio_tokens": 0,
                        "accepted_prediction_tokens": 0,
                        "rejected_prediction_tokens": 0,
                    },
                },
            }
        )
    return role, content, tail + _frame(b"data: [DONE]\n\n")


def _responses(model: str, chunks: int) -> tuple[bytes, bytes, bytes]:
    """OpenAI Responses: created, in_progress, item and part added | output_text.delta |
    the dones and response.completed. Precomputed, so every delta carries the same
    ``sequence_number`` (nothing here reads it)."""
    text = CONTENT * chunks
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    item = {"id": "msg_bench", "type": "message", "status": "in_progress", "role": "assistant"}
    where = {"item_id": "msg_bench", "output_index": 0, "content_index": 0}

    def response(status: str, output: list[Any]) -> dict[str, Any]:
        return {
            "id": "resp_bench",
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "model": model,
            "output": output,
            "usage": None
            if status != "completed"
            else {"input_tokens": 8, "output_tokens": chunks, "total_tokens": 8 + chunks},
        }

    done_item = {**item, "status": "completed", "content": [{**part, "text": text}]}
    head = (
        _named("response.created", {"sequence_number": 0, "response": response("in_progress", [])})
        + _named(
            "response.in_progress",
            {"sequence_number": 1, "response": response("in_progress", [])},
        )
        + _named(
            "response.output_item.added",
            {"sequence_number": 2, "output_index": 0, "item": {**item, "content": []}},
        )
        + _named("response.content_part.added", {"sequence_number": 3, **where, "part": part})
    )
    content = _named(
        "response.output_text.delta",
        {"sequence_number": 4, **where, "delta": CONTENT, "logprobs": []},
    )
    n = 4 + chunks
    tail = (
        _named(
            "response.output_text.done",
            {"sequence_number": n, **where, "text": text, "logprobs": []},
        )
        + _named(
            "response.content_part.done",
            {"sequence_number": n + 1, **where, "part": {**part, "text": text}},
        )
        + _named(
            "response.output_item.done",
            {"sequence_number": n + 2, "output_index": 0, "item": done_item},
        )
        + _named(
            "response.completed",
            {"sequence_number": n + 3, "response": response("completed", [done_item])},
        )
    )
    return head, content, tail


def _messages(model: str, chunks: int) -> tuple[bytes, bytes, bytes]:
    """Anthropic Messages: message_start, content_block_start, ping | content_block_delta |
    content_block_stop, message_delta, message_stop."""
    message: dict[str, Any] = {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 8, "output_tokens": 1},
    }
    head = (
        _named("message_start", {"message": message})
        + _named("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        + _named("ping", {})
    )
    content = _named(
        "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": CONTENT}}
    )
    tail = (
        _named("content_block_stop", {"index": 0})
        + _named(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": chunks},
            },
        )
        + _named("message_stop", {})
    )
    return head, content, tail


class Script:
    """The precomputed bytes of one kind of stream."""

    __slots__ = (
        "barrier",
        "block",
        "chunks",
        "content",
        "delay_ms",
        "head",
        "interval_ms",
        "tail",
    )

    def __init__(
        self,
        kind: str,
        model: str,
        chunks: int,
        interval_ms: int,
        delay_ms: int,
        group: int,
        usage: bool,
    ) -> None:
        self.chunks = chunks
        self.interval_ms = interval_ms
        self.delay_ms = delay_ms
        self.barrier = Barrier(group, (delay_ms or 10_000) / 1000) if group else None
        if kind == "responses":
            head, content, tail = _responses(model, chunks)
        elif kind == "messages":
            head, content, tail = _messages(model, chunks)
        else:
            head, content, tail = _chat(model, chunks, usage)
        self.head = HEADERS + head
        self.content = content
        self.block = content * BLOCK
        self.tail = tail + b"0\r\n\r\n"


_SCRIPTS: dict[tuple[str, str, bool], Script] = {}
BARRIERS: list[Barrier] = []  # every barrier made, for POST /release


def _script(kind: str, model: str, usage: bool) -> Script | None:
    key = (kind, model, usage)
    script = _SCRIPTS.get(key)
    if script is None:
        parsed = parse_model(model)
        if parsed is None:
            return None
        script = _SCRIPTS[key] = Script(kind, model, *parsed, usage)
        if script.barrier is not None:
            BARRIERS.append(script.barrier)
    return script


class Wheel:
    """One shared 1 ms timer for every timed stream: slots keyed by due millisecond."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, list[Stream]] = {}
        self.count = 0
        self.last = 0
        self.handle: asyncio.TimerHandle | None = None

    def now_ms(self) -> int:
        return int(self.loop.time() * 1000)

    def add(self, stream: Stream, due_ms: int) -> None:
        if self.handle is None:
            self.last = self.now_ms() - 1
            self.handle = self.loop.call_later(0.001, self._tick)
        if due_ms <= self.last:
            due_ms = self.last + 1
        slot = self.slots.get(due_ms)
        if slot is None:
            self.slots[due_ms] = [stream]
        else:
            slot.append(stream)
        self.count += 1

    def _tick(self) -> None:
        now = self.now_ms()
        slots = self.slots
        ms = self.last
        while ms < now and self.count:
            ms += 1
            self.last = ms
            batch = slots.pop(ms, None)
            if batch:
                self.count -= len(batch)
                for stream in batch:
                    stream.tick(ms, now)
        self.last = now
        if self.count:
            self.handle = self.loop.call_later(0.001, self._tick)
        else:
            self.handle = None


class Barrier:
    """Holds streams after their first chunk until ``size`` are waiting (or a timeout)."""

    def __init__(self, size: int, max_wait_s: float) -> None:
        self.size = size
        self.max_wait_s = max_wait_s
        self.waiting: list[Stream] = []
        self.timer: asyncio.TimerHandle | None = None

    def join(self, stream: Stream) -> None:
        self.waiting.append(stream)
        if len(self.waiting) >= self.size:
            self.release()
        elif self.timer is None:
            self.timer = stream.proto.loop.call_later(self.max_wait_s, self.release)

    def release(self) -> int:
        """Let every waiting stream go on; returns how many were waiting."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        streams, self.waiting = self.waiting, []
        for stream in streams:
            if stream.alive:
                stream.go()
        return len(streams)


class Stream:
    __slots__ = ("alive", "proto", "remaining", "script", "turn_scheduled", "waiting")

    def __init__(self, proto: UpstreamProtocol, script: Script) -> None:
        self.proto = proto
        self.script = script
        self.remaining = script.chunks
        self.alive = True
        self.turn_scheduled = False
        self.waiting = False  # in the start delay

    def start(self) -> None:
        script = self.script
        transport = self.proto.transport
        wait = script.barrier is not None or script.delay_ms or script.interval_ms
        if not (self.remaining and wait):
            transport.write(script.head)
            self.pump()
            return
        transport.write(script.head + script.content)
        self.remaining -= 1
        if not self.remaining:
            self.finish()
        elif script.barrier is not None:
            self.waiting = True
            script.barrier.join(self)
        else:
            self.waiting = bool(script.delay_ms)
            wheel = self.proto.wheel
            wheel.add(self, wheel.now_ms() + (script.delay_ms or script.interval_ms))

    def go(self) -> None:
        """The start delay or barrier is over."""
        self.waiting = False
        interval = self.script.interval_ms
        if interval:
            wheel = self.proto.wheel
            wheel.add(self, wheel.now_ms() + interval)
        else:
            self.pump()

    def tick(self, ms: int, now: int) -> None:
        if not self.alive:
            return
        if self.waiting:
            self.go()
            return
        self.proto.transport.write(self.script.content)
        self.remaining -= 1
        if self.remaining:
            due = ms + self.script.interval_ms
            self.proto.wheel.add(self, due if due > now else now + 1)
        else:
            self.finish()

    def pump(self) -> None:
        """Untimed: write blocks of content chunks while the transport is not paused."""
        self.turn_scheduled = False
        if not self.alive:
            return
        proto = self.proto
        transport = proto.transport
        script = self.script
        writes = 0
        while self.remaining and not proto.paused:
            if self.remaining >= BLOCK:
                transport.write(script.block)
                self.remaining -= BLOCK
            else:
                transport.write(script.content * self.remaining)
                self.remaining = 0
            writes += 1
            if writes >= WRITES_PER_TURN and self.remaining:
                self.turn_scheduled = True
                proto.loop.call_soon(self.pump)
                return
        if not self.remaining:
            self.finish()

    def finish(self) -> None:
        self.alive = False
        proto = self.proto
        proto.transport.write(self.script.tail)
        STATS["active"] -= 1
        STATS["completed"] += 1
        proto.stream = None
        if proto.close_after:
            proto.transport.close()
        elif proto.buf:
            proto.process()


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, wheel: Wheel) -> None:
        self.loop = loop
        self.wheel = wheel
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = b""
        self.stream: Stream | None = None
        self.paused = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS["connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        stream = self.stream
        if stream is not None and stream.alive:
            stream.alive = False
            STATS["active"] -= 1
            STATS["aborted"] += 1
        self.stream = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        stream = self.stream
        if (
            stream is not None
            and stream.alive
            and not stream.script.interval_ms
            and not stream.turn_scheduled
            and not stream.waiting
        ):
            stream.pump()

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if self.stream is None:
            self.process()

    def process(self) -> None:
        """Handle every complete request in the buffer (one stream at a time)."""
        while self.stream is None and self.buf and not self.transport.is_closing():
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._simple(431, b'{"error":"headers too large"}', close=True)
                return
            lines = buf[:end].decode("latin-1").split("\r\n")
            try:
                method, path, _version = lines[0].split(" ", 2)
            except ValueError:
                self._simple(400, b'{"error":"bad request line"}', close=True)
                return
            length = 0
            chunked = False
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding":
                    chunked = "chunked" in value.lower()
                elif name == "connection":
                    close = value.strip().lower() == "close"
            start = end + 4
            if chunked:
                decoded = _dechunk(buf, start)
                if decoded is None:
                    return
                body, rest = decoded
                self.buf = buf[rest:]
            else:
                if len(buf) < start + length:
                    return
                body = buf[start : start + length]
                self.buf = buf[start + length :]
            self.close_after = close
            self._handle(method, path, body)

    def _handle(self, method: str, path: str, body: bytes) -> None:
        STATS["requests"] += 1
        path = path.split("?", 1)[0]
        kind = next((k for suffix, k in KINDS.items() if path.endswith(suffix)), None)
        if method == "POST" and kind is not None:
            try:
                req = orjson.loads(body)
                model = req["model"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                self._error(400, "invalid JSON body or missing model", "invalid_request_error")
                return
            opts = req.get("stream_options") or {}
            usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
            script = _script(kind, str(model), usage)
            if script is None:
                self._error(
                    404,
                    f"The model `{model}` does not exist; use "
                    "bench-<chunks>-<interval_ms>[-<delay_ms>[-<group>]]",
                    "invalid_request_error",
                    "model_not_found",
                )
                return
            if not req.get("stream"):
                if kind != "chat":
                    self._error(400, f"only streaming here for {path}", "invalid_request_error")
                    return
                self._complete(script, str(model), usage)
                return
            STATS["streams"] += 1
            STATS["active"] += 1
            self.stream = Stream(self, script)
            self.stream.start()
        elif method == "GET" and path == "/stats":
            self._simple(200, orjson.dumps(STATS))
        elif method == "POST" and path == "/release":
            released = sum(barrier.release() for barrier in BARRIERS)
            self._simple(200, orjson.dumps({"released": released}))
        elif method == "GET" and path.endswith("/models"):
            self._simple(
                200,
                orjson.dumps(
                    {
                        "object": "list",
                        "data": [
                            {"id": "bench-10-0", "object": "model", "owned_by": "bench"},
                        ],
                    }
                ),
            )
        else:
            self._error(404, f"no route {method} {path}", "invalid_request_error")

    def _complete(self, script: Script, model: str, usage: bool) -> None:
        """A non-streaming answer, for completeness."""
        self._simple(
            200,
            orjson.dumps(
                {
                    "id": CHUNK_ID,
                    "object": "chat.completion",
                    "created": CREATED,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": CONTENT * script.chunks},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 8,
                        "completion_tokens": script.chunks,
                        "total_tokens": 8 + script.chunks,
                    },
                }
            ),
        )

    def _error(self, status: int, message: str, kind: str, code: str | None = None) -> None:
        STATS["errors"] += 1
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        self._simple(status, orjson.dumps(body))

    def _simple(self, status: int, body: bytes, close: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        close = close or self.close_after
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: %s\r\n\r\n%s"
            % (status, reason.encode(), len(body), b"close" if close else b"keep-alive", body)
        )
        if close:
            self.buf = b""
            self.transport.close()


def _dechunk(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked request body starting at ``pos``; None while incomplete."""
    out: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)
            while end >= 0 and end != pos:  # skip trailers
                pos = end + 2
                end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            return b"".join(out), end + 2
        if len(buf) < pos + size + 2:
            return None
        out.append(buf[pos : pos + size])
        pos += size + 2


async def serve(host: str, port: int, ready: bool = True) -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    server = await loop.create_server(
        lambda: UpstreamProtocol(loop, wheel), host, port, backlog=4096, reuse_address=True
    )
    actual = server.sockets[0].getsockname()[1]
    if ready:
        print(f"READY {actual}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    raise_nofile()
    started = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port))
    print(f"upstream: {STATS} after {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
