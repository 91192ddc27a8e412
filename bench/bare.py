"""A bare HTTP byte relay on aiohttp: what a minimal Python streaming proxy costs.

``python -m bench`` runs it beside the gateway, pinned to the same CPU and
measured the same way (process CPU time, RSS), so that every figure of the
gateway has a baseline taken in the same run on the same machine.

Contract: any ``POST <path>`` is forwarded, body as received, to
``<upstream><path>`` over one pooled ``aiohttp.ClientSession`` (no connection
limit, as the gateway's); the upstream's status and ``Content-Type`` are
copied and its body is streamed back as it arrives, one ``write`` per upstream
read (chunked). Nothing is parsed: no JSON, no SSE, no auth, no model names.
A client that disconnects cancels its handler, which closes the upstream
response (aiohttp's ``handler_cancellation``), as the gateway does.
``GET /healthz`` answers 200 for start-up checks.

Run: ``python -m bench.bare --upstream http://127.0.0.1:U [--port P]``; it
prints ``READY <port>`` once listening. uvloop, access log off, listen backlog
2048 (uvicorn's default, so a burst of connects meets the same queue).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import aiohttp
import uvloop
from aiohttp import web

from bench.common import raise_nofile

BACKLOG = 2048
_SESSION = web.AppKey("session", aiohttp.ClientSession)
_UPSTREAM = web.AppKey("upstream", str)


async def relay(request: web.Request) -> web.StreamResponse:
    app = request.app
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with app[_SESSION].post(app[_UPSTREAM] + request.path, data=body, headers=headers) as up:
        resp = web.StreamResponse(
            status=up.status,
            headers={"Content-Type": up.headers.get("Content-Type", "application/octet-stream")},
        )
        await resp.prepare(request)
        async for data in up.content.iter_any():
            await resp.write(data)
        await resp.write_eof()
        return resp


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(host: str, port: int, upstream: str) -> None:
    app = web.Application()
    # Same pool settings as the gateway's upstream session (app/providers/http.py).
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, connect=10),
    )
    app[_SESSION] = session
    app[_UPSTREAM] = upstream.rstrip("/")
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{path:.*}", relay)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=BACKLOG, reuse_address=True)
    await site.start()
    print(f"READY {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    args = parser.parse_args(argv)
    raise_nofile()
    uvloop.run(serve(args.host, args.port, args.upstream))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
