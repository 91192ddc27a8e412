"""The gateway under test: a real uvicorn server (uvloop, httptools) on an ephemeral port.

Loaded as a pytest plugin (``-p tests.harness`` in pyproject) for ``make_gateway``.

httpx's ASGITransport buffers whole responses, so streaming can only be tested
over a real socket. The server runs in a thread of the test process so that
each test can give it its own ``Settings``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from app.config import Settings
from app.main import create_app
from app.server import uvicorn_options


def make_settings(**overrides: Any) -> Settings:
    """Settings isolated from the machine's environment and any .env file."""
    base: dict[str, Any] = {
        "_env_file": None,
        "local_enabled": False,
        "openai_api_key": None,
        "anthropic_api_key": None,
        "api_keys": [],
        "ping_interval_s": 15.0,
    }
    base.update(overrides)
    return Settings(**base)


class _Server(uvicorn.Server):
    """uvicorn's server, keeping hold of its event loop (``GatewayServer.call``)."""

    loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)


class GatewayServer:
    def __init__(self, settings: Settings, *, plain: bool = False) -> None:
        self.settings = settings
        self.plain = plain
        self.app = create_app(settings)
        # The options `python -m app` runs with (app.server), on a free port; ``plain``:
        # uvicorn's own HTTP protocol, as under `uvicorn app.main:create_app --factory`.
        options = uvicorn_options(settings, self.app)
        options.update(host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2)
        if plain:
            options.update(http="httptools", ws="auto")
        config = uvicorn.Config(**options)
        self.server = _Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def call(self, fn: Any) -> None:
        """Run ``fn()`` on the server's event loop and wait for it."""
        assert self.server.loop is not None
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self.server.loop.call_soon_threadsafe(run)
        assert done.wait(5)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


def fake_providers(openai_fake: Any = None, anthropic_fake: Any = None) -> dict[str, Any]:
    """Provider settings pointing at the fake upstreams (fake keys: never real)."""
    providers: dict[str, Any] = {}
    if openai_fake is not None:
        providers["openai"] = {
            "kind": "openai",
            "base_url": openai_fake.base_url,
            "api_key": "sk-test-upstream-key-0123456789",
        }
        providers["compat"] = {
            "kind": "openai-compatible",
            "base_url": openai_fake.base_url,
            "models": ["Qwen3-8B"],
        }
    if anthropic_fake is not None:
        providers["anthropic"] = {
            "kind": "anthropic",
            "base_url": anthropic_fake.base_url,
            "api_key": "sk-ant-test-upstream-key-0123456789",
        }
    return providers


def sse(response: Any) -> Iterator[Any]:
    """The events of a simple-protocol response a browser would dispatch, through httpx-sse
    (which also reports a blank line after an ``id:`` alone, as a resumable stream sends first)."""
    from httpx_sse import EventSource

    return (e for e in EventSource(response).iter_sse() if e.data or e.event != "message")


def read_sse(response: Any) -> list[Any]:
    return list(sse(response))


def read_stream(
    url: str, *, last: str | None = None, content: int | None = None, **kw: Any
) -> list[Any]:
    """Events of a GET stream (after ``last``); with ``content``, leave after that many texts."""
    import httpx

    headers = {"Last-Event-ID": last} if last else {}
    events: list[Any] = []
    with httpx.stream("GET", url, headers=headers, timeout=15, **kw) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        seen = 0
        for ev in sse(r):
            events.append(ev)
            if ev.event == "message" and ev.data != "[DONE]":
                seen += 1
                if content is not None and seen >= content:
                    break
    return events


@pytest.fixture
def make_gateway() -> Iterator[Any]:
    """``make_gateway(openai_fake=..., anthropic_fake=..., **settings)`` -> a running gateway."""
    servers: list[GatewayServer] = []

    def make(
        openai_fake: Any = None, anthropic_fake: Any = None, plain: bool = False, **overrides: Any
    ) -> GatewayServer:
        providers = fake_providers(openai_fake, anthropic_fake)
        providers.update(overrides.pop("providers", {}))
        server = GatewayServer(make_settings(providers=providers, **overrides), plain=plain)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_env(**extra: str) -> dict[str, str]:
    """The environment for ``python -m app`` in a subprocess, free of the machine's settings."""
    import os

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update({"GATEWAY_LOCAL_ENABLED": "false", **extra})
    return env


def wait_until_serving(url: str, proc: Any, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("gateway did not start")
