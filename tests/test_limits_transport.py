"""Limits before authentication (app.server), each hit by a real client against a
real ``python -m app``: header size, header deadline, idle keep-alive, WebSocket
message size; memory stays bounded and /healthz answers meanwhile; no query
string reaches the log.

One gateway process for the module (a subprocess, so that its RSS is its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.harness import free_port, gateway_env, wait_until_serving

KEY = "transport-test-key-5b1d0c9e"
MAX_HEADER = 16 * 1024
MIB = 1024 * 1024
# What 24 unfinished 5 MiB headers, or 20 oversized 5 MiB WebSocket messages,
# may add to the gateway's peak RSS (unbounded, headers alone took 120+ MB).
RSS_BOUND = 60 * MIB


class Gateway:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "gateway.log"
        env = gateway_env(
            GATEWAY_API_KEYS=KEY,
            GATEWAY_MAX_HEADER_BYTES=str(MAX_HEADER),
            GATEWAY_HEADER_TIMEOUT_S="1",
            GATEWAY_BODY_TIMEOUT_S="1",
            GATEWAY_KEEP_ALIVE_TIMEOUT_S="2",
            GATEWAY_LOG_LEVEL="info",
        )
        with self.log.open("wb") as out:  # a file, not a pipe: a full pipe would stall it
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", "--port", str(self.port)],
                env=env,
                cwd=os.getcwd(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until_serving(self.url, self.proc)

    def status(self, field: str) -> int:
        """A /proc/<pid>/status field in bytes (VmRSS now, VmHWM the peak)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    def refusals(self, limit: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(f'gateway_limit_refusals_total{{limit="{limit}"}}'):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        return self.log.read_text()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(tmp_path_factory.mktemp("transport"))
    try:
        yield gateway
    finally:
        gateway.stop()


class HealthProbe:
    """Polls /healthz from a thread of its own; the slowest answer, and any failure."""

    def __init__(self, url: str) -> None:
        self.url = url + "/healthz"
        self.slowest = 0.0
        self.count = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = client.get(self.url).status_code
                    if status != 200:
                        self.failures.append(str(status))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.slowest = max(self.slowest, time.monotonic() - start)
                self.count += 1
                self._stop.wait(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> None:
        assert self.count >= 3 and not self.failures, self.failures
        assert self.slowest < 1.0, f"/healthz took {self.slowest:.2f} s"


async def unfinished_header(port: int, total: int) -> bytes:
    """Sends a header of ``total`` bytes that never ends; what came back (b"" if closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
    chunk = b"a" * 65536
    answer = b""
    try:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
    except OSError:  # reset by the gateway: refused while still sending
        pass
    with contextlib.suppress(OSError):
        # Closed (or answered and closed) within the header timeout, never left open.
        answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def test_unfinished_huge_headers_hold_little_memory_and_are_refused(gw: Gateway) -> None:
    before = gw.status("VmRSS")
    refused = gw.refusals("header_size") + gw.refusals("header_timeout")
    until = time.monotonic() + 1.5

    async def attacker() -> list[bytes]:
        # Refused at once, it comes back: an attack kept up while /healthz is probed.
        answers = [await unfinished_header(gw.port, 5 * MIB)]
        while time.monotonic() < until:
            answers.append(await unfinished_header(gw.port, 5 * MIB))
        return answers

    with HealthProbe(gw.url) as probe:
        answers = [
            a for some in await asyncio.gather(*(attacker() for _ in range(24))) for a in some
        ]
    growth = gw.status("VmHWM") - before
    assert growth < RSS_BOUND, f"peak RSS grew by {growth / MIB:.0f} MiB"
    for answer in answers:
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert gw.refusals("header_size") + gw.refusals("header_timeout") >= refused + len(answers)
    probe.check()


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:  # closed with some of the request unread
            pass
        return data


def test_a_header_over_the_cap_gets_431_in_the_error_shape(gw: Gateway) -> None:
    refused = gw.refusals("header_size")
    big = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: %s\r\n\r\n" % (b"a" * MAX_HEADER)
    answer = exchange(gw.port, big)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), head
    assert b"connection: close" in head.lower()
    error = httpx.Response(200, content=body).json()["error"]
    assert error["code"] == "request_header_fields_too_large" and error["type"]
    assert "GATEWAY_MAX_HEADER_BYTES" in error["message"]
    # Many small headers and a long request line count the same.
    many = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADER // 8))
    assert exchange(gw.port, b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n").startswith(
        b"HTTP/1.1 431 "
    )
    line = b"GET /healthz?%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (b"q" * MAX_HEADER)
    assert exchange(gw.port, line).startswith(b"HTTP/1.1 431 ")
    assert gw.refusals("header_size") == refused + 3


def test_headers_under_the_cap_and_a_big_body_pass(gw: Gateway) -> None:
    r = httpx.get(gw.url + "/healthz", headers={"X-Big": "a" * (MAX_HEADER // 2)})
    assert r.status_code == 200
    # A body arriving with the headers is not counted as header bytes.
    body = b'{"prompt": "' + b"x" * (300 * 1024) + b'"}'
    request = (
        b"POST /chat/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
        % (KEY.encode(), len(body), body)
    )
    answer = exchange(gw.port, request)  # read whole: no model configured is its only fault
    assert answer.startswith(b"HTTP/1.1 400 ") and b"missing_model" in answer, answer[:300]


async def closed_after(
    port: int, send: bytes, drip: Callable[[int], bytes] | None = None
) -> tuple[float, bytes]:
    """(seconds from the connect until the gateway closes the connection, what it sent);
    with ``drip``, ``drip(i)`` is sent every 0.2 s meanwhile (never done in time)."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(send)

    async def dribble(piece: Callable[[int], bytes]) -> None:
        for i in range(100):
            await asyncio.sleep(0.2)
            writer.write(piece(i))

    task = asyncio.create_task(dribble(drip)) if drip is not None else None
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 6):
            data += chunk
    except OSError:
        pass
    finally:
        if task is not None:
            task.cancel()
        writer.close()
    return time.monotonic() - start, data


def _header_piece(i: int) -> bytes:
    return b"X-Slow-%d: v\r\n" % i if i % 2 else b"X"


async def test_slow_headers_silence_and_idle_keep_alive_are_closed(gw: Gateway) -> None:
    timeouts = gw.refusals("header_timeout")
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with HealthProbe(gw.url) as probe:
        (slow, _), (silent, _), (idle, _) = await asyncio.gather(
            # One header byte at a time: the headers are never done in time.
            closed_after(gw.port, b"GET /healthz HTTP/1.1\r\n", _header_piece),
            closed_after(gw.port, b""),
            closed_after(gw.port, request),  # answered, then left idle
        )
    # GATEWAY_HEADER_TIMEOUT_S=1 from the connect; GATEWAY_KEEP_ALIVE_TIMEOUT_S=2 after the answer.
    assert 0.9 < slow < 2.0, slow
    assert 0.9 < silent < 2.0, silent
    assert 1.9 < idle < 3.0, idle
    assert gw.refusals("header_timeout") == timeouts + 2
    probe.check()


async def oversized_message(
    port: int, size: int, compression: str | None, key: str | None = KEY
) -> int | None:
    """Sends one text message of ``size`` bytes; the close code the gateway sent."""
    url = f"ws://127.0.0.1:{port}/ws/chat" + (f"?access_token={key}" if key else "")
    async with connect(url, compression=compression, max_size=None, open_timeout=10) as ws:
        try:
            await ws.send("x" * size)
            await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
    raise AssertionError("the connection stayed open")


async def test_an_oversized_websocket_message_is_refused_before_it_is_buffered(
    gw: Gateway,
) -> None:
    refused = gw.refusals("ws_message_size")
    # GATEWAY_WS_MAX_MESSAGE_BYTES is unset: the body limit, 1 MiB.
    assert await oversized_message(gw.port, 5 * MIB, None) == 1009
    # Compressed to a few KiB, it still may not inflate past the limit.
    assert await oversized_message(gw.port, 5 * MIB, "deflate") == 1009
    assert gw.refusals("ws_message_size") == refused + 2

    # Unauthenticated, as the first frame (where the auth frame is awaited): the same.
    before = gw.status("VmRSS")
    until = time.monotonic() + 1.0

    async def attacker() -> list[int | None]:
        codes = [await oversized_message(gw.port, 5 * MIB, None, key=None)]
        while time.monotonic() < until:
            codes.append(await oversized_message(gw.port, 5 * MIB, None, key=None))
        return codes

    with HealthProbe(gw.url) as probe:
        codes = [c for some in await asyncio.gather(*(attacker() for _ in range(20))) for c in some]
    growth = gw.status("VmHWM") - before
    assert growth < RSS_BOUND, f"peak RSS grew by {growth / MIB:.0f} MiB"
    # Closed while the client still sends: the close frame may be lost to the reset.
    assert set(codes) <= {1009, None} and 1009 in codes, codes
    probe.check()
    # And a message under the limit still reaches the app (its error frame answers it).
    async with connect(f"ws://127.0.0.1:{gw.port}/ws/chat?access_token={KEY}") as ws:
        await ws.send('{"type": "nonsense"}')
        assert "error" in str(await asyncio.wait_for(ws.recv(), 5))


async def test_query_strings_never_reach_the_log(gw: Gateway) -> None:
    wrong = "wrong-token-3f9a7c"
    async with connect(f"ws://127.0.0.1:{gw.port}/ws/chat?access_token={KEY}") as ws:
        await ws.send('{"type": "nonsense"}')
        await asyncio.wait_for(ws.recv(), 5)
    async with connect(f"ws://127.0.0.1:{gw.port}/ws/chat?access_token={wrong}") as ws:
        await ws.send("{}")  # no key in the auth frame either: closed 1008
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
    async with httpx.AsyncClient() as client:
        await client.get(f"{gw.url}/healthz?access_token={KEY}")
        await client.get(f"{gw.url}/nowhere?access_token={KEY}")
    await asyncio.sleep(0.2)
    log = gw.log.read_text()
    # uvicorn's own handshake lines are there, without their query string.
    messages = [orjson.loads(line)["msg"] for line in log.splitlines() if line.startswith("{")]
    assert sum('"WebSocket /ws/chat" [accepted]' in m for m in messages) >= 2
    assert KEY not in log and wrong not in log


@pytest.mark.parametrize("trusted", ["", "127.0.0.1"])
def test_x_forwarded_for_is_believed_only_from_configured_proxies(
    make_gateway: Any, openai_fake: Any, trusted: str
) -> None:
    # One request a minute per client address: two addresses claimed by one client.
    gw = make_gateway(
        openai_fake=openai_fake,
        default_model="openai/gpt-4o-mini",
        rate_limit_rpm=1,
        forwarded_allow_ips=trusted,
    )
    statuses = [
        httpx.post(
            gw.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Forwarded-For": f"203.0.113.{i}"},
        ).status_code
        for i in (1, 2)
    ]
    # Unset (the default): a client's own X-Forwarded-For changes nothing.
    assert statuses == ([200, 200] if trusted else [200, 429])


async def trickled_body(port: int, key: str | None) -> tuple[float, bytes]:
    """``closed_after`` for a declared body sent a byte at a time."""
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100000\r\n" + auth + b"\r\n{"
    )
    return await closed_after(port, head, lambda _: b" ")


async def test_a_trickled_body_is_closed_after_the_body_timeout(gw: Gateway) -> None:
    timeouts = gw.refusals("body_timeout")
    with HealthProbe(gw.url) as probe:
        (unread, answered), (authed, _) = await asyncio.gather(
            trickled_body(gw.port, None),  # answered 401 at once, the body never read
            trickled_body(gw.port, KEY),  # the app waits for the body
        )
    # GATEWAY_BODY_TIMEOUT_S=1 after the headers.
    assert answered.startswith(b"HTTP/1.1 401"), answered[:100]
    assert 0.9 < unread < 2.5, unread
    assert 0.9 < authed < 2.5, authed
    assert gw.refusals("body_timeout") == timeouts + 2
    probe.check()


# -- connections ---------------------------------------------------------------------------


def test_connections_over_the_cap_are_refused_as_they_connect(make_gateway):
    """GATEWAY_MAX_CONNECTIONS: one connection more than the cap is answered 503 and
    closed before anything of it is read; when one leaves, the next is served."""
    gw = make_gateway(max_connections=3, header_timeout_s=30)

    def held_now() -> int:
        found: list[int] = []
        gw.call(lambda: found.append(len(gw.server.server_state.connections)))
        return found[0]

    held = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(3)]
    try:
        deadline = time.monotonic() + 3
        while held_now() < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", gw.port), timeout=3) as extra:
            answer = b""
            while chunk := extra.recv(4096):
                answer += chunk  # to the server's close
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
        error = orjson.loads(body)["error"]
        assert error["code"] == "too_many_connections"
        assert "GATEWAY_MAX_CONNECTIONS" in error["message"]
        # The held ones are untouched; one leaves, and a new client is served.
        held.pop().close()
        deadline = time.monotonic() + 3
        while held_now() > 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        metrics = httpx.get(gw.url + "/metrics", timeout=5).text
        assert 'gateway_limit_refusals_total{limit="connections"} 1.0' in metrics
    finally:
        for s in held:
            s.close()
