"""Liveness, readiness and metrics. Never behind auth, except ``/metrics`` when
``GATEWAY_METRICS_REQUIRE_KEY`` is set (its labels name models and routes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import State, require_key
from app.errors import StoreUnavailable
from app.metrics import CONTENT_TYPE
from app.wire.sse import dumps

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(state: State) -> Response:
    providers = {}
    for name, provider in state.upstreams.providers.items():
        providers[name] = "ready" if provider.ready else "starting"
    ok = bool(providers) and all(v == "ready" for v in providers.values())
    if state.dispatch.draining:
        ok = False  # so that load balancers stop sending new requests here
    redis = None
    if state.redis is not None:
        try:
            await state.streams.store.ping()
            redis = "ok"
        except StoreUnavailable:
            redis, ok = "unreachable", False
    # Open circuits are shown but do not make the instance unready: every
    # replica shares the same upstreams, and fallbacks may still answer.
    body = {
        "status": "draining" if state.dispatch.draining else "ready" if ok else "not_ready",
        "providers": providers,
        "circuits": state.upstreams.circuit_summary(state.router.metric_key),
    }
    if redis is not None:
        body["redis"] = redis
    # A 503 says when to look again, as every 503 does.
    headers = None if ok else {"Retry-After": "1"}
    return Response(
        dumps(body), status_code=200 if ok else 503, media_type="application/json", headers=headers
    )


@router.get("/metrics")
async def metrics(request: Request, state: State) -> Response:
    if state.settings.metrics_require_key:
        await require_key(request)  # 401 without a client key
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
