"""Liveness and readiness; never behind auth."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from app.api.deps import State
from app.wire.sse import dumps

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(state: State) -> Response:
    providers = {}
    for name, provider in state.router.providers.items():
        ready = getattr(provider, "ready", True)
        providers[name] = "ready" if ready else "starting"
    ok = bool(providers) and all(v == "ready" for v in providers.values())
    body = {"status": "ready" if ok else "not_ready", "providers": providers}
    return Response(dumps(body), status_code=200 if ok else 503, media_type="application/json")
