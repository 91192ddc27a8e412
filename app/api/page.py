"""The demo chat page at ``/`` and its files under ``/static/`` (plain HTML, CSS and JS)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

STATIC = Path(__file__).resolve().parent.parent / "static"

# The page loads only its own files and talks only to its own origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)

# Sent with the page and with every file under /static/ (app.main wraps them).
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # frame-ancestors above, for browsers that predate it.
    "X-Frame-Options": "DENY",
}

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return FileResponse(
        STATIC / "index.html",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )
