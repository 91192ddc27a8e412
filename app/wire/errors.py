"""The error body each path's clients expect before a stream starts.

Anthropic's shape under ``/v1/messages`` (its SDKs read ``error.type`` and
``error.message`` there), OpenAI's everywhere else. Every refusal renders
through ``error_body``: the app's exception handlers, the guard (Host, Origin,
Content-Type) and the body-size limit, so a client never meets the other
protocol's shape from a layer it does not know about.
"""

from __future__ import annotations

from starlette.types import Send

from app.errors import GatewayError
from app.wire.anthropic import error_body as anthropic_body

ANTHROPIC_PREFIX = "/v1/messages"


def error_body(path: str, exc: GatewayError) -> bytes:
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return anthropic_body(exc)
    return exc.json_bytes()


async def send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A whole JSON response through plain ASGI (middleware refusing before the app)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})
