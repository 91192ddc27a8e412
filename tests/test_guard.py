"""No-key mode is loopback-only in fact (Host, Origin, Content-Type checks), WebSocket
Origins are checked always, static files carry the page's security headers, and
/metrics can require a key. Real clients against a running gateway."""

from __future__ import annotations

import re

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app.guard import Guard, split_host
from tests.harness import make_settings

KEY = "k-guard-0123456789"
APP = "https://app.example"
EVIL = "https://evil.example"


def refusals(gw, limit: str) -> float:
    r = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    found = re.search(rf'gateway_limit_refusals_total\{{limit="{limit}"\}} (\S+)', r.text)
    return float(found.group(1)) if found else 0.0


def passed(r: httpx.Response) -> bool:
    """The request went through the guard (and got the route's own answer)."""
    return r.status_code not in (403, 415, 421)


@pytest.fixture
def open_gw(make_gateway):
    """No-key mode, one extra allowed host and one CORS origin."""
    return make_gateway(allowed_hosts=["gw.example.test", "*.lan.test"], cors_origins=[APP])


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("evil.example", False),
        ("evil.example:{port}", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
        ("lan.test", False),
        ("[::2]:{port}", False),
        ("bad:port", False),
        ("localhost:{port}", True),
        ("LOCALHOST", True),
        ("app.localhost:{port}", True),
        ("127.0.0.1:{port}", True),
        ("127.8.9.10", True),
        ("[::1]:{port}", True),
        ("gw.example.test:8443", True),
        ("box.lan.test", True),
    ],
)
def test_split_and_judge_hosts(host, ok):
    guard = Guard(
        None,  # type: ignore[arg-type]
        settings=make_settings(allowed_hosts=["gw.example.test", "*.lan.test"]),
        refused=None,
    )
    assert guard.host_ok(host.format(port=8000).encode()) is ok


def test_split_host():
    assert split_host(b"[::1]:80") == (b"[::1]", b"80")
    assert split_host(b"Example.COM.") == (b"example.com", None)
    assert split_host(b"[::1") is None and split_host(b"h:") is None


def test_no_key_mode_serves_loopback_and_allowed_hosts_only(open_gw):
    gw = open_gw
    for host in (
        f"127.0.0.1:{gw.port}",
        f"localhost:{gw.port}",
        f"[::1]:{gw.port}",
        "gw.example.test",
        "box.lan.test:8000",
    ):
        r = httpx.get(gw.url + "/healthz", headers={"Host": host})
        assert r.status_code == 200, (host, r.text)
    for host in ("evil.example", f"evil.example:{gw.port}", "localhost.evil.example"):
        r = httpx.get(gw.url + "/v1/models", headers={"Host": host})
        assert r.status_code == 421, r.text
        err = r.json()["error"]
        assert err["code"] == "host_not_allowed" and host in err["message"]
        assert "GATEWAY_ALLOWED_HOSTS" in err["message"]
    # A DNS-rebinding page's POST is refused on its Host before anything else.
    r = httpx.post(gw.url + "/chat/stream", json={"prompt": "hi"}, headers={"Host": "evil.example"})
    assert r.status_code == 421
    assert refusals(gw, "host") == 4


def test_with_keys_a_foreign_host_is_served(make_gateway):
    gw = make_gateway(api_keys=[KEY])
    r = httpx.get(gw.url + "/v1/models", headers={"Host": "gw.public.example"})
    assert r.status_code == 401  # the key protects it, not the Host
    r = httpx.get(
        gw.url + "/v1/models",
        headers={"Host": "gw.public.example", "Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 200
    # Nor is a cross-site Origin or a form body refused by the guard: the key decides.
    r = httpx.post(
        gw.url + "/chat/stream",
        content=b"prompt=hi",
        headers={
            "Authorization": f"Bearer {KEY}",
            "Origin": EVIL,
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert passed(r) and r.status_code == 400, r.text


def test_no_key_mode_checks_origins(open_gw):
    gw = open_gw
    url = gw.url + "/v1/chat/completions"
    for origin in (
        EVIL,
        "null",
        f"http://127.0.0.1:{gw.port + 1}",
        f"https://evil.example:{gw.port}",
    ):
        r = httpx.post(url, json={}, headers={"Origin": origin})
        assert r.status_code == 403, (origin, r.text)
        err = r.json()["error"]
        assert err["code"] == "origin_not_allowed" and origin in err["message"]
    r = httpx.delete(gw.url + "/chat/streams/abc", headers={"Origin": EVIL})
    assert r.status_code == 403
    # Same origin, the configured CORS origin, and no Origin at all (curl) go through:
    # the body's own error (no messages) shows the route answered.
    for headers in ({"Origin": f"http://127.0.0.1:{gw.port}"}, {"Origin": APP}, {}):
        r = httpx.post(url, json={}, headers=headers)
        assert r.status_code == 400 and "messages" in r.text, (headers, r.text)
    assert r.status_code == 400
    r = httpx.post(url, json={}, headers={"Origin": APP})
    assert r.headers["access-control-allow-origin"] == APP
    # The CORS preflight from the configured origin still works.
    r = httpx.options(
        url,
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    # No-cors requests carry no Origin, but browsers mark them cross-site.
    r = httpx.get(
        gw.url + "/chat/stream", params={"prompt": "hi"}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = httpx.get(gw.url + "/", headers={"Sec-Fetch-Site": "cross-site"})  # a link to the page
    assert r.status_code == 200
    assert refusals(gw, "origin") == 6


def test_no_key_mode_requires_json_bodies(open_gw):
    gw = open_gw
    cases = [
        ("/chat/stream", {"data": {"prompt": "hi"}}, "application/x-www-form-urlencoded"),
        (
            "/v1/chat/completions",
            {"content": b"{}", "headers": {"Content-Type": "text/plain"}},
            "text/plain",
        ),
        ("/chat/streams", {"content": b"{}"}, "missing"),
        (
            "/chat/fanout",
            {"content": b"x", "headers": {"Content-Type": "multipart/form-data"}},
            "multipart/form-data",
        ),
    ]
    for path, kwargs, named in cases:
        r = httpx.post(gw.url + path, **kwargs)
        assert r.status_code == 415, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "unsupported_media_type" and named in err["message"]
        assert "application/json" in err["message"]
    for ctype in ("application/json; charset=utf-8", "Application/JSON"):
        r = httpx.post(gw.url + "/chat/stream", content=b"{}", headers={"Content-Type": ctype})
        assert r.status_code == 400 and "prompt" in r.text, r.text
    assert refusals(gw, "content_type") == 4


def ws_url(gw, query: str = "") -> str:
    return gw.url.replace("http://", "ws://") + "/ws/chat" + query


def refused_handshake(url: str, origin: str) -> httpx.Response | None:
    try:
        with connect(url, origin=origin, open_timeout=5):  # type: ignore[arg-type]
            return None
    except InvalidStatus as exc:
        return exc.response  # type: ignore[return-value]


@pytest.mark.parametrize("keys", [[KEY], []])
def test_websocket_origin_is_checked_with_or_without_keys(make_gateway, keys):
    gw = make_gateway(api_keys=keys, cors_origins=[APP])
    for origin in (EVIL, "null", f"http://localhost:{gw.port}"):
        response = refused_handshake(ws_url(gw, f"?access_token={KEY}"), origin)
        assert response is not None, origin
        # uvicorn sends the JSON error as the handshake's answer (websocket.http.response).
        assert response.status_code == 403
        assert b"origin_not_allowed" in response.body
    for origin in (f"http://127.0.0.1:{gw.port}", APP, None):
        with connect(ws_url(gw, f"?access_token={KEY}"), origin=origin, open_timeout=5) as ws:  # type: ignore[arg-type]
            ws.send('{"type": "nonsense"}')
            assert '"error"' in ws.recv(timeout=5)  # accepted and talking
    assert refusals(gw, "origin") == 3


def test_static_files_carry_the_pages_security_headers(make_gateway):
    gw = make_gateway()
    for path in ("/", "/static/app.js", "/static/app.css"):
        r = httpx.get(gw.url + path)
        assert r.status_code == 200, path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["content-type"].startswith("text/css")


def test_metrics_can_require_a_key(make_gateway):
    gw = make_gateway(api_keys=[KEY], metrics_require_key=True)
    r = httpx.get(gw.url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(gw.url + "/metrics", headers={"Authorization": "Bearer wrong-key-000"})
    assert r.status_code == 401
    r = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "gateway_http_requests" in r.text
    assert httpx.get(gw.url + "/healthz").status_code == 200  # probes stay open


def test_metrics_are_open_by_default(make_gateway):
    gw = make_gateway(api_keys=[KEY])
    assert httpx.get(gw.url + "/metrics").status_code == 200


def test_two_host_headers_are_refused(open_gw):
    import socket

    with socket.create_connection(("127.0.0.1", open_gw.port), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: evil.example\r\nHost: localhost\r\n"
            b"Connection: close\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 421"), reply[:200]
