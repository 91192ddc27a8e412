"""A raw TCP relay (uvloop Protocols, bytes in -> bytes out): the floor for any
Python relay on this machine. ``python -m bench --parts floor`` runs the saturated
and unbatched loads through it, pinned like the gateway, to show what one read,
one write and the wake-ups cost before any HTTP, SSE or JSON work.

Run: ``python -m bench.relay --upstream-port U [--port P]``; prints ``READY <port>``.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop

from bench.common import raise_nofile


class Back(asyncio.Protocol):
    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.front.transport is not None:
            self.front.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.front.transport is not None:
            self.front.transport.close()


class Front(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport | None = None
        self.back: Back | None = None
        self.pending: list[bytes] = []
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.task = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, back = await loop.create_connection(
                lambda: Back(self), "127.0.0.1", self.upstream_port
            )
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.back = back
        assert back.transport is not None
        for data in self.pending:
            back.transport.write(data)
        self.pending = []
        if self.transport is None or self.transport.is_closing():
            back.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.back is None or self.back.transport is None:
            self.pending.append(data)
        else:
            self.back.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.back is not None and self.back.transport is not None:
            self.back.transport.close()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Front(upstream_port), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args(argv)
    raise_nofile()
    uvloop.run(serve(args.port, args.upstream_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
