"""The error body each path's clients expect before a stream starts.

Anthropic's shape under ``/v1/messages`` (its SDKs read ``error.type`` and
``error.message`` there), OpenAI's everywhere else. Every refusal renders
through ``error_body``: the app's exception handlers, the guard (Host, Origin,
Content-Type) and the body-size limit, so a client never meets the other
protocol's shape from a layer it does not know about.
"""

from __future__ import annotations

from app.errors import GatewayError
from app.wire.anthropic import error_body as anthropic_body

ANTHROPIC_PREFIX = "/v1/messages"


def error_body(path: str, exc: GatewayError) -> bytes:
    if path.startswith(ANTHROPIC_PREFIX) and path[
        len(ANTHROPIC_PREFIX) : len(ANTHROPIC_PREFIX) + 1
    ] in ("", "/"):
        return anthropic_body(exc)
    return exc.json_bytes()
