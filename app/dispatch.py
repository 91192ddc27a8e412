"""Admission and the running set: the one way every route starts a generation.

Every route that generates (OpenAI, the simple POST and GET, resumable
streams, fan-out, WebSocket, and any added later) calls ``Dispatch.admit``
then ``Dispatch.open``, in this order:

1. drain: a draining instance refuses at once (503 ``shutting_down``), before
   anything is counted;
2. the client: who the request is for, as authentication found it (a key's
   fingerprint, or the address without keys; ``app.api.deps``);
3. this process's open-streams cap (503 ``too_many_open_streams``): a refusal
   that is not the client's doing comes before its own limits, so that it
   never uses up one of its requests per minute;
4. the client's rate limit and concurrency slot (429, ``app.ratelimit``);
5. open: a ``Generation`` on the route (``app.failover`` picks the attempts),
   which holds the admission ``Ticket`` until it is over; the ticket is
   released at once if nothing opens.

The running generations are kept here (``active``) for the drain and the
active-streams gauge; ``draining`` is set by ``app.shutdown``.
"""

from __future__ import annotations

from app.capacity import Capacity
from app.config import Settings
from app.errors import RateLimited, ShuttingDown
from app.failover import Failover
from app.metrics import Metrics
from app.ratelimit import NO_SLOT, RateLimits, Slot
from app.relay import Generation
from app.relay.structured import Structured, schema_of
from app.requests import ChatRequest
from app.routing import Route, Router
from app.telemetry import Telemetry
from app.upstreams import Upstreams

# What admission hands out: a place under the process cap and the client's
# limits, released once (idempotent) when the generation is over.
Ticket = Slot


class Dispatch:
    def __init__(
        self,
        settings: Settings,
        router: Router,
        upstreams: Upstreams,
        rate_limits: RateLimits,
        capacity: Capacity,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.router = router
        self.upstreams = upstreams
        self.rate_limits = rate_limits
        self.capacity = capacity
        self.metrics = metrics
        self.telemetry = Telemetry(metrics, router)
        self.active: set[Generation] = set()
        self.draining = False
        metrics.gauge("gateway_active_streams", "streams being relayed now", self.active.__len__)

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise ShuttingDown(
                "the server is shutting down; retry on another instance",
                code="shutting_down",
                retry_after=1,
            )

    async def admit(self, client: str) -> Ticket:
        """Steps 1, 3 and 4 of the module docstring for ``client`` (step 2)."""
        self.refuse_if_draining()
        hold = self.capacity.hold()
        try:
            slot = await self.rate_limits.admit(client)
        except BaseException as exc:
            hold.release()
            if isinstance(exc, RateLimited):
                self.metrics.rate_limited.labels(exc.code or "").inc()
            raise
        return hold.joined(slot)

    async def open(
        self,
        route: Route,
        request: ChatRequest,
        ticket: Ticket = NO_SLOT,
        *,
        structured: bool = False,
    ) -> Generation:
        """A generation on the first target that accepts the request (retries and fallbacks
        included), holding ``ticket`` until it is over. ``NO_SLOT``: the caller holds one
        ticket for several generations (fan-out) and releases it itself. ``structured``:
        its events carry the partial and final objects of ``request.response_format``
        (``app.relay.structured``; the simple protocols)."""
        try:
            self.refuse_if_draining()
            failover = Failover(self.upstreams, route, request, self.telemetry, self.settings)
            gen = Generation(failover)
            schema = schema_of(request.response_format) if structured else None
            if schema is not None:
                gen.shape = Structured(schema)
            await gen.open()
        except BaseException:
            await ticket.release()
            raise
        active = self.active
        active.add(gen)

        async def over() -> None:
            active.discard(gen)
            await ticket.release()

        gen.on_close = over
        return gen

    async def start(
        self, client: str, route: Route, request: ChatRequest, *, structured: bool = False
    ) -> Generation:
        """``admit`` then ``open``: one generation for one request."""
        return await self.open(route, request, await self.admit(client), structured=structured)
