"""The upstreams a route's targets name: their providers, timeouts and health.

``Upstreams`` is what failover calls through: the provider of a target, the
``Timeouts`` that apply to it (the provider's own, else the gateway's), and
its circuit breaker (``app.circuit``, one per ``provider/model`` actually
called). It also decides whether a target may be asked to continue a broken
answer. It holds no request state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.circuit import Breaker, Circuits
from app.config import ProviderConfig, Settings
from app.errors import GatewayError
from app.providers.base import Provider
from app.routing import Route, Target

log = logging.getLogger("app.upstreams")

# An open provider's own model list (``GET /v1/models``): asked at most this
# often, and given this long to answer before the listing goes on without it.
MODELS_TTL_S = 60.0
MODELS_TIMEOUT_S = 2.0


@dataclass(slots=True, frozen=True)
class Timeouts:
    """Seconds: to the first token of an attempt, between chunks, and for the whole request."""

    first_token_s: float
    idle_s: float
    total_s: float


class Upstreams:
    def __init__(
        self,
        settings: Settings,
        providers: dict[str, Provider],
        configs: dict[str, ProviderConfig],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.providers = providers
        self.configs = configs
        self._timeouts = {
            name: Timeouts(
                first_token_s=cfg.first_token_timeout_s or settings.first_token_timeout_s,
                idle_s=cfg.idle_timeout_s or settings.idle_timeout_s,
                total_s=cfg.total_timeout_s or settings.total_timeout_s,
            )
            for name, cfg in configs.items()
        }
        self.circuits = Circuits(
            settings.circuit_failure_threshold,
            settings.circuit_cooldown_s,
            clock,
            max_targets=settings.circuit_max_targets,
        )
        self._clock = clock
        self._listed: dict[str, tuple[float, list[str]]] = {}

    def provider(self, target: Target) -> Provider:
        return self.providers[target.provider]

    def timeouts(self, target: Target) -> Timeouts:
        return self._timeouts[target.provider]

    def breaker(self, target: Target) -> Breaker:
        return self.circuits.get(target.name)

    def accepts_continuation(self, route: Route, target: Target) -> bool:
        """May ``target`` be asked to continue a broken answer on ``route``?

        The alias's per-target setting, else the provider's per-model one,
        else the provider's default; never a target that rejected one before.
        """
        for name, allowed in route.continuation:
            if name == target.name:
                if not allowed:
                    return False
                break
        else:
            cfg = self.configs[target.provider]
            if not cfg.continuation.get(target.model, cfg.accepts_continuation):
                return False
        return not self.breaker(target).rejects_continuation

    def circuit_summary(self, metric_key: Callable[[Target], str]) -> dict[str, dict[str, Any]]:
        """Circuits for ``/readyz``: configured targets each, client-chosen ids counted by
        state under ``provider/*`` (never listed: they are other clients' business)."""
        out: dict[str, dict[str, Any]] = {}
        for name, breaker in sorted(self.circuits.breakers.items()):
            key = metric_key(Target(*name.split("/", 1)))
            if key == name:
                out[name] = breaker.snapshot()
            else:
                counts = out.setdefault(key, {"open": 0, "half_open": 0, "closed": 0})
                counts[breaker.state] += 1
        return out

    async def listed_models(self) -> dict[str, list[str]]:
        """Each provider configured without a ``models`` list -> the ids its upstream lists.

        Cached for ``MODELS_TTL_S``; an upstream that fails or is slow gives its last known
        list (or none), never an error: the listing must not depend on every upstream."""
        open_ended = [
            name for name, cfg in self.configs.items() if not cfg.models and name in self.providers
        ]
        found = await asyncio.gather(*(self._listed_by(name) for name in open_ended))
        return dict(zip(open_ended, found, strict=True))

    async def _listed_by(self, name: str) -> list[str]:
        now = self._clock()
        cached = self._listed.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            async with asyncio.timeout(MODELS_TIMEOUT_S):
                ids = await self.providers[name].list_models()
        except Exception as exc:  # never fails the listing: the last known list, or none
            code = exc.code if isinstance(exc, GatewayError) else type(exc).__name__
            log.warning("provider %s: no model list (%s)", name, code)
            ids = cached[1] if cached is not None else []
        self._listed[name] = (now + MODELS_TTL_S, ids)
        return ids
