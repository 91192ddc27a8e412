"""``python -m app``: run the gateway under uvicorn (uvloop, httptools; see app.server)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

import uvicorn

from app.config import SettingsError, load_settings
from app.logs import configure as configure_logs
from app.server import freeze_heap, uvicorn_options


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    configure_logs(settings.log_level)
    log = logging.getLogger("app")

    if not settings.api_keys:
        if not _is_loopback(args.host) and not settings.allow_unauthenticated:
            print(
                f"gateway: refusing to listen on {args.host} without authentication: "
                "set GATEWAY_API_KEYS, or GATEWAY_ALLOW_UNAUTHENTICATED=true to allow it",
                file=sys.stderr,
            )
            return 2
        log.warning(
            "GATEWAY_API_KEYS is not set: authentication is OFF (listening on %s)", args.host
        )

    from app.main import create_app

    try:
        app = create_app(settings)  # validates aliases and the default model too
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2

    # One process: this app. --workers N: each worker builds its own (app.server).
    options = uvicorn_options(settings, app if args.workers == 1 else None)
    if args.workers == 1:
        freeze_heap()
    uvicorn.run(host=args.host, port=args.port, workers=args.workers, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
