"""The repository's nginx config, run by a real nginx in front of a real gateway.

nginx runs ``nginx/gateway.conf`` changed only for the listen port, the
upstream address and file paths (the access log's too). It is installed from Debian's packages by
``.ci/run``; without it these tests fail rather than skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes import Scenario
from tests.harness import free_port

CONFIG = Path(__file__).resolve().parent.parent / "nginx" / "gateway.conf"
DRIP = Scenario(chunks=[f"t{i} " for i in range(6)], first_token_delay=0.3, interval=0.4)


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    assert found, "nginx is not installed (.ci/run installs Debian's nginx-light)"
    return found


def render(gateway_port: int, port: int, workdir: Path, config: str | None = None) -> Path:
    """A runnable copy of the repository's config: ports, upstream and paths only."""
    text = config if config is not None else CONFIG.read_text()
    text, listens = re.subn(r"listen\s+\d+;", f"listen 127.0.0.1:{port};", text)
    assert listens == 1
    text, logs = re.subn(r"access_log\s+/[^\s;]+", f"access_log {workdir / 'access.log'}", text)
    assert logs == 1
    upstream = re.search(r"upstream gateway \{.*?\}", text, re.S)
    assert upstream is not None
    block = re.sub(r"\n\s*server\s[^;]*;", "", upstream.group(0))
    block = block.replace("{", f"{{\n    server 127.0.0.1:{gateway_port};", 1)
    text = text.replace(upstream.group(0), block)
    (workdir / "gateway.conf").write_text(text)
    main = workdir / "nginx.conf"
    temp = "".join(
        f"    {name}_temp_path {workdir / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main.write_text(
        f"daemon off;\nworker_processes 1;\npid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {workdir / 'access.log'};\n{temp}"
        f"    include {workdir / 'gateway.conf'};\n"
        "}\n"
    )
    return main


class Nginx:
    def __init__(self, conf: Path, port: int) -> None:
        self.conf = conf
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def test_config(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [nginx_binary(), "-t", "-c", str(self.conf), "-p", str(self.conf.parent)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def start(self) -> Nginx:
        self.proc = subprocess.Popen(
            [nginx_binary(), "-c", str(self.conf), "-p", str(self.conf.parent)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/healthz", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start: " + (self.conf.parent / "error.log").read_text())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def gw(make_gateway, openai_fake):
    return make_gateway(
        openai_fake=openai_fake, default_model="openai/gpt-4o-mini", ping_interval_s=0.2
    )


@pytest.fixture
def proxy(gw, tmp_path):
    port = free_port()
    nginx = Nginx(render(gw.port, port, tmp_path), port).start()
    yield nginx
    nginx.stop()


def arrivals(url: str, out: dict, headers: dict | None = None) -> None:
    """Arrival times of each content line, and of the pings."""
    times: list[float] = []
    pings: list[float] = []
    with httpx.stream(
        "POST", url + "/chat/stream", json={"prompt": "hi"}, headers=headers, timeout=30
    ) as r:
        out["headers"] = r.headers
        for line in r.iter_lines():
            if line.startswith('data: {"content"'):
                times.append(time.monotonic())
            elif line.startswith(": ping"):
                pings.append(time.monotonic())
            elif line == "data: [DONE]":
                out["done"] = True
    out["times"] = times
    out["pings"] = pings


def side_by_side(direct_url: str, proxied_url: str) -> tuple[dict, dict]:
    direct: dict = {}
    proxied: dict = {}
    threads = [
        threading.Thread(target=arrivals, args=(direct_url, direct)),
        threading.Thread(target=arrivals, args=(proxied_url, proxied)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return direct, proxied


def test_the_config_passes_nginx_t(gw, tmp_path):
    result = Nginx(render(gw.port, free_port(), tmp_path), 0).test_config()
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


def test_tokens_pass_through_unbuffered(gw, proxy, openai_fake):
    openai_fake.default = DRIP
    direct, proxied = side_by_side(gw.url, proxy.url)
    assert len(direct["times"]) == len(proxied["times"]) == 6 and proxied["done"]
    # The first content event arrives through nginx within 300 ms of arriving direct.
    assert abs(proxied["times"][0] - direct["times"][0]) < 0.3
    # And each later one too: spread out over ~2 s, not one late lump.
    for a, b in zip(direct["times"], proxied["times"], strict=True):
        assert abs(a - b) < 0.3
    assert proxied["times"][-1] - proxied["times"][0] > 1.5


def test_a_buffering_proxy_would_be_caught(gw, openai_fake, tmp_path):
    """The check above can fail: buffered and compressed, the same stream arrives in a lump.

    (nginx 1.22 relays chunks promptly with proxy_buffering on alone, and its gzip
    flushes per chunk when unbuffered; the two together hold the stream back.)
    """
    config = CONFIG.read_text().replace(
        "gzip off;", "gzip on; gzip_types text/event-stream; gzip_min_length 0;"
    )
    config = config.replace("proxy_buffering off;", "proxy_buffering on;")
    config = config.replace(
        "proxy_pass_header X-Accel-Buffering;", "proxy_ignore_headers X-Accel-Buffering;"
    )
    port = free_port()
    nginx = Nginx(render(gw.port, port, tmp_path, config), port).start()
    try:
        openai_fake.default = DRIP
        direct, proxied = side_by_side(gw.url, nginx.url)
    finally:
        nginx.stop()
    assert abs(proxied["times"][0] - direct["times"][0]) > 1.0


def test_a_long_pause_with_pings_is_not_cut(gw, proxy, openai_fake):
    openai_fake.default = Scenario(chunks=["before", "after"], interval=3.0)
    out: dict = {}
    arrivals(proxy.url, out)
    assert len(out["times"]) == 2 and out["done"]
    pause = [p for p in out["pings"] if out["times"][0] < p < out["times"][1]]
    assert len(pause) >= 5  # the gateway's pings reached the client through nginx


def test_a_body_over_the_limit_gets_413_from_nginx(gw, proxy):
    big = b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    r = httpx.post(
        proxy.url + "/chat/stream",
        content=big,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413
    assert "nginx" in r.text  # nginx answered; the gateway never saw it


def test_headers_reach_the_client(gw, proxy, openai_fake):
    out: dict = {}
    arrivals(proxy.url, out, headers={"X-Request-ID": "trace-0123"})
    assert out["headers"]["x-accel-buffering"] == "no"
    assert out["headers"]["content-type"].startswith("text/event-stream")
    assert out["headers"]["x-request-id"] == "trace-0123"
    # Without one, nginx's own id is forwarded and comes back.
    r = httpx.get(proxy.url + "/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_the_access_log_has_no_query_strings(gw, proxy, tmp_path):
    from websockets.sync.client import connect

    secret = "nginx-log-secret-4e1a0c"
    assert httpx.get(f"{proxy.url}/healthz?access_token={secret}").status_code == 200
    ws_url = proxy.url.replace("http://", "ws://") + f"/ws/chat?access_token={secret}&x=1"
    with connect(ws_url, open_timeout=5) as ws:
        ws.send("{}")  # an invalid request: answered with an error frame
        assert "error" in str(ws.recv(timeout=5))
    deadline = time.monotonic() + 5
    log = ""
    while "/ws/chat" not in log and time.monotonic() < deadline:  # written at the close
        time.sleep(0.05)
        log = (tmp_path / "access.log").read_text()
    lines = log.splitlines()
    assert any('"GET /healthz HTTP/1.1" 200' in line for line in lines), log
    assert any('"GET /ws/chat HTTP/1.1" 101' in line for line in lines), log
    assert secret not in log and "?" not in log
