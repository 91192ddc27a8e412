"""A circuit breaker per target (``provider/model``), so that a target that is down
is not hammered, and one failing model id never closes the door on another.

::

    closed --N consecutive failures--> open --cool-down--> half-open
      ^                                  ^                     |
      +------------- probe succeeds -----|-- probe fails ------+

While open, requests skip the target and go to their fallbacks. After the
cool-down one request is let through as a probe; the others keep skipping
until it has an outcome. A failure is what routing would retry or move on
from (connect errors, 408/409/429/5xx, timeouts, broken streams); a request
the upstream rightly refused (a 400) is neither, and neither is a client that
went away, and neither is a request's own total timeout. Success is a stream
that ended with its finish reason, so a target that breaks every stream after
its first tokens does open.

State lives in the process; every instance learns on its own (the breakers
guard each instance's own calls, so that is enough). The table is bounded
(``GATEWAY_CIRCUIT_MAX_TARGETS``, least recently used evicted): clients that
name thousands of model ids cannot grow it, and never share a breaker.

A breaker also remembers that its target rejected a continuation (a
prefilled assistant turn), so that it is not asked again (``app.failover``).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["closed", "open", "half_open"]
# How far from the least recently used end eviction looks for a breaker that knows nothing.
_EVICT_SCAN = 64
Admission = Literal["no", "yes", "probe"]


@dataclass(slots=True)
class Breaker:
    threshold: int
    cooldown_s: float
    clock: Callable[[], float] = time.monotonic
    state: State = "closed"
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False
    opened_count: int = field(default=0)
    rejects_continuation: bool = False

    def admit(self) -> Admission:
        """May a request go to this target now? ``probe``: it took the half-open probe slot."""
        if self.state == "closed":
            return "yes"
        if self.state == "open":
            if self.clock() - self.opened_at < self.cooldown_s:
                return "no"
            self.state = "half_open"
            self.probing = False
        if self.probing:
            return "no"
        self.probing = True
        return "probe"

    def success(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            if self.state != "open":
                self.opened_count += 1
            self.state = "open"
            self.opened_at = self.clock()
            self.probing = False

    def release(self, probe: bool) -> None:
        """An attempt ended without a verdict (the client left, a 400): free the probe slot."""
        if probe:
            self.probing = False

    def retry_in(self) -> float:
        if self.state != "open":
            return 0.0
        return max(0.0, self.cooldown_s - (self.clock() - self.opened_at))

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "consecutive_failures": self.failures,
            "retry_in_s": round(self.retry_in(), 3),
        }


class Circuits:
    """The breakers of the targets called lately, created on first use, at most ``max_targets``."""

    def __init__(
        self,
        threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_targets: int = 1024,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.max_targets = max_targets
        self.breakers: OrderedDict[str, Breaker] = OrderedDict()
        self.evicted = 0

    def get(self, target: str) -> Breaker:
        breakers = self.breakers
        breaker = breakers.get(target)
        if breaker is None:
            if len(breakers) >= self.max_targets:
                self._evict()  # before the insert: the new breaker is never the one evicted
            breaker = Breaker(self.threshold, self.cooldown_s, self.clock)
            breakers[target] = breaker
        else:
            breakers.move_to_end(target)
        return breaker

    def _evict(self) -> None:
        """Forget the least recently used breaker that knows nothing: closed, no failures,
        no rejected continuation. A client naming new ids must not reset an open circuit
        (nor be the way to retry a target sooner); only when the oldest entries all hold
        news does the oldest go."""
        breakers = self.breakers
        for name, breaker in itertools.islice(breakers.items(), _EVICT_SCAN):
            if (
                breaker.state == "closed"
                and not breaker.failures
                and not breaker.rejects_continuation
            ):
                del breakers[name]
                break
        else:
            breakers.popitem(last=False)
        self.evicted += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: b.snapshot() for name, b in sorted(self.breakers.items())}
