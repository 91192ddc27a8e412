"""No secret leaves the process: upstream error text is scrubbed before a client or a log sees it.

A fake upstream answers with an error whose text echoes the provider's key (not
shaped like ``sk-...``), its base URL, an internal URL and a file path: before
the stream (HTTP 400 and 500) and mid-stream (an in-band error event), for the
OpenAI and Anthropic kinds. Neither the client's response nor any log line may
carry them; the rest of the message still gets through.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import httpx
import pytest

from app.logs import JsonFormatter
from app.providers.errors import GENERIC, Scrubber
from tests.fakes import Scenario
from tests.harness import free_port

OPENAI_KEY = "Zq9-internal-token-7731"
ANTHROPIC_KEY = "Wm2/internal+token=5510"  # '/', '+', '=': also percent-encoded
INTERNAL_URL = "http://10.20.30.40:8500/admin/v1/keys?token=hunter2"
FILE_PATH = "/srv/gateway/app/providers/secrets.py"
HINT = "upstream says hello"  # survives scrubbing: the message is still relayed


def leaky(key: str, base_url: str) -> str:
    return (
        f"{HINT}: key {key} (also {quote(key, safe='')}) "
        f"was rejected by {base_url}/chat/completions; see {INTERNAL_URL} "
        f"and {FILE_PATH} line 3"
    )


def forbidden(key: str, base_url: str) -> list[str]:
    host = base_url.split("//", 1)[1].split("/", 1)[0]
    return [key, host, "10.20.30.40", "hunter2", "/srv/gateway", "secrets.py", "%2F", "%2B"]


@pytest.fixture
def gw(make_gateway, openai_fake, anthropic_fake):
    providers = {
        "openai": {"kind": "openai", "base_url": openai_fake.base_url, "api_key": OPENAI_KEY},
        "anthropic": {
            "kind": "anthropic",
            "base_url": anthropic_fake.base_url,
            "api_key": ANTHROPIC_KEY,
        },
    }
    return make_gateway(providers=providers, max_retries=0, retry_backoff_s=0)


def scenario_for(where: str, message: str) -> Scenario:
    if where == "mid_stream":
        return Scenario(
            chunks=["a", "b", "c"], fault="error_event", fault_after=1, error_message=message
        )
    # The key in the error's code too: every field of an upstream error is its text.
    code = f"code_{message[:60]}"
    return Scenario(fault="status", status=int(where), error_message=message, error_code=code)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    fmt = JsonFormatter()
    return "\n".join(fmt.format(rec) for rec in caplog.records)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("where", ["400", "500", "mid_stream"])
def test_upstream_error_text_is_scrubbed_for_clients_and_logs(
    gw, openai_fake, anthropic_fake, caplog, kind, where
):
    fake = openai_fake if kind == "openai" else anthropic_fake
    key = OPENAI_KEY if kind == "openai" else ANTHROPIC_KEY
    model = f"{kind}/gpt-4o-mini" if kind == "openai" else f"{kind}/claude-haiku-4-5"
    fake.default = scenario_for(where, leaky(key, fake.base_url))
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        # The OpenAI-compatible route, streamed and not, and the simple protocol.
        messages = [{"role": "user", "content": "x"}]
        for path, body in (
            ("/v1/chat/completions", {"model": model, "messages": messages}),
            ("/v1/chat/completions", {"model": model, "messages": messages, "stream": True}),
            ("/chat/stream", {"model": model, "prompt": "x"}),
        ):
            r = httpx.post(gw.url + path, json=body, timeout=10)
            if where == "mid_stream":
                assert r.status_code == 200 or path == "/v1/chat/completions", r.text
            else:
                assert r.status_code == (400 if where == "400" else 502), r.text
            seen.append(r.text)
    assert len(fake.attempts) == 3
    client = "\n".join(seen)
    logs = log_text(caplog)
    # The message got through, scrubbed: the test would see a leak.
    assert HINT in client and "[path]" in client and "[url]" in client
    assert f"rejected by {kind}" in client  # the base URL became the provider's name
    if where == "mid_stream":
        assert HINT in logs and "[path]" in logs  # the relay logs the fault's message
    for text in (client, logs):
        for secret in forbidden(key, fake.base_url):
            assert secret not in text


def test_another_providers_key_is_scrubbed_too(gw, openai_fake, anthropic_fake):
    """Every configured key is known to every provider: an upstream may echo any of them."""
    text = f"{HINT} {ANTHROPIC_KEY} {anthropic_fake.base_url}"
    openai_fake.default = Scenario(fault="status", status=400, error_message=text)
    r = httpx.post(gw.url + "/chat/stream", json={"model": "openai/gpt-4o-mini", "prompt": "x"})
    assert r.status_code == 400 and HINT in r.text
    assert ANTHROPIC_KEY not in r.text and anthropic_fake.base_url not in r.text
    assert "anthropic" in r.json()["error"]["message"]


# -- the scrubber itself ------------------------------------------------------------------


def test_exact_keys_of_any_shape():
    s = Scrubber(["Zq9-internal-token-7731", "EMPTY", "a b+c/d"], [])
    assert s("bad key Zq9-internal-token-7731!") == "bad key [redacted]!"
    assert s("xZq9-internal-token-7731x") == "x[redacted]x"  # long keys: anywhere
    assert s("key=a%20b%2Bc%2Fd") == "key=[redacted]"  # percent-encoded
    # Short keys only as whole tokens, and case matters: words are left alone.
    assert s("key EMPTY refused; EMPTYING empty") == "key [redacted] refused; EMPTYING empty"


def test_base_urls_become_the_provider_name():
    s = Scrubber(
        [], [("vllm", "http://gpu-7.corp.internal:8000/v1"), ("oai", "https://api.x.com/v1")]
    )
    assert s("POST http://gpu-7.corp.internal:8000/v1/chat/completions: 500") == "POST vllm: 500"
    assert s("connect to GPU-7.corp.internal:8000 failed") == "connect to vllm failed"
    assert s("at https://api.x.com:443/v1/x and https://api.x.com/y") == "at oai and oai"
    # Another port of the same host is another service: a URL like any other.
    assert s("http://gpu-7.corp.internal:9000/metrics") == "[url]"
    assert s("host gpu-7.corp.internal") == "host vllm"


def test_other_urls_paths_and_keyish_text():
    assert GENERIC("see https://internal.example/a?b=c, then") == "see [url], then"
    assert GENERIC("redis://:pw@10.0.0.1:6379/0 down") == "[url] down"
    assert GENERIC("in /opt/app/main.py, ~/keys/prod.json and C:\\srv\\k.txt") == (
        "in [path], [path] and [path]"
    )
    # Not paths: a model id, a fraction, a lone slash.
    assert GENERIC("model openai/gpt-4o 1/2 a / b") == "model openai/gpt-4o 1/2 a / b"
    assert GENERIC("token sk-abcdefghijklmnop") == "token [redacted]"
    assert len(GENERIC("x" * 10_000)) == 2000


def test_a_password_in_a_base_url_is_a_secret():
    s = Scrubber([], [("p", "http://user:s3cr3t-pass@proxy.local:3128/v1")])
    assert s("auth s3cr3t-pass refused by proxy.local:3128") == "auth [redacted] refused by p"


def test_a_connection_failure_names_the_provider_not_its_url(make_gateway, caplog):
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    providers = {"vllm": {"kind": "openai-compatible", "base_url": base_url, "api_key": OPENAI_KEY}}
    gw = make_gateway(providers=providers, max_retries=0)
    with caplog.at_level(logging.DEBUG):
        r = httpx.post(gw.url + "/chat/stream", json={"model": "vllm/m", "prompt": "x"}, timeout=10)
    assert r.status_code == 502 and "provider 'vllm'" in r.json()["error"]["message"], r.text
    port = base_url.split(":")[2].split("/")[0]
    for text in (r.text, log_text(caplog)):
        assert port not in text and OPENAI_KEY not in text and "Traceback" not in text
