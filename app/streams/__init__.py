"""Resumable streams: the registry (``registry``) and where replay logs live (``store``)."""

from __future__ import annotations

from typing import Any

from app.config import Settings
from app.streams.registry import Run, Streams, parse_event_id
from app.streams.store import MemoryStore, Store

__all__ = ["Run", "Streams", "make_streams", "parse_event_id"]


def make_streams(settings: Settings, redis_client: Any | None) -> Streams:
    store: Store
    if redis_client is None:
        store = MemoryStore(settings.stream_ttl_s)
    else:
        from app.streams.redis_store import RedisStore

        # A running stream's keys outlive the longest it can run.
        run_ttl = settings.longest_stream_s() + settings.stream_ttl_s
        store = RedisStore(redis_client, settings.redis_prefix, settings.stream_ttl_s, run_ttl)
    return Streams(settings, store)
