"""The one seam between the gateway and its providers.

A provider turns a ``ChatRequest`` (``app.requests``) into a stream of
``ProviderEvent`` batches.

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
from typing import Protocol

from app.events import ProviderEvent
from app.requests import ChatRequest


class Provider(Protocol):
    """What the gateway needs of a provider kind (openai, anthropic, local)."""

    @property
    def ready(self) -> bool:
        """Whether it can take requests now (``/readyz``); HTTP providers always can."""
        ...

    async def start(self, *, warm: bool) -> None:
        """At app start. ``warm``: a configured route names this provider (the default
        model, an alias target), so prepare now (load a local model); otherwise prepare on
        first use, and hold nothing until then. A no-op for HTTP providers."""
        ...

    def stream(self, request: ChatRequest) -> AsyncIterator[list[ProviderEvent]]: ...

    async def list_models(self) -> list[str]:
        """The model ids the upstream says it serves (``GET /v1/models`` for a provider
        configured without a ``models`` list; the caller bounds the wait); raises
        ``GatewayError`` when it cannot tell."""
        ...

    async def aclose(self) -> None:
        """Release connections and models at app exit."""
        ...
