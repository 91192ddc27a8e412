"""Time to first event, direct and through nginx running the repository's config.

    .venv/bin/python -m bench.nginx [-n 200]

Starts a fake OpenAI upstream, the gateway (in-process uvicorn) and nginx
(``nginx/gateway.conf``, rendered as in tests/test_nginx.py), then times
sequential simple-protocol requests from send to the first content event.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests.fakes import OpenAIFake, Scenario
from tests.harness import GatewayServer, fake_providers, free_port, make_settings
from tests.test_nginx import Nginx, render


def first_event_ms(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    elapsed = None
    with client.stream("POST", url + "/chat/stream", json={"prompt": "hi"}) as r:
        for line in r.iter_lines():
            if elapsed is None and line.startswith('data: {"content"'):
                elapsed = (time.perf_counter() - started) * 1000
    if elapsed is None:
        raise RuntimeError("no content event")
    return elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200)
    n = parser.parse_args().n
    with OpenAIFake() as fake, tempfile.TemporaryDirectory() as tmp:
        fake.default = Scenario(chunks=["a", "b"])
        settings = make_settings(providers=fake_providers(fake), default_model="openai/gpt-4o-mini")
        gw = GatewayServer(settings).start()
        port = free_port()
        nginx = Nginx(render(gw.port, port, Path(tmp)), port).start()
        try:
            results = {}
            for name, url in (("direct", gw.url), ("nginx", nginx.url)):
                with httpx.Client(timeout=10) as client:
                    for _ in range(20):  # warm up connections
                        first_event_ms(client, url)
                    results[name] = [first_event_ms(client, url) for _ in range(n)]
        finally:
            nginx.stop()
            gw.stop()
    for name, values in results.items():
        print(
            f"{name:7s} first content event: p50 {statistics.median(values):.2f} ms, "
            f"p99 {pct(values, 0.99):.2f} ms (n={n})"
        )
    added = statistics.median(results["nginx"]) - statistics.median(results["direct"])
    print(f"nginx adds {added:+.2f} ms at the median")


if __name__ == "__main__":
    main()
