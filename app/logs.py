"""Structured logs: one JSON object per line, for machines first.

Fields passed as ``extra={"fields": {...}}`` become top-level keys. Nothing
here adds prompt text or keys; callers log ids, names and numbers only.
"""

from __future__ import annotations

import logging
import re
import time

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


# A path's query string, to the next space: "/ws/chat?access_token=..." keeps "/ws/chat".
_QUERY = re.compile(r"(/[^\s?]*)\?\S*")


class DropQueryStrings(logging.Filter):
    """Strips query strings from uvicorn's own lines, which name the path with
    its query (``"WebSocket /ws/chat?access_token=..." [accepted]``, logged
    whatever ``access_log`` says): they can carry a client's key."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn"):
            if isinstance(record.args, tuple):
                record.args = tuple(
                    a.partition("?")[0] if isinstance(a, str) and a.startswith("/") else a
                    for a in record.args
                )
            message = record.getMessage()
            if "?" in message:  # a path written into the message itself
                record.msg = _QUERY.sub(r"\1", message)
                record.args = None
        return True


def configure(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    # On the handler, so it sees the records of every logger that reaches it.
    handler.addFilter(DropQueryStrings())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers keep their levels but write through ours.
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
