"""A spec-correct, byte-level Server-Sent Events decoder for upstream streams.

WHATWG HTML, "Parsing an event stream": lines end with CRLF, LF or CR (and
nothing else: U+2028 inside a JSON payload is not a line break, which is why
``str.splitlines()`` must never be used here). Only whole lines are decoded,
and line ends are ASCII, so a multi-byte character split across two reads is
always whole by the time its line is complete.

The fast path (no CR in the buffer, one ``split``) is what every real
upstream sends; CR handling is there for spec correctness.
"""

from __future__ import annotations

__all__ = ["SSEDecoder"]


class SSEDecoder:
    __slots__ = ("_buf", "_data", "_event")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._event = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """Add bytes; return the ``(event, data)`` pairs they completed."""
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            # A CR at the very end may be the first half of a CRLF: keep it.
            hold = buf.endswith(b"\r")
            if hold:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            lines = buf.split(b"\n")
            self._buf = lines.pop() + (b"\r" if hold else b"")
        else:
            lines = buf.split(b"\n")
            self._buf = lines.pop()
        if not lines:
            return []
        out: list[tuple[bytes, bytes]] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    joined = data[0] if len(data) == 1 else b"\n".join(data)
                    out.append((self._event or b"message", joined))
                    data = self._data = []
                self._event = b""
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                value = line[6:]
                self._event = value[1:] if value.startswith(b" ") else value
            # id:, retry:, comments (":") and unknown fields need nothing here.
        return out
