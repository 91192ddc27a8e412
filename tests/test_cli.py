"""``python -m app``: refuses unsafe or invalid settings at start, with a message naming them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from tests.harness import free_port, gateway_env


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=gateway_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/tmp",
    )


def test_refuses_public_host_without_keys():
    r = _run("--host", "0.0.0.0", "--port", "1")
    assert r.returncode == 2
    assert "GATEWAY_API_KEYS" in r.stderr and "GATEWAY_ALLOW_UNAUTHENTICATED" in r.stderr


def test_invalid_setting_is_named():
    r = _run(GATEWAY_IDLE_TIMEOUT_S="soon")
    assert r.returncode == 2 and "GATEWAY_IDLE_TIMEOUT_S" in r.stderr
    r = _run(GATEWAY_PROVIDERS='{"x": {"kind": "telepathy"}}')
    assert r.returncode == 2 and "GATEWAY_PROVIDERS" in r.stderr
    r = _run(GATEWAY_ALIASES='{"a": {"targets": ["ghost/model"]}}')
    assert r.returncode == 2 and "GATEWAY_ALIASES" in r.stderr and "ghost" in r.stderr


@contextlib.contextmanager
def serving(port: int, *args: str, **env: str) -> Iterator[list[str]]:
    """``python -m app --port PORT *args`` running; after the block, its stderr in the list."""
    err: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port), *args],
        env=gateway_env(**env),
        cwd=os.getcwd(),
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            yield err
        finally:
            proc.terminate()
            err.append(proc.communicate(timeout=20)[1])


def test_starts_and_serves(openai_fake):
    port = free_port()
    providers = f'{{"up": {{"kind": "openai-compatible", "base_url": "{openai_fake.base_url}"}}}}'
    with serving(port, GATEWAY_PROVIDERS=providers, GATEWAY_DEFAULT_MODEL="up/m") as err:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}]},
                )
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["model"] == "up/m"
    assert "authentication is OFF" in err[0]


def test_workers_run_with_the_same_limits():
    """``--workers N``: each worker builds its app (app.server.worker_app) with the limits bound."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    limits = {"GATEWAY_API_KEYS": "cli-test-key", "GATEWAY_MAX_HEADER_BYTES": "16384"}
    with serving(port, "--workers", "2", **limits) as err:
        for _ in range(300):  # up within 30 s
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        for _ in range(4):  # whichever worker takes the connection
            r = httpx.get(url + "/healthz", headers={"X-Big": "a" * 20000})
            assert r.status_code == 431
            assert r.json()["error"]["code"] == "request_header_fields_too_large"
    # The workers log through the JSON formatter too.
    assert '"msg":"Application startup complete."' in err[0].replace(": ", ":")
