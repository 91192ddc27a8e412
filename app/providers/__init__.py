"""Provider kinds, each behind the ``Provider`` protocol (base.py)."""

from __future__ import annotations

import importlib.util
import logging

from app.config import ProviderConfig, Settings
from app.providers.base import Provider

log = logging.getLogger("app.providers")


def build_provider(name: str, config: ProviderConfig, settings: Settings) -> Provider | None:
    """A provider instance for ``config``; None when its optional extra is missing."""
    if config.kind in ("openai", "openai-compatible"):
        from app.providers.openai import OpenAIProvider

        return OpenAIProvider(name, config, settings)
    if config.kind == "anthropic":
        from app.providers.anthropic import AnthropicProvider

        return AnthropicProvider(name, config, settings)
    if config.kind == "gemini":
        from app.providers.gemini import GeminiProvider

        return GeminiProvider(name, config, settings)
    from app.providers.local import LocalProvider

    if importlib.util.find_spec("llama_cpp") is None:
        log.warning(
            "provider '%s' (the embedded model) is unavailable: install the 'local' extra", name
        )
        return None
    return LocalProvider(settings)
