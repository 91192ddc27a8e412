"""Replay logs in Redis, so that any instance can serve, resume or stop any stream.

Keys (under ``GATEWAY_REDIS_PREFIX``):

- ``stream:<id>``: a hash, ``client`` (who may read it), ``owner`` (the
  instance that runs it) and ``state`` (``running`` / ``ended``);
- ``stream:<id>:log``: a Redis Stream, one entry per frame (field ``f``),
  with the explicit id ``0-<n+1>`` for frame ``n``. The terminator's entry
  also holds ``e``, the finish reason: the end is data, never parsed out of
  a frame. A reader resumes after frame ``n`` with ``XREAD`` from
  ``0-<n+1>`` and follows it live with ``BLOCK``; and a second writer could
  never interleave (ids must grow). A batch that ends the stream is added in
  one ``MULTI``/``EXEC``, so that no ``XREAD`` returns the end without its
  terminator.
- ``stream:<id>:reader``: a lease held for readers on other instances (their
  instance renews it); the owner counts it as a reader for the resume grace.
- ``instance:<id>``: each instance's heartbeat (renewed every second,
  expiring after ``OWNER_TTL_S``). A reader that finds its stream's owner
  gone (crashed, killed) is told so (``OwnerLost``); its side builds the
  ending (``app.streams.readers``), which ``end_orphan`` appends by a script
  only if the log is still where the reader saw it end and has no ``e``, so
  that a stream never gets two endings.

Both keys of a running stream expire after the longest a stream can run plus
the TTL, and ``GATEWAY_STREAM_TTL_S`` after its end. Cancels go to every
instance on the ``cancel`` pub/sub channel, and set the hash's ``cancel``
flag, which the owner's heartbeat checks (a message sent while the owner's
subscription was down is not lost).

Readers on the instance that runs a stream follow a copy of its log kept in
this process while it runs (appended after Redis took each batch, so both
agree on every id): no Redis round trip and no connection held per local
reader. Readers elsewhere each hold a connection in a blocking ``XREAD``,
each reply a bounded piece (``COUNT``), so that a reader that stops reading
holds one piece, never a copy of the log.

Every Redis failure becomes ``StoreUnavailable``: a 503 before a stream, a
clean ending (``error``, ``end``, terminator) during one (the owner marks the
stream ``failed`` where it still can, and readers elsewhere end their own
clients' streams when they see it).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from contextlib import suppress
from typing import Any

from redis.exceptions import RedisError, ResponseError

from app.errors import StoreUnavailable
from app.sharedstate import unavailable
from app.streams.store import PIECE_BYTES, Entry, Log, Meta, OwnerLost

log = logging.getLogger("app.streams")

# Every HEARTBEAT_S an instance renews its heartbeat (which outlives a few
# missed renewals) and the leases of the readers it serves for streams running
# elsewhere. XREAD blocks at most _BLOCK_MS, so that a reader notices a closing
# instance, an expired stream or a lost owner.
HEARTBEAT_S = 1.0
# Longer than a Redis command can take here (5 s socket timeout, then retries),
# so that a slow Redis never makes a live owner look dead.
OWNER_TTL_S = 10.0
LEASE_S = 3.0
_BLOCK_MS = 700
# Frames per XREAD: a reader that is behind (a replay, a slow client) reads
# the log in pieces of about PIECE_BYTES, never the whole log in one reply.
_COUNT_FIRST = 64
_COUNT_MAX = 4096

# A field set on a stream's hash only while it exists (never a key without TTL).
_MARK = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""

# The ending of a log whose writer cannot write it (its owner is gone, or its
# owner's Redis blipped): appended only if the log still stops where the
# caller saw it stop, and has no end. Frames are opaque: the end is the ``e``
# field. KEYS: the stream's hash, its log. ARGV: the log's last entry id as
# the caller saw it, the TTL, the finish reason, then the frames.
_ABANDON = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
local tail = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local last = '0-0'
if #tail > 0 then
  last = tail[1][1]
  local fields = tail[1][2]
  for i = 1, #fields, 2 do
    -- Already over: the end is logged (only marking it ended failed).
    if fields[i] == 'e' then return 0 end
  end
end
if last ~= ARGV[1] then return 0 end
local n = tonumber(string.match(last, '-(%d+)$'))
for i = 4, #ARGV do
  n = n + 1
  if i == #ARGV then
    redis.call('XADD', KEYS[2], '0-' .. n, 'f', ARGV[i], 'e', ARGV[3])
  else
    redis.call('XADD', KEYS[2], '0-' .. n, 'f', ARGV[i])
  end
end
redis.call('HSET', KEYS[1], 'state', 'ended')
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


class RedisStore:
    def __init__(self, client: Any, prefix: str, ttl_s: float, run_ttl_s: float) -> None:
        self.r = client
        self.prefix = prefix
        self.ttl = max(1, round(ttl_s))
        self.run_ttl = max(1, round(run_ttl_s))
        self.channel = prefix + "cancel"
        self.closing = False  # set when this instance exits: readers return (clients reconnect)
        self.instance = secrets.token_hex(8)
        self._abandon = client.register_script(_ABANDON)
        self._mark = client.register_script(_MARK)
        self._local: dict[str, Log] = {}  # the streams this instance runs
        self._following: Counter[str] = Counter()  # streams read here that run elsewhere

    def _key(self, sid: str) -> str:
        return f"{self.prefix}stream:{sid}"

    async def create(self, sid: str, client: str) -> None:
        key = self._key(sid)
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.hset(
                    key, mapping={"client": client, "owner": self.instance, "state": "running"}
                )
                pipe.expire(key, self.run_ttl)
                await pipe.execute()
        except RedisError as exc:
            raise unavailable(exc) from None
        self._local[sid] = Log(client)

    async def append(
        self, sid: str, first: int, frames: list[bytes], end: str | None = None
    ) -> None:
        key = self._key(sid) + ":log"
        try:
            if len(frames) == 1 and first and end is None:
                # One frame, the common case while streaming: a plain command costs
                # redis-py less CPU than a pipeline.
                results = [await self._xadd(key, first + 1, frames[0])]
            else:
                # An ending batch in one MULTI/EXEC: no XREAD sees its end without
                # its terminator. (An entry id that clashes fails alone in EXEC.)
                async with self.r.pipeline(transaction=end is not None) as pipe:
                    _add(pipe, key, first, frames, end)
                    if first == 0:
                        pipe.expire(key, self.run_ttl)
                    results = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise unavailable(exc) from None
        clashes = []
        for i, result in enumerate(results[: len(frames)]):
            if isinstance(result, Exception):
                if "equal or smaller" not in str(result):
                    raise unavailable(result)
                clashes.append(i)
        if clashes:
            await self._check_ours(key, first, frames, clashes)
        self._local[sid].extend(frames, end)

    async def _check_ours(
        self, key: str, first: int, frames: list[bytes], clashes: list[int]
    ) -> None:
        """Entries already there: ours (a command re-sent after a lost reply), or another
        instance's, which ended the stream believing this one gone: then stop."""
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for i in clashes:
                    pipe.xrange(key, f"0-{first + 1 + i}", f"0-{first + 1 + i}")
                found = await pipe.execute()
        except RedisError as exc:
            raise unavailable(exc) from None
        for i, entries in zip(clashes, found, strict=True):
            if not entries or entries[0][1].get(b"f") != frames[i]:
                raise StoreUnavailable(
                    "another gateway instance ended this stream", code="stream_taken_over"
                )

    async def _xadd(self, key: str, entry: int, frame: bytes) -> Any:
        try:
            return await self.r.execute_command("XADD", key, f"0-{entry}", "f", frame)
        except ResponseError as exc:
            return exc

    async def finish(self, sid: str) -> None:
        key = self._key(sid)
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.hset(key, "state", "ended")
                pipe.expire(key, self.ttl)
                pipe.expire(key + ":log", self.ttl)
                await pipe.execute()
        except RedisError as exc:
            raise unavailable(exc) from None
        finally:
            local = self._local.pop(sid, None)
            if local is not None:
                local.close()

    async def fail(self, sid: str, first: int, frames: list[bytes], end: str) -> None:
        local = self._local.pop(sid, None)
        if local is not None:
            local.extend(frames, end)
        key = self._key(sid)
        with suppress(RedisError):
            # A blip: Redis answers again, so the ending goes where every reader
            # finds it (unless the log is not where this instance left it).
            args = [f"0-{first}", self.ttl, end, *frames]
            if not await self._abandon(keys=[key, key + ":log"], args=args):
                await self._mark(keys=[key], args=["state", "failed"])

    async def discard(self, sid: str) -> None:
        key = self._key(sid)
        try:
            await self.r.delete(key, key + ":log")
        except RedisError as exc:
            raise unavailable(exc) from None
        finally:
            self._local.pop(sid, None)

    async def meta(self, sid: str) -> Meta | None:
        key = self._key(sid)
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.hgetall(key)
                pipe.xrevrange(key + ":log", count=1)
                fields, tail = await pipe.execute()
        except RedisError as exc:
            raise unavailable(exc) from None
        client = fields.get(b"client")
        if client is None:
            return None  # expired, or lost (a Redis restarted without persistence)
        last = _number(tail[0][0]) if tail else -1
        end = tail[0][1].get(b"e") if tail else None
        finish = None if end is None else end.decode()
        # A logged end is the end, even if marking the state failed after it.
        ended = finish is not None or fields.get(b"state") == b"ended"
        return Meta(client.decode(), ended, last, finish)

    def follow(self, sid: str, after: int) -> AsyncGenerator[Entry, None]:
        local = self._local.get(sid)
        return local.follow(after) if local is not None else self._follow(sid, after)

    async def _follow(self, sid: str, after: int) -> AsyncGenerator[Entry, None]:
        key = self._key(sid)
        log_key = key + ":log"
        last = b"0-%d" % (after + 1)
        r = self.r
        try:
            # The lease now; the heartbeat renews it while this reader follows,
            # even while it waits on a slow client.
            await r.set(key + ":reader", b"1", px=int(LEASE_S * 1000))
        except RedisError as exc:
            raise unavailable(exc) from None
        self._following[sid] += 1
        try:
            async for item in self._read_log(sid, key, log_key, last):
                yield item
        finally:
            left = self._following[sid] - 1
            if left:
                self._following[sid] = left
            else:
                del self._following[sid]

    async def _read_log(
        self, sid: str, key: str, log_key: str, last: bytes
    ) -> AsyncGenerator[Entry, None]:
        r = self.r
        count = _COUNT_FIRST
        while not self.closing:
            try:
                found = await r.xread({log_key: last}, count=count, block=_BLOCK_MS)
                if not found:
                    owner, state = await r.hmget(key, "owner", "state")
                    if owner is None:
                        return  # expired
                    if state == b"failed":  # its owner could not log its end
                        raise StoreUnavailable(
                            "the stream's log could not be kept", code="store_unavailable"
                        )
                    if not await r.exists(f"{self.prefix}instance:{owner.decode()}"):
                        raise OwnerLost(_number(last))
            except RedisError as exc:
                raise unavailable(exc) from None
            if not found:
                continue
            entries = found[0][1]
            entry, fields = entries[-1]
            last = entry
            data = b"".join(f[b"f"] for _, f in entries)
            # The next read asks for about PIECE_BYTES of frames of this size.
            count = min(_COUNT_MAX, max(1, len(entries) * PIECE_BYTES // len(data)))
            # Only the last entry can be the terminator (nothing is logged after it).
            end = fields.get(b"e")
            if end is not None:
                yield _number(entry), data, end.decode()
                return
            yield _number(entry), data, None

    async def end_orphan(self, sid: str, last: int, frames: list[bytes], end: str) -> bool:
        key = self._key(sid)
        args = [f"0-{last + 1}", self.ttl, end, *frames]
        try:
            return bool(await self._abandon(keys=[key, key + ":log"], args=args))
        except RedisError as exc:
            raise unavailable(exc) from None

    async def has_reader(self, sid: str) -> bool:
        try:
            return bool(await self.r.exists(self._key(sid) + ":reader"))
        except RedisError as exc:
            raise unavailable(exc) from None

    async def publish_cancel(self, sid: str) -> None:
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                # The flag for an owner that missed the message (its subscription
                # was down): its heartbeat finds it within a second.
                await self._mark(keys=[self._key(sid)], args=["cancel", "1"], client=pipe)
                pipe.publish(self.channel, sid)
                await pipe.execute()
        except RedisError as exc:
            raise unavailable(exc) from None

    async def listen(self, on_cancel: Callable[[str], None]) -> None:
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(on_cancel))
        try:
            await self._listen(on_cancel)
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, on_cancel: Callable[[str], None]) -> None:
        """Every second, in one round trip: this instance is alive, its remote readers'
        leases, and the cancel flags of the streams it runs."""
        key = f"{self.prefix}instance:{self.instance}"
        lease_ms = int(LEASE_S * 1000)
        while True:
            owned = list(self._local)
            try:
                async with self.r.pipeline(transaction=False) as pipe:
                    pipe.set(key, b"1", px=int(OWNER_TTL_S * 1000))
                    for sid in self._following:
                        pipe.set(self._key(sid) + ":reader", b"1", px=lease_ms)
                    for sid in owned:
                        pipe.hget(self._key(sid), "cancel")
                    flags = (await pipe.execute())[-len(owned) :] if owned else []
            except Exception as exc:  # never let the heartbeat die: peers would end our streams
                if not isinstance(exc, RedisError):
                    log.warning("heartbeat: %s", type(exc).__name__)
                flags = []
            for sid, flag in zip(owned, flags, strict=False):
                if flag:
                    on_cancel(sid)
            await asyncio.sleep(HEARTBEAT_S)

    async def _listen(self, on_cancel: Callable[[str], None]) -> None:
        lost = False
        while True:
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if lost:
                    log.warning("redis cancel channel back")
                    lost = False
                while True:
                    # A timeout, not a blocking read: a connection that went
                    # half-open is found by the health check between reads.
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is not None and msg["type"] == "message":
                        on_cancel(msg["data"].decode())
            except (RedisError, OSError) as exc:
                if not lost:  # once per outage, not once per retry
                    log.warning("redis cancel channel lost (%s); resubscribing", type(exc).__name__)
                    lost = True
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()

    async def ping(self) -> None:
        try:
            await asyncio.wait_for(self.r.ping(), 2)
        except (RedisError, TimeoutError) as exc:
            raise unavailable(exc) from None

    async def aclose(self) -> None:
        await self.r.aclose()


def _number(entry_id: bytes) -> int:
    """Frame number of a log entry id ``0-<n+1>``."""
    return int(entry_id.partition(b"-")[2]) - 1


def _add(pipe: Any, key: str, first: int, frames: list[bytes], end: str | None) -> None:
    """XADDs of ``frames`` from number ``first``; ``end`` beside the last one."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        fields = {"f": frame} if end is None or i < last else {"f": frame, "e": end}
        pipe.xadd(key, fields, id=f"0-{first + 1 + i}")
