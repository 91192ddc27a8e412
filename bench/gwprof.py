"""Run the gateway (``python -m app``) under cProfile and dump the stats on exit.

Used by ``python -m bench --profile``: ``python -m bench.gwprof OUT.prof [app args...]``.
Profiling starts on SIGUSR1 (the bench sends it after start-up and warm-up, so
imports and first-request costs stay out) and the stats are written when the
gateway exits. cProfile slows the gateway down (roughly 2x), so a profiled run
only says where the time goes, not how much there is.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from typing import Any


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    from app.__main__ import main as app_main

    prof = cProfile.Profile()

    def _start(signum: int, frame: Any) -> None:
        prof.enable()

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGUSR1, _start)
    # uvicorn re-raises SIGTERM after its graceful shutdown, with the handler it found
    # restored: make that handler an exception, so that the stats below get written.
    signal.signal(signal.SIGTERM, _exit)
    try:
        return app_main(argv)
    finally:
        prof.disable()
        prof.dump_stats(out)


if __name__ == "__main__":
    raise SystemExit(main())
