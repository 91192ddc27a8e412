"""Graceful shutdown: SIGTERM drains running streams, then ends the rest honestly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.fakes import Scenario
from tests.harness import free_port, gateway_env, read_sse, wait_until_serving

GRACE = 1.5


def _stream(url: str, model: str, out: dict) -> None:
    with httpx.stream(
        "POST", url + "/chat/stream", json={"prompt": "hi", "model": model}, timeout=30
    ) as r:
        out["status"] = r.status_code
        out["events"] = read_sse(r)
        out["ended_at"] = time.monotonic()


def test_sigterm_drains_then_ends_the_rest_with_cancelled(openai_fake):
    openai_fake.for_model["short"] = Scenario(chunks=[f"s{i}" for i in range(8)], interval=0.1)
    openai_fake.for_model["long"] = Scenario(chunks=[f"l{i}" for i in range(200)], interval=0.1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = gateway_env(
        GATEWAY_PROVIDERS=json.dumps(
            {"up": {"kind": "openai-compatible", "base_url": openai_fake.base_url}}
        ),
        GATEWAY_DEFAULT_MODEL="up/short",
        GATEWAY_SHUTDOWN_GRACE_S=str(GRACE),
        GATEWAY_PING_INTERVAL_S="0.2",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_serving(url, proc)
        short: dict = {}
        long: dict = {}
        threads = [
            threading.Thread(target=_stream, args=(url, "up/short", short)),
            threading.Thread(target=_stream, args=(url, "up/long", long)),
        ]
        for t in threads:
            t.start()
        openai_fake.wait_for_attempts(2, timeout=5)
        time.sleep(0.2)  # both are streaming
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.2)

        # Draining: unready, and new streams are refused with a reason.
        ready = httpx.get(url + "/readyz", timeout=2)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = httpx.post(url + "/chat/stream", json={"prompt": "hi"}, timeout=2)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "1"

        for t in threads:
            t.join(timeout=15)
        # The short stream finished normally inside the grace period.
        assert short["events"][-2].json()["finish_reason"] == "stop"
        # The long one was ended after the grace: error, end cancelled, [DONE].
        events = long["events"]
        assert events[-1].data == "[DONE]"
        assert events[-3].event == "error"
        assert events[-3].json()["error"]["type"] == "server_shutdown"
        end = events[-2].json()
        assert end["finish_reason"] == "cancelled" and end["model"] == "up/long"
        assert GRACE - 0.3 < long["ended_at"] - signalled < GRACE + 3
        # Its upstream call was closed, and the process exits.
        long_attempt = next(a for a in openai_fake.attempts if a.model == "long")
        openai_fake.wait_closed(long_attempt, timeout=3)
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        assert proc.stdout is not None
        proc.stdout.close()


def test_draining_ends_openai_streams_as_an_error_the_sdk_raises(make_gateway, openai_fake):
    gw = make_gateway(
        openai_fake=openai_fake, default_model="openai/gpt-4o-mini", shutdown_grace_s=0.3
    )
    openai_fake.default = Scenario(chunks=[f"t{i}" for i in range(100)], interval=0.05)
    state = gw.app.state.gateway
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        seen = 0
        with pytest.raises(openai.APIError, match="shutting down"):
            for _chunk in stream:
                seen += 1
                if seen == 3:
                    gw.call(state.drain.begin)
        assert seen > 3
    assert state.dispatch.active == set()
    openai_fake.wait_closed(0, timeout=3)
