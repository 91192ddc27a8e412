"""Prometheus metrics, one registry per app (tests run several apps in a process).

Counted per request, never per chunk: attempts, retries and fallbacks by
target. Circuit states are read from the breakers when scraped, so keeping
them costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.circuit import Circuits

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STATES = ("closed", "half_open", "open")


class _CircuitCollector(Collector):
    def __init__(self, circuits: Circuits) -> None:
        self._circuits = circuits

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "gateway_circuit_state",
            "1 for the state each target's circuit breaker is in",
            labels=["target", "state"],
        )
        failures = GaugeMetricFamily(
            "gateway_circuit_consecutive_failures",
            "consecutive failures counted by each target's circuit breaker",
            labels=["target"],
        )
        for target, breaker in sorted(self._circuits.breakers.items()):
            for name in _STATES:
                state.add_metric([target, name], 1.0 if breaker.state == name else 0.0)
            failures.add_metric([target], float(breaker.failures))
        yield state
        yield failures


class Metrics:
    def __init__(self, circuits: Circuits) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        self.registry.register(_CircuitCollector(circuits))

    def render(self) -> bytes:
        return generate_latest(self.registry)
