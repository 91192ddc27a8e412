"""Stream ids and event ids.

A stream's id, ``gen_`` and 128 random bits in hex, is all a reader needs to
follow it, so it cannot be guessed; it also names the stream's keys in the
store, so nothing else is ever accepted as one. An event id is
``<stream id>:<n>``, ``n`` the number of the event in the stream's log; a bare
``<stream id>`` is the id a reader gets before the first event.
"""

from __future__ import annotations

import re
import secrets

from app.errors import InvalidRequest, NotFound

STREAM_ID = re.compile(r"gen_[0-9a-f]{32}")


def new_stream_id() -> str:
    return "gen_" + secrets.token_hex(16)  # 128 bits: an id cannot be guessed


def is_stream_id(sid: str) -> bool:
    return STREAM_ID.fullmatch(sid) is not None


def unknown(sid: str) -> NotFound:
    """The one answer for an id that names no stream this client may see (never saying which)."""
    return NotFound(f"stream '{sid[:48]}' is unknown or expired", code="stream_not_found")


def parse_event_id(value: str, sid: str | None = None) -> tuple[str, int]:
    """``<stream>:<n>`` -> (stream, n); a bare ``<stream>`` (sent before the first event)
    -> (stream, -1). A 400 naming the problem otherwise."""
    stream, sep, number = value.rpartition(":")
    if not sep:
        stream, number = value, ""
    elif not (number.isascii() and number.isdigit() and len(number) <= 9):
        raise InvalidRequest(
            "Last-Event-ID: expected '<stream id>:<event number>' as sent in the stream's ids",
            param="last_event_id",
            code="invalid_last_event_id",
        )
    if sid is not None and stream != sid:
        raise InvalidRequest(
            "Last-Event-ID: it belongs to another stream",
            param="last_event_id",
            code="invalid_last_event_id",
        )
    return stream, int(number) if number else -1
