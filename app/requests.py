"""What a chat request is once a route has parsed it, whatever its wire format.

Routes build a ``ChatRequest`` from their body (``app.api.schemas``);
failover hands it to each attempt's provider, which turns it into its own
upstream's request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ChatRequest:
    """A chat request in the gateway's own terms.

    ``messages`` keep OpenAI's shape (roles system/user/assistant/tool, content
    as text or a list of parts, assistant ``tool_calls``); each provider turns
    them into its own. ``model`` is the upstream's model id, without the
    provider prefix.
    """

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    # Structured output, in OpenAI's shape: {"type": "json_schema", "json_schema":
    # {"name", "schema", "strict"}} or {"type": "json_object"}. OpenAI kinds pass
    # it on; Anthropic gets a forced tool, the local model a grammar.
    response_format: dict[str, Any] | None = None
    # Further OpenAI parameters passed through to OpenAI-kind upstreams as-is
    # (seed, penalties, ...); other kinds ignore them.
    extra: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    endpoint: str = ""  # the gateway route that asked, for metrics and logs
    # The last message is a partial assistant answer to be continued, not a
    # turn to answer (providers that accept it: ProviderConfig.accepts_continuation).
    continuation: bool = False
