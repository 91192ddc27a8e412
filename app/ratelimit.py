"""Rate limits and concurrency caps per client (API.md, Errors before the stream starts).

A client is its key (a fingerprint of it) or, when the gateway has no keys,
its address. Two limits, each off unless set:

- ``GATEWAY_RATE_LIMIT_RPM``: generations started in any rolling 60 s (a
  sliding log, so a burst cannot double the rate across a minute boundary);
  over it, ``429`` with ``Retry-After`` = when the oldest counted one leaves
  the window;
- ``GATEWAY_MAX_CONCURRENT_STREAMS``: generations running at once; over it,
  ``429`` with ``Retry-After: 1``.

With ``GATEWAY_REDIS_URL`` both are counted in Redis, atomically in one
script on Redis's clock, so that they hold across instances. A running
generation's slot is a lease that outlives the longest a generation can run,
so that an instance that dies frees its slots by itself. Without Redis
(and when the limits are off) nothing leaves the process.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from contextlib import suppress
from typing import Any

from redis.exceptions import RedisError

from app.config import Settings
from app.errors import RateLimited
from app.sharedstate import unavailable

WINDOW_S = 60.0


class Slot:
    """A running generation's place under the concurrency cap; ``release()`` is idempotent."""

    __slots__ = ()

    async def release(self) -> None:
        return None


NO_SLOT = Slot()


def _rpm_error(retry_after: float, rpm: int) -> RateLimited:
    return RateLimited(
        f"rate limit reached: {rpm} requests per minute for this client "
        "(GATEWAY_RATE_LIMIT_RPM); retry after the Retry-After seconds",
        code="rate_limit_exceeded",
        retry_after=max(1.0, retry_after),
    )


def _concurrency_error(cap: int) -> RateLimited:
    return RateLimited(
        f"too many concurrent streams: at most {cap} for this client "
        "(GATEWAY_MAX_CONCURRENT_STREAMS)",
        code="too_many_concurrent_streams",
        retry_after=1,
    )


class _MemorySlot(Slot):
    __slots__ = ("client", "limits")

    def __init__(self, limits: MemoryLimits, client: str) -> None:
        self.limits: MemoryLimits | None = limits
        self.client = client

    async def release(self) -> None:
        limits, self.limits = self.limits, None
        if limits is not None:
            active = limits.active
            left = active[self.client] - 1
            if left:
                active[self.client] = left
            else:
                del active[self.client]


class MemoryLimits:
    def __init__(self, rpm: int | None, cap: int | None) -> None:
        self.rpm = rpm
        self.cap = cap
        self.hits: dict[str, deque[float]] = {}
        self.active: dict[str, int] = {}

    async def admit(self, client: str) -> Slot:
        rpm, cap = self.rpm, self.cap
        hits: deque[float] | None = None
        if rpm is not None:
            now = asyncio.get_running_loop().time()
            hits = self.hits.get(client)
            if hits is None:
                if len(self.hits) >= 4096:  # forget clients with nothing in the window
                    cutoff = now - WINDOW_S
                    self.hits = {k: v for k, v in self.hits.items() if v and v[-1] > cutoff}
                hits = self.hits[client] = deque()
            while hits and hits[0] <= now - WINDOW_S:
                hits.popleft()
            if len(hits) >= rpm:
                raise _rpm_error(hits[0] + WINDOW_S - now, rpm)
        if cap is not None and self.active.get(client, 0) >= cap:
            raise _concurrency_error(cap)
        if hits is not None:
            hits.append(now)
        if cap is None:
            return NO_SLOT
        self.active[client] = self.active.get(client, 0) + 1
        return _MemorySlot(self, client)

    async def ping(self) -> None:
        return None


# KEYS: the rolling-window log, the running set. ARGV: rpm (0 = off), cap (0 =
# off), a unique member, the slot lease in seconds.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, cap, member, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {1, tostring(tonumber(oldest[2]) + 60 - now)}
  end
end
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= cap then
    return {2, '1'}
  end
  redis.call('ZADD', KEYS[2], now + lease, member)
  redis.call('EXPIRE', KEYS[2], math.ceil(lease) + 1)
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, member)
  redis.call('EXPIRE', KEYS[1], 61)
end
return {0, '0'}
"""


class _RedisSlot(Slot):
    __slots__ = ("key", "member", "r")

    def __init__(self, r: Any, key: str, member: str) -> None:
        self.r: Any | None = r
        self.key = key
        self.member = member

    async def release(self) -> None:
        r, self.r = self.r, None
        if r is not None:
            with suppress(RedisError):  # the lease frees it
                await r.zrem(self.key, self.member)


class RedisLimits:
    def __init__(self, r: Any, prefix: str, rpm: int | None, cap: int | None, lease_s: float):
        self.r = r
        self.prefix = prefix
        self.rpm = rpm
        self.cap = cap
        self.lease_s = lease_s
        self._admit = r.register_script(_ADMIT)

    async def admit(self, client: str) -> Slot:
        if self.rpm is None and self.cap is None:
            return NO_SLOT
        member = secrets.token_hex(8)
        running = f"{self.prefix}running:{client}"
        keys = [f"{self.prefix}rate:{client}", running]
        args = [self.rpm or 0, self.cap or 0, member, self.lease_s]
        try:
            verdict, value = await self._admit(keys=keys, args=args)
        except RedisError as exc:
            raise unavailable(exc) from None
        if verdict == 1:
            assert self.rpm is not None
            raise _rpm_error(float(value), self.rpm)
        if verdict == 2:
            assert self.cap is not None
            raise _concurrency_error(self.cap)
        return NO_SLOT if self.cap is None else _RedisSlot(self.r, running, member)


RateLimits = MemoryLimits | RedisLimits


def make_rate_limits(settings: Settings, redis_client: Any | None) -> RateLimits:
    rpm, cap = settings.rate_limit_rpm, settings.max_concurrent_streams
    if redis_client is None:
        return MemoryLimits(rpm, cap)
    # A slot outlives the longest a generation can run (and the resume grace).
    lease = settings.longest_stream_s() + 60
    return RedisLimits(redis_client, settings.redis_prefix, rpm, cap, lease)
