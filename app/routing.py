"""Model names -> targets, and opening a generation on them.

A request names ``provider/model-id`` or an alias (an ordered list of such
targets). ``Router.open`` tries the targets in order until one accepts the
request; a failure that retrying elsewhere cannot fix (a 400 that explains the
problem) is raised at once. Retries with backoff, circuit breaking and
mid-stream continuation build on this in later work.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.config import ProviderConfig, Settings, SettingsError
from app.errors import GatewayError, InvalidRequest, NotFound
from app.providers.base import ChatRequest, Provider
from app.relay import Generation, Limits


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str

    @property
    def name(self) -> str:
        return f"{self.provider}/{self.model}"


class Router:
    def __init__(
        self,
        settings: Settings,
        providers: dict[str, Provider],
        configs: dict[str, ProviderConfig],
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.configs = configs
        self._limits = {name: self._make_limits(cfg) for name, cfg in configs.items()}
        self.default_model = settings.default_model or self._implicit_default()
        self._check_config()

    def _make_limits(self, cfg: ProviderConfig) -> Limits:
        s = self.settings
        return Limits(
            first_token_s=cfg.first_token_timeout_s or s.first_token_timeout_s,
            idle_s=cfg.idle_timeout_s or s.idle_timeout_s,
            total_s=cfg.total_timeout_s or s.total_timeout_s,
        )

    def _implicit_default(self) -> str | None:
        local = self.configs.get("local")
        if local is not None and local.kind == "local" and "local" in self.providers:
            return f"local/{local.models[0]}"
        return next(iter(self.settings.aliases), None)

    def _check_config(self) -> None:
        """Aliases and the default model must name real targets (fail at start)."""
        for alias, cfg in self.settings.aliases.items():
            for name in [*cfg.targets, *cfg.context_window_fallbacks]:
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

    def resolve(self, name: str | None) -> list[Target]:
        name = name or self.default_model
        if not name:
            raise InvalidRequest(
                "model is required (no default model is configured)",
                param="model",
                code="missing_model",
            )
        alias = self.settings.aliases.get(name)
        if alias is not None:
            return [self._parse(t) for t in alias.targets]
        return [self._parse(name)]

    async def open(self, targets: list[Target], request: ChatRequest) -> Generation:
        """Start a generation on the first target that accepts it."""
        errors: list[GatewayError] = []
        for target in targets:
            request.model = target.model
            gen = Generation(
                self.providers[target.provider].stream(request),
                model=target.name,
                provider=target.provider,
                limits=self._limits[target.provider],
            )
            try:
                await gen.open()
            except GatewayError as exc:
                errors.append(exc)
                if not exc.is_retryable:
                    raise
                continue
            return gen
        raise _most_meaningful(errors)


def _most_meaningful(errors: list[GatewayError]) -> GatewayError:
    """A client error explains more than a later outage; otherwise the last one."""
    for exc in errors:
        if 400 <= exc.http_status < 500 and exc.http_status != 429:
            return exc
    return errors[-1]
