"""The Redis client that instances share (rate limits, replay logs), and its one failure.

Only ``connect()`` builds a client; every Redis failure anywhere becomes
``unavailable()``'s ``StoreUnavailable``: a 503 before a stream, an honest
ending during one.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from app.errors import StoreUnavailable

log = logging.getLogger("app.streams")


def connect(url: str) -> Any:
    """A client for ``url`` (no connection is made until first use)."""
    return redis.Redis.from_url(
        url,
        # A reader of a stream running on another instance holds one in XREAD
        # BLOCK; redis-py's default cap (100) would fail the 101st. A
        # ``max_connections`` in the URL wins.
        max_connections=10_000,
        socket_connect_timeout=2,
        socket_timeout=5,  # longer than any XREAD block
        health_check_interval=10,
        # A Redis that went away is reported within a second, not after retries.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2),
    )


def unavailable(exc: Exception) -> StoreUnavailable:
    log.warning("redis unavailable: %s", type(exc).__name__)
    return StoreUnavailable(
        "the gateway's shared state (Redis) is unreachable", code="store_unavailable", retry_after=1
    )
