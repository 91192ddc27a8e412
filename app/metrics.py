"""Prometheus metrics, one registry per app (tests run several apps in a process).

Everything is counted per request or per stream, never per chunk: HTTP
requests by route and status; streams by route, model, provider and outcome
(the finish reason); time to first token and stream duration; tokens in and
out; upstream attempts, retries and fallbacks by target; resumes of
resumable streams and requests refused by a rate limit. Active streams,
resumable streams run here and circuit states are read when scraped, so
keeping them costs nothing between scrapes. Model labels are configured
targets, or ``provider/*`` for a provider open to any model id, so clients
cannot grow the label sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.circuit import Circuits

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STATES = ("closed", "half_open", "open")


_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 900)


class _LiveCollector(Collector):
    def __init__(self, circuits: Circuits) -> None:
        self._circuits = circuits
        self.gauges: list[tuple[str, str, Callable[[], int]]] = []
        # A target's label: itself when configured, else ``provider/*`` (set by the router).
        self.label: Callable[[str], str] = lambda target: target

    def collect(self) -> Iterator[Metric]:
        for name, doc, read in self.gauges:
            yield GaugeMetricFamily(name, doc, value=float(read()))
        state = GaugeMetricFamily(
            "gateway_circuit_state",
            "circuit breakers in each state, per target (client-chosen model ids of a "
            "provider open to any model are counted together as provider/*)",
            labels=["target", "state"],
        )
        failures = GaugeMetricFamily(
            "gateway_circuit_consecutive_failures",
            "consecutive failures counted by each target's circuit breaker (provider/*: the most)",
            labels=["target"],
        )
        counts: dict[str, dict[str, int]] = {}
        worst: dict[str, int] = {}
        label = self.label
        for target, breaker in self._circuits.breakers.items():
            key = label(target)
            per = counts.get(key)
            if per is None:
                per = counts[key] = dict.fromkeys(_STATES, 0)
            per[breaker.state] += 1
            worst[key] = max(worst.get(key, 0), breaker.failures)
        for key in sorted(counts):
            for name in _STATES:
                state.add_metric([key, name], float(counts[key][name]))
            failures.add_metric([key], float(worst[key]))
        yield state
        yield failures


class Metrics:
    def __init__(self, circuits: Circuits) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "gateway_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.streams = Counter(
            "gateway_streams",
            "generations by route, answering model and provider, and outcome (finish reason)",
            ["route", "model", "provider", "outcome"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "from the request to the first content",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "gateway_stream_duration_seconds",
            "from the request to the end event",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "tokens by answering model and direction (input, output), as upstreams report them",
            ["model", "direction"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "gateway_upstream_attempts",
            "upstream attempts by target",
            ["target"],
            registry=self.registry,
        )
        self.retries = Counter(
            "gateway_upstream_retries",
            "retries of the same target after a retryable failure",
            ["target"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "gateway_upstream_fallbacks",
            "moves from one target to the next",
            ["from_target", "to_target"],
            registry=self.registry,
        )
        self.resumes = Counter(
            "gateway_stream_resumes",
            "reads of a resumable stream that carried a Last-Event-ID",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited",
            "requests refused by a per-client limit, by its code",
            ["code"],
            registry=self.registry,
        )
        self.refused = Counter(
            "gateway_limit_refusals",
            "requests and connections refused by a resource or safety limit, by limit",
            ["limit"],
            registry=self.registry,
        )
        self._live = _LiveCollector(circuits)
        self.registry.register(self._live)

    def label_circuits(self, label: Callable[[str], str]) -> None:
        """How a target's circuit is labelled (bounded: see ``Router.metric_key``)."""
        self._live.label = label

    def gauge(self, name: str, doc: str, read: Callable[[], int]) -> None:
        """A gauge read when scraped."""
        self._live.gauges.append((name, doc, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
