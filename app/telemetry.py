"""What failover and the relay report, turned into metrics and the stream's log line.

``Telemetry`` is the ``app.failover.Observer`` the dispatcher hands down: the
relay and failover call it and know nothing of Prometheus or logging. Targets
are labelled by ``Router.metric_key`` (configured targets by name, client-chosen
ids of an open provider under ``provider/*``), so label sets stay bounded.
"""

from __future__ import annotations

import logging
from typing import Any

from app.events import End
from app.metrics import Metrics
from app.requests import ChatRequest
from app.routing import Router, Target

stream_log = logging.getLogger("app.stream")


class Telemetry:
    __slots__ = ("_children", "key", "metrics")

    def __init__(self, metrics: Metrics, router: Router) -> None:
        self.metrics = metrics
        self.key = router.metric_key
        # Labelled children by (metric, labels): prometheus_client's labels() takes a lock
        # and validates every call; a dict lookup does not. Bounded as the label sets are.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        found = self._children.get((metric, labels))
        if found is None:
            if len(self._children) >= 65_536:
                self._children.clear()
            found = self._children[(metric, labels)] = metric.labels(*labels)
        return found

    def attempt(self, target: Target) -> None:
        self._child(self.metrics.attempts, self.key(target)).inc()

    def retry(self, target: Target) -> None:
        self._child(self.metrics.retries, self.key(target)).inc()

    def fallback(self, source: Target, target: Target) -> None:
        self._child(self.metrics.fallbacks, self.key(source), self.key(target)).inc()

    def ended(self, end: End, request: ChatRequest, target: Target | None) -> None:
        """The stream's one summary: metrics and a log line (ids and numbers, never text)."""
        model = self.key(target) if target is not None else end.model
        endpoint = request.endpoint
        m, child = self.metrics, self._child
        child(m.streams, endpoint, model, end.provider, end.finish_reason).inc()
        if end.ttft_ms is not None:
            child(m.ttft, model).observe(end.ttft_ms / 1000)
        child(m.duration, model).observe(end.duration_ms / 1000)
        if end.input_tokens:
            child(m.tokens, model, "input").inc(end.input_tokens)
        if end.output_tokens:
            child(m.tokens, model, "output").inc(end.output_tokens)
        if stream_log.isEnabledFor(logging.INFO):
            stream_log.info(
                "stream %s %s",
                end.finish_reason,
                end.model,
                extra={
                    "fields": {
                        "request_id": request.request_id,
                        "route": endpoint,
                        "model": end.model,
                        "provider": end.provider,
                        "outcome": end.finish_reason,
                        "ttft_ms": end.ttft_ms,
                        "duration_ms": end.duration_ms,
                        "input_tokens": end.input_tokens,
                        "output_tokens": end.output_tokens,
                        "attempts": len(end.attempts),
                    }
                },
            )
