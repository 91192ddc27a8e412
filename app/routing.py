"""Model names -> routes: pure naming, no I/O and no state but a cache.

A request names ``provider/model-id`` or an alias. ``Router.resolve`` turns
the name into a ``Route``: the ordered targets (primary first), the alias's
fallbacks by error class, and whether a broken answer may be continued
elsewhere. Calling the targets is ``app.failover``'s (over
``app.upstreams``); a name that names nothing is a 404 listing what exists.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from app.config import ProviderConfig, Settings, SettingsError
from app.errors import InvalidRequest, NotFound


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str

    @property
    def name(self) -> str:
        return f"{self.provider}/{self.model}"


@dataclass(frozen=True, slots=True)
class Route:
    """What a model name resolves to; shared by every request that names it."""

    name: str
    targets: tuple[Target, ...]
    context_window_fallbacks: tuple[Target, ...] = ()
    content_policy_fallbacks: tuple[Target, ...] = ()
    continue_on_failure: bool = False
    # The alias's own word on which targets may continue an answer (over the providers').
    continuation: tuple[tuple[str, bool], ...] = ()


class Router:
    """``available``: the providers that were built (an optional extra may be missing)."""

    def __init__(
        self,
        settings: Settings,
        configs: dict[str, ProviderConfig],
        available: Collection[str],
    ) -> None:
        self.settings = settings
        self.configs = configs
        self.providers = frozenset(available)
        self.default_model = settings.default_model or self._implicit_default()
        self._routes: dict[str, Route] = {}
        self._configured = {
            t
            for alias in settings.aliases.values()
            for t in (
                *alias.targets,
                *alias.context_window_fallbacks,
                *alias.content_policy_fallbacks,
            )
        }
        if self.default_model:
            self._configured.add(self.default_model)
        self._check_config()

    def names_provider(self, provider: str) -> bool:
        """Whether the default model or an alias target is on ``provider`` (traffic is
        expected there before any client names it)."""
        return any(name.partition("/")[0] == provider for name in self._configured)

    def metric_key(self, target: Target) -> str:
        """A target's metric label: itself when configured, else ``provider/*``.

        A provider open to any model id would otherwise let clients grow the
        label sets without bound. Health is never shared this way: each target
        has its own breaker (``app.upstreams``).
        """
        if self.configs[target.provider].models or target.name in self._configured:
            return target.name
        return f"{target.provider}/*"

    def _implicit_default(self) -> str | None:
        local = self.configs.get("local")
        if local is not None and local.kind == "local" and "local" in self.providers:
            return f"local/{local.models[0]}"
        return next(iter(self.settings.aliases), None)

    def _check_config(self) -> None:
        """Aliases and the default model must name real targets (fail at start)."""
        for alias, cfg in self.settings.aliases.items():
            named = [
                *cfg.targets,
                *cfg.context_window_fallbacks,
                *cfg.content_policy_fallbacks,
                *cfg.continuation,
            ]
            for name in named:
                try:
                    self._parse(name)
                except NotFound as exc:
                    raise SettingsError(
                        f"invalid setting GATEWAY_ALIASES ({alias}): {exc.message}"
                    ) from None
        if self.settings.default_model:
            try:
                self.resolve(self.settings.default_model)
            except NotFound as exc:
                raise SettingsError(
                    f"invalid setting GATEWAY_DEFAULT_MODEL: {exc.message}"
                ) from None

    def available(self) -> list[str]:
        names = [
            f"{provider}/{model}"
            for provider, cfg in self.configs.items()
            if provider in self.providers
            for model in cfg.models
        ]
        return [*names, *self.settings.aliases]

    def _not_found(self, message: str) -> NotFound:
        open_ended = [
            f"{p}/<model>" for p, c in self.configs.items() if p in self.providers and not c.models
        ]
        listing = ", ".join([*self.available(), *open_ended]) or "none configured"
        return NotFound(
            f"{message}; available models: {listing}", code="model_not_found", param="model"
        )

    def _parse(self, name: str) -> Target:
        provider, sep, model = name.partition("/")
        if not sep:
            owners = [p for p, cfg in self.configs.items() if name in cfg.models]
            if len(owners) == 1 and owners[0] in self.providers:
                return Target(owners[0], name)
            raise self._not_found(f"unknown model '{name}'")
        if provider not in self.providers or not model:
            raise self._not_found(f"unknown provider '{provider}' in model '{name}'")
        allowed = self.configs[provider].models
        if allowed and model not in allowed:
            raise self._not_found(f"unknown model '{name}'")
        return Target(provider, model)

    def resolve(self, name: str | None) -> Route:
        name = name or self.default_model
        if not name:
            raise InvalidRequest(
                "model is required (no default model is configured)",
                param="model",
                code="missing_model",
            )
        route = self._routes.get(name)
        if route is not None:
            return route
        alias = self.settings.aliases.get(name)
        if alias is None:
            route = Route(name, (self._parse(name),))
        else:
            route = Route(
                name,
                tuple(self._parse(t) for t in alias.targets),
                tuple(self._parse(t) for t in alias.context_window_fallbacks),
                tuple(self._parse(t) for t in alias.content_policy_fallbacks),
                alias.continue_on_failure,
                tuple((self._parse(t).name, v) for t, v in alias.continuation.items()),
            )
        # Only configured names are kept: a provider open to any model id must
        # not let clients grow this without bound.
        if alias is not None or self.configs[route.targets[0].provider].models:
            self._routes[name] = route
        return route
