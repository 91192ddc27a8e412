"""Retries, fallbacks, circuit breaking and continuation, against misbehaving fake upstreams.

Each test says what the client received, how many attempts each fake upstream
saw (and how far apart), which model the gateway reports as having answered,
and that a healthy request succeeds right after.
"""

from __future__ import annotations

import email.utils
import itertools
import logging
import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.fakes import Scenario
from tests.harness import fake_providers, read_sse

PRIMARY = "openai/gpt-4o-mini"
FALLBACK = "anthropic/claude-haiku-4-5"
COMPAT = "compat/Qwen3-8B"
DOWN = Scenario(fault="status", status=503)


def gateway(make_gateway, openai_fake, anthropic_fake, *, alias=None, providers=None, **kw):
    settings: dict[str, Any] = {
        "default_model": "chat",
        "aliases": {"chat": alias or {"targets": [PRIMARY, FALLBACK]}},
        "first_token_timeout_s": 1.0,
        "idle_timeout_s": 0.5,
        "total_timeout_s": 6.0,
        "connect_timeout_s": 1.0,
        "retry_backoff_s": 0.05,
        "retry_backoff_max_s": 0.2,
        "retry_after_max_s": 2.0,
        "circuit_failure_threshold": 50,
        "circuit_cooldown_s": 30.0,
    }
    settings.update(kw)
    merged = fake_providers(openai_fake, anthropic_fake)
    for name, extra in (providers or {}).items():
        merged[name] = {**merged[name], **extra}
    return make_gateway(providers=merged, **settings)


@pytest.fixture
def gw(make_gateway, openai_fake, anthropic_fake):
    return gateway(make_gateway, openai_fake, anthropic_fake)


def chat(gw, model="chat", **body):
    """(response, events) of a simple-protocol stream."""
    with httpx.stream(
        "POST", gw.url + "/chat/stream", json={"prompt": "hi", "model": model, **body}, timeout=15
    ) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, read_sse(r)


def outcome(events):
    """(text, error or None, end) of a stream whose shape is checked on the way."""
    assert events[-1].data == "[DONE]"
    names = [e.event for e in events]
    assert names.count("end") == 1 and names.count("start") == 1
    assert names[0] == "start" and names[-2] == "end"
    error = events[-3].json()["error"] if events[-3].event == "error" else None
    text = "".join(
        e.json()["content"] for e in events if e.event == "message" and e.data != "[DONE]"
    )
    return text, error, events[-2].json()


def gens(fake):
    return [a for a in fake.attempts if a.method == "POST"]


def gaps(fake):
    times = [a.started for a in gens(fake)]
    return [b - a for a, b in itertools.pairwise(times)]


def healthy_after(gw, fake, model=PRIMARY):
    fake.clear_queue()
    r, events = chat(gw, model)
    assert r.status_code == 200
    _text, error, end = outcome(events)
    assert error is None and end["finish_reason"] == "stop"


# -- retries on the same target ------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Scenario(fault="status", status=408),
        Scenario(fault="status", status=409),
        Scenario(fault="status", status=429),
        Scenario(fault="status", status=500),
        Scenario(fault="status", status=502),
        Scenario(fault="status", status=503),
        Scenario(fault="status", status=504),
        Scenario(fault="reset"),
        Scenario(fault="cut", fault_after=0),
        Scenario(fault="error_event", fault_after=0, error_type="server_error"),
    ],
    ids=["408", "409", "429", "500", "502", "503", "504", "reset", "cut-early", "error-early"],
)
def test_retryable_failure_is_retried_on_the_same_target(gw, openai_fake, anthropic_fake, fault):
    openai_fake.enqueue(fault, fault)
    r, events = chat(gw)
    assert r.status_code == 200
    text, error, end = outcome(events)
    assert (text, error, end["finish_reason"]) == ("Hello world", None, "stop")
    assert end["model"] == PRIMARY and end["provider"] == "openai"
    assert [a["outcome"] for a in end["attempts"]] == ["error", "error", "ok"]
    assert len(gens(openai_fake)) == 3 and gens(anthropic_fake) == []
    # Full jitter: each wait is at most base * 2**retry (0.05, then 0.1 s), plus overheads.
    assert all(g < 0.6 for g in gaps(openai_fake))
    healthy_after(gw, openai_fake)


def test_retries_are_bounded_then_the_fallback_answers(gw, openai_fake, anthropic_fake):
    openai_fake.default = DOWN
    _r, events = chat(gw)
    text, error, end = outcome(events)
    assert error is None and text == "Hello world"
    assert end["model"] == FALLBACK and end["provider"] == "anthropic"
    assert [(a["target"], a["outcome"], a.get("status")) for a in end["attempts"]] == [
        (PRIMARY, "error", 503),
        (PRIMARY, "error", 503),
        (PRIMARY, "error", 503),
        (FALLBACK, "ok", None),
    ]
    assert len(gens(openai_fake)) == 3  # 1 + GATEWAY_MAX_RETRIES
    assert len(gens(anthropic_fake)) == 1
    # Usage is the answering attempt's alone.
    assert end["usage"] == {"input_tokens": 11, "output_tokens": 2}


def test_retry_after_seconds_is_honoured(gw, openai_fake):
    openai_fake.enqueue(Scenario(fault="status", status=429, retry_after="1"))
    _r, events = chat(gw)
    _text, error, end = outcome(events)
    assert error is None and end["model"] == PRIMARY
    (gap,) = gaps(openai_fake)
    assert 0.95 <= gap < 1.8


def test_retry_after_http_date_is_honoured(gw, openai_fake):
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    openai_fake.enqueue(Scenario(fault="status", status=503, retry_after=when))
    _r, events = chat(gw)
    _text, error, end = outcome(events)
    assert error is None and end["model"] == PRIMARY
    (gap,) = gaps(openai_fake)
    assert 0.9 <= gap < 2.8  # the date has one-second resolution


def test_retry_after_beyond_the_cap_moves_on_at_once(gw, openai_fake, anthropic_fake):
    openai_fake.enqueue(Scenario(fault="status", status=429, retry_after="3600"))
    started = time.monotonic()
    _r, events = chat(gw)
    _text, error, end = outcome(events)
    assert error is None and end["model"] == FALLBACK
    assert time.monotonic() - started < 1.5
    assert len(gens(openai_fake)) == 1


def test_every_target_rate_limited_returns_429_with_retry_after(gw, openai_fake, anthropic_fake):
    openai_fake.default = Scenario(fault="status", status=429, retry_after="3600")
    anthropic_fake.default = Scenario(fault="status", status=429, retry_after="3600")
    r, _ = chat(gw)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3600"
    assert len(gens(openai_fake)) == 1 and len(gens(anthropic_fake)) == 1


@pytest.mark.parametrize(
    "fault",
    [
        Scenario(fault="status", status=400, error_message="temperature: must be <= 2"),
        Scenario(fault="status", status=422),
        Scenario(
            fault="status",
            status=400,
            error_code="context_length_exceeded",
            error_message="This model's maximum context length is 8192 tokens.",
        ),
        Scenario(
            fault="status",
            status=400,
            error_code="content_policy_violation",
            error_message="Your request was rejected as a result of our safety system.",
        ),
    ],
    ids=["400", "422", "context-length", "content-policy"],
)
def test_client_errors_are_not_retried_nor_failed_over(gw, openai_fake, anthropic_fake, fault):
    openai_fake.enqueue(fault)
    r, _ = chat(gw)
    assert r.status_code == fault.status
    # The upstream's reason reaches the client.
    assert r.json()["error"]["message"] == (fault.error_message or "Unprocessable entity.")
    assert len(gens(openai_fake)) == 1 and gens(anthropic_fake) == []
    healthy_after(gw, openai_fake)


# -- fallbacks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "silence",
    [Scenario(fault="never_answer"), Scenario(first_token_delay=5)],
    ids=["no-headers", "headers-then-nothing"],
)
def test_a_silent_upstream_is_not_retried_it_moves_on(gw, openai_fake, anthropic_fake, silence):
    openai_fake.enqueue(silence)
    started = time.monotonic()
    r, events = chat(gw)
    assert r.status_code == 200
    text, error, end = outcome(events)
    assert error is None and text == "Hello world" and end["model"] == FALLBACK
    assert [a["outcome"] for a in end["attempts"]] == ["timeout", "ok"]
    assert len(gens(openai_fake)) == 1
    assert 0.9 < time.monotonic() - started < 3  # one first-token timeout, then the fallback
    openai_fake.wait_closed(0, timeout=2)
    healthy_after(gw, openai_fake)


def test_the_gateways_own_key_refused_moves_on(gw, openai_fake, anthropic_fake):
    openai_fake.enqueue(Scenario(fault="status", status=401))
    _r, events = chat(gw)
    _text, error, end = outcome(events)
    assert error is None and end["model"] == FALLBACK
    assert len(gens(openai_fake)) == 1
    assert end["attempts"][0]["code"] == "upstream_auth_failed"


def context_alias(**extra):
    return {"targets": [PRIMARY, COMPAT], "context_window_fallbacks": [FALLBACK], **extra}


@pytest.mark.parametrize(
    "rejection",
    [
        Scenario(
            fault="status",
            status=400,
            error_code="context_length_exceeded",
            error_message="This model's maximum context length is 8192 tokens.",
        ),
        # vLLM says it only in the message.
        Scenario(
            fault="status",
            status=400,
            error_type="BadRequestError",
            error_message="This model's maximum context length is 4096 tokens. However, you "
            "requested 5000 tokens.",
        ),
    ],
    ids=["openai", "vllm"],
)
def test_context_length_goes_to_the_context_window_fallbacks(
    make_gateway, openai_fake, anthropic_fake, rejection
):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=context_alias())
    openai_fake.enqueue(rejection)
    _r, events = chat(gw)
    _text, error, end = outcome(events)
    assert error is None and end["model"] == FALLBACK
    assert end["attempts"][0]["code"] == "context_length_exceeded"
    # The next regular target (compat, same context size) was not tried.
    assert [a.model for a in gens(openai_fake)] == ["gpt-4o-mini"]


def test_a_400_that_explains_beats_a_later_503(make_gateway, openai_fake, anthropic_fake):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=context_alias(), max_retries=0)
    openai_fake.enqueue(
        Scenario(
            fault="status",
            status=400,
            error_code="context_length_exceeded",
            error_message="This model's maximum context length is 8192 tokens.",
        )
    )
    anthropic_fake.enqueue(DOWN)
    r, _ = chat(gw)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "8192" in r.json()["error"]["message"]


def test_content_policy_fails_over_only_when_the_alias_says_so(
    make_gateway, openai_fake, anthropic_fake
):
    refusal = Scenario(
        fault="status",
        status=400,
        error_code="content_policy_violation",
        error_message="Your request was rejected as a result of our safety system.",
    )
    alias = {"targets": [PRIMARY, COMPAT], "content_policy_fallbacks": [FALLBACK]}
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=alias)
    openai_fake.enqueue(refusal)
    _r, events = chat(gw)
    _text, error, end = outcome(events)
    assert error is None and end["model"] == FALLBACK
    assert end["attempts"][0]["code"] == "content_policy_violation"
    assert len(gens(openai_fake)) == 1


def test_openai_wire_names_the_fallback_and_its_usage(gw, openai_fake, anthropic_fake):
    openai_fake.default = DOWN
    anthropic_fake.default = Scenario(chunks=["From ", "Claude"], input_tokens=21)
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(
                model="chat",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        whole = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
    assert {c.model for c in chunks} == {FALLBACK}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "From Claude"
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (21, 2)
    assert whole.model == FALLBACK and whole.choices[0].message.content == "From Claude"


def test_a_cut_before_any_content_fails_over_unseen(make_gateway, openai_fake, anthropic_fake):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, max_retries=0)
    openai_fake.enqueue(Scenario(fault="cut", fault_after=0))
    _r, events = chat(gw)
    text, error, end = outcome(events)
    assert error is None and text == "Hello world"
    # start is sent with the first content, so it names the model that answered.
    assert events[0].json()["model"] == FALLBACK == end["model"]
    assert [a["outcome"] for a in end["attempts"]] == ["error", "ok"]


# -- circuit breaker -------------------------------------------------------------------------


def circuits(gw):
    return httpx.get(gw.url + "/readyz").json()["circuits"]


def openai_only(make_gateway, openai_fake, **settings):
    """A gateway on the OpenAI fake alone, its default model PRIMARY."""
    return make_gateway(openai_fake=openai_fake, default_model=PRIMARY, **settings)


def breaker(gw, target):
    """A target's breaker as the server holds it (/readyz lists configured targets only)."""
    found = gw.app.state.gateway.upstreams.circuits.breakers.get(target)
    return None if found is None else found.snapshot()


def test_outage_then_recovery(make_gateway, openai_fake, anthropic_fake):
    """The primary is down for a while: the fallback serves, then the primary takes over again."""
    gw = gateway(
        make_gateway,
        openai_fake,
        anthropic_fake,
        max_retries=0,
        circuit_failure_threshold=2,
        circuit_cooldown_s=0.8,
    )
    openai_fake.default = DOWN
    served = []
    for _ in range(5):
        _r, events = chat(gw)
        _text, error, end = outcome(events)
        assert error is None
        served.append(end["model"])
    assert served == [FALLBACK] * 5
    # Two failures opened the circuit: the other three skipped the primary.
    assert len(gens(openai_fake)) == 2
    assert end["attempts"][0] == {
        "target": PRIMARY,
        "outcome": "skipped",
        "duration_ms": 0,
        "code": "circuit_open",
    }
    assert circuits(gw)[PRIMARY]["state"] == "open"
    metrics = httpx.get(gw.url + "/metrics").text
    assert f'gateway_circuit_state{{state="open",target="{PRIMARY}"}} 1.0' in metrics
    assert f'gateway_upstream_fallbacks_total{{from_target="{PRIMARY}"' in metrics

    openai_fake.default = Scenario()  # the primary recovers
    time.sleep(0.9)  # the cool-down: the next request is the probe
    _r, events = chat(gw)
    assert outcome(events)[2]["model"] == PRIMARY
    assert circuits(gw)[PRIMARY]["state"] == "closed"
    for _ in range(3):
        _r, events = chat(gw)
        assert outcome(events)[2]["model"] == PRIMARY
    assert len(gens(anthropic_fake)) == 5


def test_a_failed_probe_opens_the_circuit_again(make_gateway, openai_fake, anthropic_fake):
    gw = gateway(
        make_gateway,
        openai_fake,
        anthropic_fake,
        max_retries=0,
        circuit_failure_threshold=1,
        circuit_cooldown_s=0.5,
    )
    openai_fake.default = DOWN
    chat(gw)
    assert circuits(gw)[PRIMARY]["state"] == "open"
    time.sleep(0.6)
    _r, events = chat(gw)  # the probe fails: open again, the fallback answers
    assert outcome(events)[2]["model"] == FALLBACK
    assert circuits(gw)[PRIMARY]["state"] == "open"
    assert len(gens(openai_fake)) == 2


def test_every_circuit_open_fails_fast_with_503(make_gateway, openai_fake):
    gw = openai_only(
        make_gateway, openai_fake, max_retries=0, circuit_failure_threshold=1, circuit_cooldown_s=30
    )
    openai_fake.default = DOWN
    assert chat(gw, PRIMARY)[0].status_code == 503
    r, _ = chat(gw, PRIMARY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "circuit_open"
    assert 1 <= int(r.headers["retry-after"]) <= 30
    assert len(gens(openai_fake)) == 1


# -- mid-stream faults -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "etype", "reason"),
    [
        ("cut", "upstream_truncated", "error"),
        ("stall", "timeout", "timeout"),
        ("malformed", "upstream_truncated", "error"),
    ],
)
def test_mid_stream_fault_after_content_ends_honestly(
    gw, openai_fake, anthropic_fake, caplog, fault, etype, reason
):
    openai_fake.enqueue(Scenario(chunks=["a", "b", "c"], fault=fault, fault_after=2))
    with caplog.at_level(logging.WARNING, logger="app.relay"):
        r, events = chat(gw)
    text, error, end = outcome(events)
    assert error["type"] == etype and end["finish_reason"] == reason
    assert text in ("a", "ab") if fault == "cut" else text == "ab"
    # Content was sent: no failover without continuation; the upstream is released
    # (closed; after a malformed chunk the fake still ends its body, and the
    # connection may go back to the pool instead).
    assert gens(anthropic_fake) == [] and end["model"] == PRIMARY
    if fault != "malformed":
        openai_fake.wait_closed(0, timeout=2)
    # Logged with the request id, for the operator.
    rid = r.headers["x-request-id"]
    assert any(
        rid in rec.getMessage() and error["code"] in rec.getMessage() for rec in caplog.records
    )
    healthy_after(gw, openai_fake)


# -- continuation ----------------------------------------------------------------------------

CONTINUE = {"targets": [PRIMARY, FALLBACK], "continue_on_failure": True}
ACCEPTS = {"anthropic": {"accepts_continuation": True}}
BROKEN = ["The quick ", "brown ", "fox"]


@pytest.mark.parametrize("fault", ["cut", "stall", "malformed"])
def test_continuation_finishes_the_answer(make_gateway, openai_fake, anthropic_fake, fault):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=CONTINUE, providers=ACCEPTS)
    openai_fake.enqueue(Scenario(chunks=BROKEN, fault=fault, fault_after=2))
    anthropic_fake.enqueue(Scenario(chunks=[" fox", " jumps."], input_tokens=40))
    _r, events = chat(gw, max_tokens=50)
    text, error, end = outcome(events)
    assert error is None and end["finish_reason"] == "stop"
    # (A cut may also lose "brown ", which aiohttp had buffered but not handed
    # over; the continuation then starts from what the client did receive.)
    assert text == "The quick brown fox jumps." or (
        fault == "cut" and text == "The quick fox jumps."
    )
    assert end["model"] == FALLBACK
    assert [(a["target"], a["outcome"]) for a in end["attempts"]] == [
        (PRIMARY, "timeout" if fault == "stall" else "error"),
        (FALLBACK, "ok"),
    ]
    (cont,) = gens(anthropic_fake)
    last = cont.body["messages"][-1]
    # What the client received, as a trailing assistant message without the
    # trailing whitespace Anthropic rejects; the repeated space is not relayed twice.
    assert last["role"] == "assistant"
    assert last["content"] == [{"type": "text", "text": text.removesuffix(" fox jumps.")}]
    assert cont.body["max_tokens"] < 50
    assert end["usage"]["output_tokens"] >= 3
    if fault != "malformed":  # (after which the fake ends its body: pooled, not closed)
        openai_fake.wait_closed(0, timeout=2)


def test_continuation_on_an_openai_compatible_server(make_gateway, openai_fake, anthropic_fake):
    alias = {"targets": [PRIMARY, COMPAT], "continue_on_failure": True}
    gw = gateway(
        make_gateway,
        openai_fake,
        anthropic_fake,
        alias=alias,
        providers={"compat": {"accepts_continuation": True}},
    )
    openai_fake.enqueue(
        Scenario(chunks=BROKEN, fault="malformed", fault_after=2), Scenario(chunks=["fox."])
    )
    _r, events = chat(gw)
    text, error, end = outcome(events)
    assert error is None and text == "The quick brown fox." and end["model"] == COMPAT
    cont = gens(openai_fake)[1]
    assert cont.model == "Qwen3-8B"
    assert cont.body["continue_final_message"] is True
    assert cont.body["add_generation_prompt"] is False
    assert cont.body["messages"][-1] == {"role": "assistant", "content": "The quick brown"}


@pytest.mark.parametrize(
    "second",
    [
        Scenario(fault="status", status=400, error_message="no prefill here"),
        Scenario(chunks=["fox", " jumps", " over"], fault="cut", fault_after=1),
    ],
    ids=["rejected", "also-broken"],
)
def test_a_failed_continuation_reports_the_original_failure(
    make_gateway, openai_fake, anthropic_fake, second
):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=CONTINUE, providers=ACCEPTS)
    openai_fake.enqueue(Scenario(chunks=BROKEN, fault="stall", fault_after=2))
    anthropic_fake.enqueue(second)
    _r, events = chat(gw)
    text, error, end = outcome(events)
    assert error["type"] == "timeout" and end["finish_reason"] == "timeout"
    assert "no prefill" not in str(error) and text.startswith("The quick brown ")
    assert len(gens(anthropic_fake)) == 1


@pytest.mark.parametrize(
    ("alias", "providers"),
    [(CONTINUE, None), ({"targets": [PRIMARY, FALLBACK]}, ACCEPTS)],
    ids=["target-does-not-accept", "alias-did-not-ask"],
)
def test_no_continuation_unless_both_sides_agree(
    make_gateway, openai_fake, anthropic_fake, alias, providers
):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=alias, providers=providers)
    openai_fake.enqueue(Scenario(chunks=BROKEN, fault="malformed", fault_after=2))
    _r, events = chat(gw)
    text, error, _end = outcome(events)
    assert error["type"] == "upstream_truncated" and text == "The quick brown "
    assert gens(anthropic_fake) == []


def test_a_client_that_leaves_during_the_retry_wait_stops_the_retries(
    gw, openai_fake, anthropic_fake
):
    openai_fake.default = Scenario(fault="status", status=429, retry_after="1")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gw.url + "/chat/stream",
            json={"prompt": "hi", "model": "chat"},
            timeout=httpx.Timeout(5, read=0.3),
        )
    time.sleep(1.5)  # past the Retry-After: a retry would have been sent by now
    assert len(gens(openai_fake)) == 1 and gens(anthropic_fake) == []
    healthy_after(gw, anthropic_fake, FALLBACK)


# -- edges: finished answers, usage, bounded state ---------------------------------------------


def sse_chunk(delta=None, finish=None, usage=None):
    """One raw OpenAI stream event, for scripts the Scenario knobs cannot express."""
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage_chunk(completion_tokens):
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 30, "completion_tokens": completion_tokens},
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


ROLE = sse_chunk({"role": "assistant", "content": ""})


@pytest.mark.parametrize("continue_on_failure", [False, True])
def test_a_cut_after_the_finish_reason_is_still_a_whole_answer(
    make_gateway, openai_fake, anthropic_fake, continue_on_failure
):
    alias = {"targets": [PRIMARY, FALLBACK], "continue_on_failure": continue_on_failure}
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=alias, providers=ACCEPTS)
    parts = [ROLE, sse_chunk({"content": "Hello"}), sse_chunk({"content": " world"})]
    parts.append(sse_chunk(finish="stop"))  # then the connection drops: no usage, no [DONE]
    openai_fake.enqueue(Scenario(raw_parts=parts, fault="cut", fault_after=4, interval=0.05))
    text, error, end = outcome(chat(gw)[1])
    assert (text, error, end["finish_reason"]) == ("Hello world", None, "stop")
    assert gens(anthropic_fake) == []  # nothing to continue


def test_text_that_arrives_with_usage_is_recorded_once(make_gateway, openai_fake, anthropic_fake):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=CONTINUE, providers=ACCEPTS)

    def usage(n):
        return {"prompt_tokens": 5, "completion_tokens": n}

    parts = [sse_chunk({"role": "assistant", "content": ""}, usage=usage(0))]
    parts += [sse_chunk({"content": t}, usage=usage(i + 1)) for i, t in enumerate(BROKEN)]
    openai_fake.enqueue(Scenario(raw_parts=parts, fault="stall", fault_after=4, interval=0.05))
    anthropic_fake.enqueue(Scenario(chunks=[" jumps."]))
    text, error, _end = outcome(chat(gw)[1])
    assert error is None and text == "The quick brown fox jumps."
    (cont,) = gens(anthropic_fake)
    assert cont.body["messages"][-1]["content"] == [{"type": "text", "text": "The quick brown fox"}]


def test_usage_after_a_continuation_adds_both_parts(make_gateway, openai_fake, anthropic_fake):
    alias = {"targets": [FALLBACK, COMPAT], "continue_on_failure": True}
    gw = gateway(
        make_gateway,
        openai_fake,
        anthropic_fake,
        alias=alias,
        providers={"compat": {"accepts_continuation": True}},
    )
    anthropic_fake.enqueue(Scenario(chunks=BROKEN, fault="stall", fault_after=2))
    script = [ROLE, sse_chunk({"content": "fox"}), sse_chunk({"content": " jumps."})]
    script += [sse_chunk(finish="stop"), usage_chunk(7), b"data: [DONE]\n\n"]
    openai_fake.enqueue(Scenario(raw_parts=script, interval=0.05))
    text, error, end = outcome(chat(gw, max_tokens=50)[1])
    assert error is None and text == "The quick brown fox jumps."
    # Two text deltas before the stall (Anthropic's message_start count of 1 is
    # not the answer's length), then the continuation's own 7.
    assert end["usage"]["output_tokens"] == 2 + 7
    assert gens(openai_fake)[0].body["max_tokens"] == 48


def test_a_failed_continuation_names_the_original_target(make_gateway, openai_fake, anthropic_fake):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=CONTINUE, providers=ACCEPTS)
    openai_fake.enqueue(Scenario(chunks=BROKEN, fault="stall", fault_after=2))
    anthropic_fake.enqueue(Scenario(fault="status", status=400))
    _text, error, end = outcome(chat(gw)[1])
    assert error["type"] == "timeout" and end["model"] == PRIMARY


def openai_stream(gw, model="chat"):
    """The data payloads of an OpenAI-protocol stream with usage."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
    }
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=15) as r:
        assert r.status_code == 200
        return [e.data for e in read_sse(r)]


def test_chunks_after_the_seam_name_the_answering_target(make_gateway, openai_fake, anthropic_fake):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=CONTINUE, providers=ACCEPTS)
    openai_fake.enqueue(Scenario(chunks=BROKEN, fault="stall", fault_after=2))
    anthropic_fake.enqueue(Scenario(chunks=[" fox", " jumps."], input_tokens=40))
    data = openai_stream(gw)
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    texts = [(c["model"], c["choices"][0]["delta"].get("content")) for c in chunks if c["choices"]]
    roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert len(roles) == 1  # one role chunk: the seam is not a second start
    before = [m for m, t in texts if t in ("The quick ", "brown ")]
    after = [m for m, t in texts if t in ("fox", " fox", " jumps.")]
    assert set(before) == {PRIMARY} and after and set(after) == {FALLBACK}
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    (usage,) = [c for c in chunks if not c["choices"]]
    assert finish[0]["model"] == FALLBACK and usage["model"] == FALLBACK
    # The input of a continued answer is the finishing attempt's (its prompt
    # holds the partial answer), whatever the first provider reported.
    assert usage["usage"]["prompt_tokens"] == 40


def test_continued_input_tokens_are_the_finishing_attempts_for_every_provider(
    make_gateway, openai_fake, anthropic_fake
):
    # Anthropic first (it reports input at message_start, before the cut), then
    # the OpenAI-compatible server: the count is still the finishing attempt's.
    alias = {"targets": [FALLBACK, COMPAT], "continue_on_failure": True}
    gw = gateway(
        make_gateway,
        openai_fake,
        anthropic_fake,
        alias=alias,
        providers={"compat": {"accepts_continuation": True}},
    )
    anthropic_fake.enqueue(Scenario(chunks=BROKEN, fault="stall", fault_after=2, input_tokens=11))
    script = [ROLE, sse_chunk({"content": "fox."}), sse_chunk(finish="stop"), usage_chunk(3)]
    openai_fake.enqueue(Scenario(raw_parts=[*script, b"data: [DONE]\n\n"], interval=0.05))
    _text, error, end = outcome(chat(gw)[1])
    assert error is None and end["model"] == COMPAT
    assert end["usage"]["input_tokens"] == 30  # usage_chunk's prompt_tokens, not 11
    assert [a["target"] for a in end["attempts"]] == [FALLBACK, COMPAT]


@pytest.mark.parametrize(
    ("providers", "alias_extra", "asked"),
    [
        # The provider accepts by default, but not for this model.
        (
            {
                "anthropic": {
                    "accepts_continuation": True,
                    "continuation": {"claude-haiku-4-5": False},
                }
            },
            {},
            False,
        ),
        # The provider does not, but this model does.
        ({"anthropic": {"continuation": {"claude-haiku-4-5": True}}}, {}, True),
        # The alias says no for its target, over the provider.
        (ACCEPTS, {"continuation": {FALLBACK: False}}, False),
        # The alias says yes for its target, over the provider.
        (None, {"continuation": {FALLBACK: True}}, True),
    ],
    ids=["model-off", "model-on", "alias-off", "alias-on"],
)
def test_continuation_is_settable_per_model_and_per_alias_target(
    make_gateway, openai_fake, anthropic_fake, providers, alias_extra, asked
):
    alias = {**CONTINUE, **alias_extra}
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=alias, providers=providers)
    openai_fake.enqueue(Scenario(chunks=BROKEN, fault="malformed", fault_after=2))
    anthropic_fake.enqueue(Scenario(chunks=["fox."]))
    text, error, _end = outcome(chat(gw)[1])
    assert len(gens(anthropic_fake)) == (1 if asked else 0)
    assert (error is None) is asked
    assert text == ("The quick brown fox." if asked else "The quick brown ")


def test_a_rejected_continuation_is_not_asked_again(make_gateway, openai_fake, anthropic_fake):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, alias=CONTINUE, providers=ACCEPTS)
    openai_fake.enqueue(
        Scenario(chunks=BROKEN, fault="stall", fault_after=2),
        Scenario(chunks=BROKEN, fault="stall", fault_after=2),
    )
    anthropic_fake.enqueue(
        Scenario(fault="status", status=400, error_message="prefill is not supported")
    )
    for _ in range(2):
        _text, error, _end = outcome(chat(gw)[1])
        assert error["type"] == "timeout"
    assert len(gens(anthropic_fake)) == 1  # the rejection was spent once
    # Still a healthy target for ordinary requests.
    assert circuits(gw)[FALLBACK]["state"] == "closed"
    healthy_after(gw, anthropic_fake, FALLBACK)


def test_a_failing_model_id_opens_only_its_own_circuit(make_gateway, openai_fake):
    gw = openai_only(
        make_gateway, openai_fake, circuit_failure_threshold=3, max_retries=0, retry_backoff_s=0.01
    )
    openai_fake.default = DOWN
    for _ in range(5):
        r, _ = chat(gw, "openai/overloaded-model")
        assert r.status_code in (503, 200)  # 503 before the stream; circuit_open once open
    assert breaker(gw, "openai/overloaded-model")["state"] == "open"
    r, _ = chat(gw, "openai/overloaded-model")
    assert r.status_code == 503 and r.json()["error"]["code"] == "circuit_open"
    assert int(r.headers["retry-after"]) >= 1
    # Another model id of the same provider answers right away.
    openai_fake.default = Scenario()
    r, events = chat(gw, "openai/gpt-4.1-mini")
    assert r.status_code == 200 and outcome(events)[1] is None
    assert breaker(gw, "openai/gpt-4.1-mini")["state"] == "closed"
    # /readyz counts client-chosen ids by state and never names them.
    ready = circuits(gw)
    assert ready["openai/*"] == {"open": 1, "half_open": 0, "closed": 1}
    assert not any("overloaded" in name for name in ready)
    # Client-chosen ids never become metric labels: counted together under openai/*.
    text = httpx.get(gw.url + "/metrics").text
    assert "overloaded-model" not in text and "gpt-4.1-mini" not in text
    assert 'gateway_circuit_state{state="open",target="openai/*"} 1.0' in text
    assert 'gateway_circuit_state{state="closed",target="openai/*"} 1.0' in text


@pytest.mark.parametrize(
    "refusal",
    [
        Scenario(fault="status", status=404, error_message="The model does not exist"),
        Scenario(fault="status", status=400, error_message="temperature: bad"),
        Scenario(
            fault="status",
            status=400,
            error_code="content_policy_violation",
            error_message="flagged as unsafe",
        ),
    ],
    ids=["404", "400", "content-policy"],
)
def test_refusals_never_count_against_a_circuit(make_gateway, openai_fake, refusal):
    gw = openai_only(make_gateway, openai_fake, circuit_failure_threshold=2)
    openai_fake.default = refusal
    for _ in range(4):
        r, _ = chat(gw, "openai/some-model")
        assert r.status_code in (400, 404, 502)
    assert breaker(gw, "openai/some-model") == {
        "state": "closed",
        "consecutive_failures": 0,
        "retry_in_s": 0.0,
    }


def test_the_circuit_table_stays_bounded(make_gateway, openai_fake):
    gw = openai_only(make_gateway, openai_fake, circuit_max_targets=16)
    openai_fake.default = Scenario(fault="status", status=404)
    table = gw.app.state.gateway.upstreams.circuits
    # Thousands of distinct ids (pure bookkeeping, on the server's own loop).
    gw.call(lambda: [table.get(f"openai/made-up-{i}") for i in range(3000)])
    for i in range(5):
        chat(gw, f"openai/probe-{i}")
    names = set(table.breakers)
    assert len(names) == 16 and "openai/probe-4" in names and "openai/made-up-0" not in names


def test_new_model_ids_never_evict_an_open_circuit(make_gateway, openai_fake):
    gw = openai_only(
        make_gateway,
        openai_fake,
        circuit_max_targets=16,
        circuit_failure_threshold=2,
        max_retries=0,
    )
    openai_fake.default = DOWN
    for _ in range(2):
        chat(gw, "openai/bad")
    assert breaker(gw, "openai/bad")["state"] == "open"
    openai_fake.default = Scenario(fault="status", status=404)
    for i in range(40):  # churn well past the table's size
        chat(gw, f"openai/new-{i}")
    assert breaker(gw, "openai/bad")["state"] == "open"
    before = len(gens(openai_fake))
    r, _ = chat(gw, "openai/bad")
    assert r.status_code == 503 and r.json()["error"]["code"] == "circuit_open"
    assert len(gens(openai_fake)) == before  # not called again


def test_streams_that_break_after_content_open_the_circuit(
    make_gateway, openai_fake, anthropic_fake
):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, circuit_failure_threshold=2)
    openai_fake.default = Scenario(chunks=["a", "b", "c"], fault="stall", fault_after=1)
    for _ in range(2):
        chat(gw)
    assert circuits(gw)[PRIMARY]["state"] == "open"
    _text, error, end = outcome(chat(gw)[1])
    assert error is None and end["model"] == FALLBACK
    assert len(gens(openai_fake)) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_stops_retries_after_the_headers_too(
    gw, openai_fake, anthropic_fake, stream
):
    # A cut before content, then a 429 asking for 2 s: the retry waits inside the stream.
    openai_fake.enqueue(
        Scenario(fault="cut", fault_after=0), Scenario(fault="status", status=429, retry_after="2")
    )
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            json=body,
            timeout=httpx.Timeout(5, read=0.5),
        ) as r,
    ):
        r.read()
    time.sleep(2.5)
    assert len(gens(openai_fake)) == 2 and gens(anthropic_fake) == []


def test_a_provider_404_does_not_hide_a_later_400(make_gateway, openai_fake, anthropic_fake):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, max_retries=0)
    openai_fake.enqueue(Scenario(fault="status", status=404))
    anthropic_fake.enqueue(
        Scenario(fault="status", status=400, error_message="temperature: must be <= 1")
    )
    r, _ = chat(gw)
    assert r.status_code == 400 and r.json()["error"]["message"] == "temperature: must be <= 1"


def test_a_long_retry_after_is_reported_over_a_later_outage(
    make_gateway, openai_fake, anthropic_fake
):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, max_retries=0)
    openai_fake.enqueue(Scenario(fault="status", status=429, retry_after="3600"))
    anthropic_fake.enqueue(DOWN)
    r, _ = chat(gw)
    assert r.status_code == 429 and r.headers["retry-after"] == "3600"


@pytest.mark.parametrize("status", [429, 503])
def test_every_429_and_503_says_when_to_come_back(
    make_gateway, openai_fake, anthropic_fake, status
):
    gw = gateway(make_gateway, openai_fake, anthropic_fake, max_retries=1)
    # Neither upstream sends a Retry-After: the gateway gives its own estimate.
    openai_fake.default = anthropic_fake.default = Scenario(fault="status", status=status)
    r, _ = chat(gw)
    assert r.status_code == status
    assert 1 <= int(r.headers["retry-after"]) <= 5
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=15)
    assert r.status_code == status and int(r.headers["retry-after"]) >= 1
