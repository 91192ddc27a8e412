"""The one seam between routing and providers.

A provider turns a ``ChatRequest`` into a stream of ``ChatEvent`` batches.

Contract, relied on by ``app.relay``:

- The first batch is ``[Start(...)]`` (possibly with more events), yielded as
  soon as the upstream has accepted the request (2xx headers, or a slot in the
  local model's queue). Anything that fails before that raises a
  ``GatewayError`` from the first ``__anext__``, so the HTTP status can still
  be chosen.
- Each later batch holds the events decoded from one upstream read. Batches
  let the wire write everything that arrived together in one send; an empty
  batch is never yielded.
- A stream that ends normally has yielded a ``Finish``. Failures after the
  start raise a ``GatewayError`` (``UpstreamTruncated`` for a cut or an
  unparseable chunk); the relay turns it into an in-band error.
- Closing the iterator (``aclose()``, or cancellation) releases the upstream
  connection at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.events import ChatEvent


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
    # Further OpenAI parameters passed through to OpenAI-kind upstreams as-is
    # (seed, response_format, ...); other kinds ignore them.
    extra: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    endpoint: str = ""  # the gateway route that asked, for metrics and logs
    # The last message is a partial assistant answer to be continued, not a
    # turn to answer (providers that accept it: ProviderConfig.accepts_continuation).
    continuation: bool = False


class Provider(Protocol):
    def stream(self, request: ChatRequest) -> AsyncIterator[list[ChatEvent]]: ...
