"""Resumable streams: a generation that runs apart from its readers, through a replay log.

- ``ids``: stream ids (``gen_<128 bits>``) and event ids (``<stream>:<n>``);
- ``codec``: what a log needs from a wire format (``LogCodec``), which
  ``app.wire`` provides: this package writes and parses no wire format;
- ``store``: where logs live (the ``Store`` seam, ``MemoryStore``);
  ``redis_store``: the same in Redis, shared by every instance;
- ``producer``: what runs a generation into its log, ending included;
- ``readers``: who may read a stream, and a reader's body;
- ``registry``: ``Streams``, the streams this instance runs (reserve, launch,
  stop, the resume grace), and its public face.
"""

from __future__ import annotations

from typing import Any

from app.capacity import Capacity
from app.config import Settings
from app.streams.codec import LogCodec, LogEncoder
from app.streams.ids import parse_event_id
from app.streams.registry import Run, Streams
from app.streams.store import MemoryStore, Store

__all__ = ["LogCodec", "LogEncoder", "Run", "Streams", "make_streams", "parse_event_id"]


def make_streams(
    settings: Settings, redis_client: Any | None, codec: LogCodec, capacity: Capacity
) -> Streams:
    """The registry over Redis (``redis_client``, from ``app.sharedstate.connect``) or, without
    one, over this process's memory; its frames through ``codec``."""
    store: Store
    if redis_client is None:
        store = MemoryStore(settings.stream_ttl_s)
    else:
        from app.streams.redis_store import RedisStore

        # A running stream's keys outlive the longest it can run.
        run_ttl = settings.longest_stream_s() + settings.stream_ttl_s
        store = RedisStore(redis_client, settings.redis_prefix, settings.stream_ttl_s, run_ttl)
    return Streams(settings, store, codec, capacity)
