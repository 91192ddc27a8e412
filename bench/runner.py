"""The orchestrator behind ``python -m bench`` (``make bench``).

One run measures the same loads three ways, back to back, so that every figure
of the gateway has a baseline taken minutes apart on the same machine (it is
shared and drifts 2-3x between runs: read the ratios):

- ``direct``: straight to the fake upstream (``bench.upstream``), the floor of
  the harness itself (TTFT, what the client can do);
- ``bare``: through ``bench.bare``, a bare aiohttp byte relay (one pooled
  ClientSession, one write per upstream read, no parsing): what a minimal Python
  streaming proxy costs;
- ``gateway``: through ``python -m app``.

The bare relay and the gateway run pinned to the same CPU (``taskset -c 0``);
this process (the load client) and the fake upstream run on CPU 1. Their CPU is
the process CPU clock (the utime+stime of /proc/<pid>/stat at ns resolution; the
tick-based stat value is kept in the JSON too), summed over the process tree;
RSS is VmRSS from /proc/<pid>/status.

Parts (``--parts``, default all; sizes of the full run, ``--quick`` is smaller):

- ``ttft``: 200 sequential requests (1 content chunk) on a keep-alive connection;
  TTFT = request written -> first content event; added TTFT = minus direct's.
  Also the CPU per request (of a 1-chunk request: every per-request cost, and
  one chunk).
- ``saturated``: 64 streams x 5000 chunks as fast as flow control allows. Each
  stream waits after its first chunk until all 64 are set up, then all go at
  once. CPU per relayed chunk.
- ``unbatched``: 64 streams x 50 chunks 100 ms apart, so each chunk is its own
  read and write. CPU per relayed chunk (bare and gateway only).
- ``floor``: the saturated and unbatched loads through ``bench.relay``, a raw
  uvloop TCP relay (no HTTP at all) pinned like the others: what one read, one
  write and the wake-ups cost on this machine, under any Python relay.
- ``routes``: the ``ttft`` and ``unbatched`` loads (the latter with
  ``route_chunks`` per stream) through ``POST /v1/responses`` and
  ``POST /v1/messages``. Direct and bare call the fake upstream's own Responses and
  Messages streams; the gateway translates them from its Chat Completions.
- ``burst``: 1,000 streams requested at once (each on a new connection; the
  client has written every request well within 1 s), 5 chunks 1 s apart: how
  many complete, TTFT p50 (from the connect).
- ``rss``: a fresh process of each (bare, gateway): its RSS before any traffic
  (memory before any traffic); then after a warm-up, 5,000 near-idle streams
  opened (at most 500 waiting for their first token at a time) and held after
  their first token (the fake upstream holds them until ``POST /release``):
  (RSS while held - RSS before) / streams; then they are released and must all
  complete. Also a fresh gateway with the embedded model enabled but unused: its
  RSS before any traffic against the one with it off.

Only when asked for (``--parts many,resumable``):

- ``many``: 1,000 concurrent streams x 50 chunks 20 ms apart: how many complete
  (every chunk and the end, no error), TTFT p99.
- ``resumable``: the cost of the replay log. The unbatched and the saturated
  loads (the latter with ``res_sat_chunks`` per stream) through the simple
  protocol: (a) ``POST /chat/stream`` (straight from the generation, no log),
  (b) ``GET /chat/stream`` with the in-memory log, (c) ``GET /chat/stream`` with
  the log in Redis: a second gateway with ``GATEWAY_REDIS_URL`` pointing at a
  ``redis-server`` of its own, pinned to the load CPU. Gateway CPU per chunk as
  above; Redis's CPU is measured too, apart (info).

``--workers N`` (N > 1) adds the part ``workers``: a second gateway run as
``python -m app --workers N``, pinned to every CPU this bench may use (the load
shares them), through the saturated and burst loads, against the one-worker
gateway's figures of the same run (CPU summed over the supervisor and workers).

CPU per chunk is taken over the steady window (every stream set up -> the first
one about to end), so request set-up and teardown stay out; the whole-run
figure, set-up included, is in the JSON too. Results go to stdout as a table
(``bench.report``: gateway, bare, the ratio, the target, met or not) and to
``bench/results/latest.json``; ``--profile`` runs the gateway under cProfile
(``bench/results/gateway-profile.txt``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.client import (
    REQUESTS,
    SSEClientProtocol,
    StreamResult,
    connect,
    http_get,
    one_stream,
)
from bench.common import (
    API_KEY,
    GATEWAY_PROVIDER,
    CpuMeter,
    cpu_s,
    model_id,
    process_tree,
    raise_nofile,
    rss_kib,
    summarize,
    system_cpu_s,
)
from bench.report import render

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
PARTS = ("ttft", "saturated", "unbatched", "floor", "routes", "burst", "rss")
EXTRA_PARTS = ("many", "resumable")  # only when asked for
ROUTES = ("responses", "messages")  # the routes part: protocols of bench.client
REDIS_SERVER = "/usr/bin/redis-server"


@dataclass(frozen=True, slots=True)
class Sizes:
    warmup: int = 20
    ttft_requests: int = 200
    sat_streams: int = 64
    sat_chunks: int = 5000
    # After its first chunk each stream waits until all are set up, then they go together.
    unb_streams: int = 64
    unb_chunks: int = 50
    unb_interval_ms: int = 100
    # routes: chunks per stream of the unbatched load through /v1/responses, /v1/messages.
    route_chunks: int = 50
    burst_streams: int = 1000
    burst_chunks: int = 5
    burst_interval_ms: int = 1000
    many_streams: int = 1000
    many_chunks: int = 50
    many_interval_ms: int = 20
    rss_streams: int = 5000
    # rss: streams opened but without their first token yet, at most (a connect storm
    # past the listen backlog would only measure SYN retries).
    rss_wave: int = 500
    # resumable: chunks per stream of its saturated load (a Redis log stores each one).
    res_sat_chunks: int = 5000
    part_timeout_s: float = 180.0


FULL = Sizes()
QUICK = Sizes(
    warmup=5,
    ttft_requests=40,
    sat_streams=16,
    sat_chunks=3000,
    unb_streams=16,
    unb_chunks=10,
    route_chunks=10,
    burst_streams=200,
    burst_chunks=3,
    burst_interval_ms=500,
    many_streams=100,
    many_chunks=10,
    rss_streams=500,
    res_sat_chunks=1000,
    part_timeout_s=30.0,
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# CPUs this bench may use, before it pins itself to the load CPU (children inherit that).
ALL_CPUS = sorted(os.sched_getaffinity(0))


def pinned(cmd: list[str], cpu: int | str | None) -> list[str]:
    """``cmd`` under ``taskset -c cpu`` (an int, or a list such as "0,1"); unpinned
    (every CPU this bench may use, not only the load CPU it runs on) when None."""
    cpus = ",".join(map(str, ALL_CPUS)) if cpu is None else str(cpu)
    if shutil.which("taskset"):
        return ["taskset", "-c", cpus, *cmd]
    if cpu is None:
        return cmd
    raise SystemExit("taskset not found (util-linux); run with --no-pin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> int | None:
    if proc is None:
        return None
    if proc.stdout is not None:  # spawn_ready's pipe (READY <port>)
        proc.stdout.close()
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


# --- processes -----------------------------------------------------------------------------------


def spawn_ready(cmd: list[str], log_path: Path, what: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a helper that prints ``READY <port>`` once listening."""
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=logf, start_new_session=True
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("READY "):
        stop_process(proc)
        raise SystemExit(f"{what} did not start: {line!r}\n{tail(log_path)}")
    return proc, int(line.split()[1])


class Upstream:
    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = RESULTS_DIR / "upstream.log"

    def start(self) -> None:
        cmd = pinned([sys.executable, "-m", "bench.upstream", "--port", "0"], self.cpu)
        self.proc, self.port = spawn_ready(cmd, self.log_path, "fake upstream")
        log(f"fake upstream on {HOST}:{self.port} (pid {self.proc.pid}, cpu {self.cpu})")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stats(self) -> dict[str, int]:
        status, body = await http_get(HOST, self.port, "/stats")
        return orjson.loads(body) if status == 200 else {}

    async def release(self) -> int:
        """Let every stream held by a barrier go on; how many were held."""
        status, body = await http_get(HOST, self.port, "/release", method="POST")
        return int(orjson.loads(body)["released"]) if status == 200 else 0

    def stop(self) -> None:
        stop_process(self.proc)


class Bare:
    """``bench.bare``, the bare aiohttp byte relay, pinned like the gateway."""

    name = "bare"

    def __init__(self, upstream_port: int, cpu: int | None) -> None:
        self.upstream_port = upstream_port
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = RESULTS_DIR / "bare.log"

    async def start(self) -> None:
        cmd = [sys.executable, "-m", "bench.bare", "--host", HOST, "--port", "0"]
        cmd += ["--upstream", f"http://{HOST}:{self.upstream_port}"]
        self.proc, self.port = spawn_ready(pinned(cmd, self.cpu), self.log_path, "bare relay")
        affinity = sorted(os.sched_getaffinity(self.proc.pid))
        log(f"bare relay on {HOST}:{self.port} (pid {self.proc.pid}, cpus {affinity})")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def target(self, route: str = "openai") -> Target:
        return Target("bare", self.port, "", self.pid, route)

    def stop(self) -> int | None:
        return stop_process(self.proc)


class Gateway:
    def __init__(
        self,
        upstream_port: int,
        cpu: int | str | None,
        profile: bool = False,
        extra_env: dict[str, str] | None = None,
        name: str = "gateway",
        workers: int = 1,
    ) -> None:
        self.upstream_port = upstream_port
        self.cpu = cpu
        self.workers = workers
        self.profile = profile
        self.extra_env = extra_env or {}
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        self.log_path = RESULTS_DIR / f"{name}.log"
        self.startup_s = 0.0

    @staticmethod
    def available() -> str | None:
        """None if ``python -m app`` can be tried, else why not."""
        if not (ROOT / "app" / "__main__.py").exists():
            return "app/__main__.py does not exist (python -m app is not written yet)"
        return None

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("GATEWAY_", "OPENAI_", "ANTHROPIC_"))
        }
        providers = {
            GATEWAY_PROVIDER: {
                "kind": "openai-compatible",
                "base_url": f"http://{HOST}:{self.upstream_port}/v1",
                "api_key": "bench",
            }
        }
        env.update(
            {
                "GATEWAY_LOCAL_ENABLED": "false",
                "GATEWAY_PROVIDERS": orjson.dumps(providers).decode(),
                "GATEWAY_DEFAULT_MODEL": f"{GATEWAY_PROVIDER}/{model_id(10, 0)}",
                "GATEWAY_API_KEYS": API_KEY,
                "GATEWAY_LOG_LEVEL": "warning",
                "GATEWAY_FIRST_TOKEN_TIMEOUT_S": "60",
                "GATEWAY_IDLE_TIMEOUT_S": "60",
                "GATEWAY_TOTAL_TIMEOUT_S": "600",
                "GATEWAY_PING_INTERVAL_S": "15",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.port = free_port()
        module = ["-m", "app"]
        if self.profile:
            module = ["-m", "bench.gwprof", str(RESULTS_DIR / f"gateway-{self.starts + 1}.prof")]
        cmd = [sys.executable, *module, "--host", HOST, "--port", str(self.port)]
        if self.workers != 1:
            cmd += ["--workers", str(self.workers)]
        cmd = pinned(cmd, self.cpu)
        self.starts += 1
        mode = "wb" if self.starts == 1 else "ab"
        with open(self.log_path, mode) as logf:
            logf.write(f"--- start {self.starts}: {' '.join(cmd)}\n".encode())
            logf.flush()
            return subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def start(self) -> None:
        self.proc = self._spawn()
        t0 = time.perf_counter()
        last = "no answer"
        while time.perf_counter() - t0 < 60:
            if self.proc.poll() is not None:
                raise GatewayFailed(
                    f"gateway exited with {self.proc.returncode} during startup:\n"
                    f"{tail(self.log_path)}"
                )
            try:
                status, body = await http_get(HOST, self.port, "/healthz", limit_s=2)
                if status == 200:
                    break
                last = f"HTTP {status}: {body[:200]!r}"
            except (TimeoutError, OSError, ValueError, IndexError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
        else:
            self.stop()
            raise GatewayFailed(
                f"gateway /healthz not 200 after 60 s ({last})\n{tail(self.log_path)}"
            )
        self.startup_s = time.perf_counter() - t0
        affinity = sorted(os.sched_getaffinity(self.proc.pid))
        log(
            f"{self.name} on {HOST}:{self.port} (pid {self.proc.pid}, cpus {affinity}, "
            f"ready in {self.startup_s:.1f}s)"
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def target(self, route: str = "openai") -> Target:
        return Target(self.name, self.port, f"{GATEWAY_PROVIDER}/", self.pid, route)

    def stop(self) -> int | None:
        return stop_process(self.proc)


class GatewayFailed(Exception):
    pass


class RedisServer:
    """A throwaway ``redis-server`` (no persistence) on a free loopback port."""

    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.dir: str | None = None
        self.log_path = RESULTS_DIR / "redis.log"

    @staticmethod
    def binary() -> str | None:
        found = shutil.which("redis-server")
        if found is None and os.access(REDIS_SERVER, os.X_OK):
            found = REDIS_SERVER
        return found

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        cmd = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--loglevel",
            "warning",
        ]
        with open(self.log_path, "wb") as logf:
            return subprocess.Popen(
                pinned(cmd, self.cpu),
                cwd=ROOT,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def start(self) -> None:
        binary = self.binary()
        if binary is None:
            raise GatewayFailed(f"redis-server not found (looked on PATH and at {REDIS_SERVER})")
        self.proc = self._spawn(binary)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 15:
            if self.proc.poll() is not None:
                break
            if await self.ping():
                log(f"redis-server on {HOST}:{self.port} (pid {self.proc.pid}, cpu {self.cpu})")
                return
            await asyncio.sleep(0.05)
        self.stop()
        raise GatewayFailed(f"redis-server did not start\n{tail(self.log_path)}")

    async def ping(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), 1)
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(b"PING\r\n")
            return (await asyncio.wait_for(reader.readline(), 1)).startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    async def info(self, section: str) -> dict[str, str]:
        """``INFO <section>`` as a dict (empty on any problem)."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), 1)
        except (OSError, TimeoutError):
            return {}
        try:
            writer.write(f"INFO {section}\r\n".encode())
            head = await asyncio.wait_for(reader.readline(), 2)
            if not head.startswith(b"$"):
                return {}
            body = await asyncio.wait_for(reader.readexactly(int(head[1:]) + 2), 2)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            return {}
        finally:
            writer.close()
        out = {}
        for line in body.decode(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                out[key] = value
        return out

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


@dataclass(slots=True)
class Target:
    name: str
    port: int
    prefix: str  # "" direct and bare, "bench/" through the gateway
    pid: int | None  # the process whose CPU / RSS are measured (bare, gateway), if any
    # The request and its protocol, a key of bench.client.REQUESTS: "openai" (POST
    # /v1/chat/completions), "responses", "messages", "simple-post" (POST /chat/stream)
    # or "simple-get" (GET /chat/stream, a resumable stream).
    route: str = "openai"

    def payload(self, chunks: int, interval_ms: int, delay_ms: int = 0, group: int = 0) -> bytes:
        model = self.prefix + model_id(chunks, interval_ms, delay_ms, group)
        return REQUESTS[self.route](HOST, self.port, model)


# --- helpers for the parts -----------------------------------------------------------------------


def failures(results: list[StreamResult], tokens: int) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    samples: list[str] = []
    for r in results:
        statuses[r.status] += 1
        why = r.failure(tokens)
        if why is None:
            continue
        reasons[why] += 1
        detail = r.error or f"status {r.status}, tokens {r.tokens}, done {r.done}"
        detail = detail[:400]
        if detail not in samples and len(samples) < 5:
            samples.append(detail)
    return {
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "reasons": dict(reasons),
        "samples": samples,
    }


class LoadMeter:
    """CPU used on the load side (this process + the fake upstream), and machine-wide."""

    def __init__(self, upstream_pid: int) -> None:
        self.up = CpuMeter(upstream_pid)
        self.me0 = time.process_time()
        self.sys0 = system_cpu_s()

    def stop(self) -> dict[str, float]:
        up = self.up.stop()["cpu_s"] or 0.0
        me = time.process_time() - self.me0
        busy1, steal1 = system_cpu_s()
        return {
            "client_cpu_s": me,
            "upstream_cpu_s": up,
            "total_cpu_s": me + up,
            "machine_busy_s": busy1 - self.sys0[0],
            "machine_steal_s": steal1 - self.sys0[1],
        }


def other_load(load: dict[str, float], gateway_cpu_s: float, wall: float) -> dict[str, float]:
    """Machine CPU not spent by this bench (another process, or kernel work not charged
    to ours: loopback networking mostly). Much of it means the numbers are suspect."""
    other = load["machine_busy_s"] - load["total_cpu_s"] - gateway_cpu_s
    return {
        "other_cpu_s": other,
        "other_share": other / wall if wall else 0.0,
        "steal_share": load["machine_steal_s"] / wall if wall else 0.0,
    }


async def sequential(
    target: Target, payload: bytes, n: int, limit_s: float
) -> tuple[list[StreamResult], int]:
    """n requests one after another on a keep-alive connection (reconnecting if closed)."""
    results: list[StreamResult] = []
    reconnects = 0
    proto: SSEClientProtocol | None = None
    for _ in range(n):
        if proto is None or proto.closed:
            if proto is not None:
                reconnects += 1
            proto = await connect(HOST, target.port)
        res = StreamResult()
        try:
            await asyncio.wait_for(proto.request(payload, res, target.route), limit_s)
        except TimeoutError:
            res.error = res.error or f"timeout: no end of response after {limit_s}s"
            proto.abort()
            proto = None
        results.append(res)
        await asyncio.sleep(0.002)
    if proto is not None and proto.transport is not None:
        proto.transport.close()
    return results, reconnects


async def concurrent(
    target: Target, payload: bytes, streams: int | list[StreamResult], limit_s: float
) -> tuple[list[StreamResult], float]:
    """Requests all at once, each on a fresh connection; returns results and wall time."""
    results = [StreamResult() for _ in range(streams)] if isinstance(streams, int) else streams
    protos: list[SSEClientProtocol] = []
    t0 = time.perf_counter()
    tasks = [
        asyncio.ensure_future(one_stream(HOST, target.port, payload, r, protos, target.route))
        for r in results
    ]
    _, pending = await asyncio.wait(tasks, timeout=limit_s)
    wall = time.perf_counter() - t0
    if pending:
        for r in results:
            if r.elapsed is None and r.error is None:
                r.error = f"timeout: stream still open after {limit_s:.0f}s"
        for p in protos:
            p.abort()
        await asyncio.wait(pending, timeout=10)
    return results, wall


class Window:
    """Marks (time, CPU of the measured process, chunks relayed so far) during a run:

    - ``setup``: every stream has its first token (all request set-up done);
    - ``flow``: some stream has its second token (bulk streaming has begun);
    - ``near_end``: some stream is one chunk from its end (no teardown yet);
    - ``end``: the run is over.

    Steady CPU per chunk is setup -> near_end (request set-up and teardown left out);
    bulk throughput and busy share are flow -> end.

    ``also``: other processes (by name) whose CPU is marked too, apart (Redis).
    """

    def __init__(
        self,
        results: list[StreamResult],
        chunks: int,
        pid: int | None,
        also: dict[str, int] | None = None,
    ) -> None:
        self.results = results
        self.chunks = chunks
        self.pids = process_tree(pid) if pid else []
        self.marks: dict[str, tuple[float, float, int]] = {}
        self.also = {name: process_tree(p) for name, p in (also or {}).items()}
        self.also_marks: dict[str, dict[str, float]] = {}

    def mark(self, name: str) -> None:
        tokens = sum(r.tokens for r in self.results)
        cpu = cpu_s(self.pids) if self.pids else 0.0
        self.marks[name] = (time.perf_counter(), cpu, tokens)
        if self.also:
            self.also_marks[name] = {k: cpu_s(pids) for k, pids in self.also.items()}

    async def watch(self) -> None:
        results = self.results
        poll = 0.002 if len(results) <= 128 else 0.005
        last = max(1, self.chunks - 1)
        marks = self.marks
        while True:  # polling: cheap next to the load, and no hooks in the hot path
            if "setup" not in marks and all(r.tokens or r.elapsed is not None for r in results):
                self.mark("setup")
            if "flow" not in marks and any(r.tokens >= 2 for r in results):
                self.mark("flow")
            if "near_end" not in marks and any(
                r.tokens >= last or r.elapsed is not None for r in results
            ):
                self.mark("near_end")
            if len(marks) == 3:
                return
            await asyncio.sleep(poll)

    def span(self, a: str, b: str) -> dict[str, Any] | None:
        if a not in self.marks or b not in self.marks:
            return None
        (t0, c0, k0), (t1, c1, k1) = self.marks[a], self.marks[b]
        wall, chunks = t1 - t0, k1 - k0
        if wall <= 0 or chunks <= 0:
            return None
        out: dict[str, Any] = {"s": wall, "chunks": chunks, "chunks_per_s": chunks / wall}
        if self.pids:
            out["cpu_s"] = c1 - c0
            out["busy"] = (c1 - c0) / wall
            out["cpu_per_chunk_us"] = (c1 - c0) / chunks * 1e6
        if self.also:
            also0, also1 = self.also_marks[a], self.also_marks[b]
            out["also"] = {
                k: {
                    "cpu_s": also1[k] - also0[k],
                    "busy": (also1[k] - also0[k]) / wall,
                    "cpu_per_chunk_us": (also1[k] - also0[k]) / chunks * 1e6,
                }
                for k in self.also
            }
        return out


async def warm(target: Target, sizes: Sizes) -> None:
    payload = target.payload(10, 0)
    seq, _ = await sequential(target, payload, sizes.warmup, 30)
    conc, _ = await concurrent(target, payload, 64, 30)
    bad = [r for r in seq + conc if not r.ok(10)]
    if bad:
        f = failures(bad, 10)
        log(f"warm-up against {target.name}: {len(bad)} bad streams: {f}")


def ms(values: list[float]) -> list[float]:
    return [v * 1000 for v in values]


# --- the parts -----------------------------------------------------------------------------------


async def part_ttft(target: Target, sizes: Sizes, up: Upstream) -> dict[str, Any]:
    payload = target.payload(1, 0)
    await sequential(target, payload, sizes.warmup, 30)
    up0 = await up.stats()
    meter = CpuMeter(target.pid) if target.pid else None
    load = LoadMeter(up.pid)
    t0 = time.perf_counter()
    results, reconnects = await sequential(target, payload, sizes.ttft_requests, 30)
    wall = time.perf_counter() - t0
    cpu = meter.stop() if meter else None
    load_cpu = load.stop()
    ok = [r for r in results if r.ok(1)]
    out: dict[str, Any] = {
        "requests": len(results),
        "complete": len(ok),
        "reconnects": reconnects,
        "wall_s": wall,
        "ttft_ms": summarize(ms([r.ttft for r in ok if r.ttft is not None])),
        "elapsed_ms": summarize(ms([r.elapsed for r in ok if r.elapsed is not None])),
        "failures": failures(results, 1),
        "load": load_cpu,
        "machine": other_load(load_cpu, cpu["cpu_s"] if cpu else 0.0, wall),
    }
    if cpu is not None:
        out["cpu"] = cpu
        out["cpu_per_request_us"] = cpu["cpu_s"] / len(results) * 1e6
    out["upstream"] = upstream_delta(up0, await settle(up))
    return out


async def part_stream_load(
    target: Target,
    up: Upstream,
    streams: int,
    chunks: int,
    interval_ms: int,
    limit_s: float,
    together: bool = False,
    also: dict[str, int] | None = None,
) -> dict[str, Any]:
    # together: after the first chunk every stream waits (up to 30 s) for all to be set up.
    # also: other processes (by name) whose CPU is measured apart, as info (Redis).
    payload = target.payload(chunks, interval_ms, 30_000 if together else 0, streams * together)
    results = [StreamResult() for _ in range(streams)]
    window = Window(results, chunks, target.pid, also)
    watcher = asyncio.ensure_future(window.watch())
    up0 = await up.stats()
    meter = CpuMeter(target.pid) if target.pid else None
    also_meters = {name: CpuMeter(pid) for name, pid in (also or {}).items()}
    load = LoadMeter(up.pid)
    results, wall = await concurrent(target, payload, results, limit_s)
    window.mark("end")
    cpu = meter.stop() if meter else None
    also_cpu = {name: m.stop() for name, m in also_meters.items()}
    load_cpu = load.stop()
    watcher.cancel()
    relayed = sum(r.tokens for r in results)
    ok = [r for r in results if r.ok(chunks)]
    ttfts = [r.ttft for r in results if r.ttft is not None]
    sent = [r.sent for r in results if r.sent]
    out: dict[str, Any] = {
        "streams": streams,
        "chunks_per_stream": chunks,
        "interval_ms": interval_ms,
        "together": together,
        "complete": len(ok),
        "chunks_relayed": relayed,
        "events": sum(r.events for r in results),
        "wall_s": wall,
        # From the first connect to the last request written (all of them written).
        "open_s": max(sent) - min(r.t0 for r in results) if len(sent) == streams else None,
        "chunks_per_s": relayed / wall if wall else None,
        "ttft_ms": summarize(ms(ttfts)),
        "elapsed_ms": summarize(ms([r.elapsed for r in ok if r.elapsed is not None])),
        "load": load_cpu,
        "load_busy": load_cpu["total_cpu_s"] / wall if wall else None,
        "machine": other_load(
            load_cpu,
            (cpu["cpu_s"] if cpu else 0.0) + sum(c["cpu_s"] for c in also_cpu.values()),
            wall,
        ),
        "steady": window.span("setup", "near_end"),
        "bulk": window.span("flow", "end"),
        "failures": failures(results, chunks),
    }
    if target.route != "openai":
        out["route"] = target.route
    for name, c in also_cpu.items():
        # Whole run, and the steady window when there is one (as for the gateway).
        steady_also = _get(out, "steady", "also", name)
        out.setdefault("also", {})[name] = {
            "cpu": c,
            "cpu_busy": c["cpu_s"] / wall if wall else None,
            "cpu_per_chunk_total_us": c["cpu_s"] / relayed * 1e6 if relayed else None,
            "cpu_per_chunk_steady_us": steady_also["cpu_per_chunk_us"] if steady_also else None,
        }
    if cpu is not None:
        # Whole run: includes every request's set-up and teardown.
        out["cpu"] = cpu
        out["cpu_busy"] = cpu["cpu_s"] / wall if wall else None
        out["cpu_per_chunk_total_us"] = cpu["cpu_s"] / relayed * 1e6 if relayed else None
        out["cpu_per_chunk_stat_us"] = cpu["stat_s"] / relayed * 1e6 if relayed else None
        # The aim is about the per-chunk path: the steady window, when it holds enough.
        steady = out["steady"]
        if steady is not None and steady["chunks"] >= 0.2 * relayed:
            out["cpu_per_chunk_us"] = steady["cpu_per_chunk_us"]
            out["cpu_per_chunk_from"] = "steady"
        else:
            out["cpu_per_chunk_us"] = out["cpu_per_chunk_total_us"]
            out["cpu_per_chunk_from"] = "whole run (steady window too short)"
    stats = await settle(up)
    out["upstream"] = upstream_delta(up0, stats)
    return out


def upstream_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {k: after.get(k, 0) - before.get(k, 0) for k in ("connections", "streams", "aborted")}
    out["left_open"] = after.get("active", 0)
    return out


async def settle(up: Upstream, wait_s: float = 5.0) -> dict[str, int]:
    """Wait (a little) until the upstream has no open streams; return its stats."""
    deadline = time.perf_counter() + wait_s
    stats = await up.stats()
    while stats.get("active", 0) and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
        stats = await up.stats()
    await asyncio.sleep(0.3)
    return stats


async def part_floor(up: Upstream, sizes: Sizes, cpu: int | None) -> dict[str, Any]:
    """The saturated and unbatched loads through a raw byte relay on the gateway's CPU."""
    cmd = pinned([sys.executable, "-m", "bench.relay", "--upstream-port", str(up.port)], cpu)
    proc, port = spawn_ready(cmd, RESULTS_DIR / "relay.log", "raw relay")
    try:
        t = Target("relay", port, "", proc.pid)
        await warm(t, sizes)
        out: dict[str, Any] = {}
        log("floor: raw relay, saturated ...")
        out["saturated"] = await part_stream_load(
            t, up, sizes.sat_streams, sizes.sat_chunks, 0, sizes.part_timeout_s, together=True
        )
        log("floor: raw relay, unbatched ...")
        out["unbatched"] = await part_stream_load(
            t,
            up,
            sizes.unb_streams,
            sizes.unb_chunks,
            sizes.unb_interval_ms,
            sizes.part_timeout_s,
        )
        log(
            "floor: done: "
            f"{fmt(out['saturated'].get('cpu_per_chunk_us'), '.2f')} us/chunk saturated, "
            f"{fmt(out['unbatched'].get('cpu_per_chunk_us'), '.2f')} us/chunk unbatched"
        )
        return {"relay": out}
    finally:
        stop_process(proc)


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


RESUMABLE_SIDES = {
    "post": "(a) POST /chat/stream, no log",
    "get_memory": "(b) GET /chat/stream, in-memory log",
    "get_redis": "(c) GET /chat/stream, Redis log",
}


async def part_resumable(
    up: Upstream, gw: Gateway, sizes: Sizes, gateway_cpu: int | None, load_cpu: int | None
) -> dict[str, Any]:
    """The unbatched and saturated loads through the simple protocol: (a) POST (no log),
    (b) GET with the in-memory replay log (the main gateway), (c) GET with the log in
    Redis (a second gateway, same pinning, with its own redis-server on the load CPU)."""
    prefix = f"{GATEWAY_PROVIDER}/"
    loads: dict[str, dict[str, Any]] = {"unbatched": {}, "saturated": {}}

    async def both(t: Target, side: str, also: dict[str, int] | None = None) -> None:
        log(f"resumable: {RESUMABLE_SIDES[side]}, unbatched ...")
        r = await part_stream_load(
            t,
            up,
            sizes.unb_streams,
            sizes.unb_chunks,
            sizes.unb_interval_ms,
            sizes.part_timeout_s,
            also=also,
        )
        loads["unbatched"][side] = r
        log(f"resumable: {side}, unbatched done: {short_resumable(r)}")
        log(f"resumable: {RESUMABLE_SIDES[side]}, saturated ...")
        r = await part_stream_load(
            t,
            up,
            sizes.sat_streams,
            sizes.res_sat_chunks,
            0,
            sizes.part_timeout_s,
            together=True,
            also=also,
        )
        loads["saturated"][side] = r
        log(f"resumable: {side}, saturated done: {short_resumable(r)}")

    t0 = time.perf_counter()
    for side, route in (("post", "simple-post"), ("get_memory", "simple-get")):
        if not gw.alive():
            loads["unbatched"][side] = loads["saturated"][side] = {
                "error": f"gateway died (exit {gw.proc.returncode})"  # type: ignore[union-attr]
            }
            continue
        t = Target(side, gw.port, prefix, gw.pid, route)
        await warm(t, sizes)
        await both(t, side)

    redis = RedisServer(load_cpu)
    rgw: Gateway | None = None
    info: dict[str, Any] = {}
    try:
        await redis.start()
        rgw = Gateway(
            up.port, gateway_cpu, extra_env={"GATEWAY_REDIS_URL": redis.url}, name="gateway-redis"
        )
        await rgw.start()
        t = Target("get_redis", rgw.port, prefix, rgw.pid, "simple-get")
        await warm(t, sizes)
        await both(t, "get_redis", also={"redis": redis.pid})
        if not rgw.alive():
            info["gateway_exit"] = rgw.proc.returncode  # type: ignore[union-attr]
        mem = await redis.info("memory")
        info["redis_used_memory_mib"] = (
            int(mem["used_memory"]) / 2**20 if "used_memory" in mem else None
        )
    except GatewayFailed as exc:
        for name in ("unbatched", "saturated"):
            loads[name].setdefault("get_redis", {"error": str(exc)[:600]})
    finally:
        if rgw is not None:
            info["gateway_exit"] = rgw.stop()
        redis.stop()
    for load, r in loads.items():
        compare(load, r)
    info["url"] = redis.url
    return {**loads, "redis": info, "wall_s": time.perf_counter() - t0}


def compare(load: str, sides: dict[str, Any]) -> None:
    """Put the resumable part's three sides on one basis, and (b), (c) against (a).

    Unbatched: the steady window (as the unbatched part), unless a side lacks one.
    Saturated: the whole run, always: a GET stream's generation runs in its own task,
    which the reader does not hold back, so the client's tokens lag the gateway's work
    and a window marked by them does not match it (the whole run is all of the work,
    every stream's set-up and teardown included, over every chunk delivered).
    """
    ok = [s for s in RESUMABLE_SIDES if isinstance(sides.get(s), dict) and "cpu" in sides[s]]
    steady = load == "unbatched" and all(sides[s].get("cpu_per_chunk_from") == "steady" for s in ok)
    sides["basis"] = "steady" if steady else "whole run"
    for s in ok:
        r = sides[s]
        r["cpu_per_chunk_cmp_us"] = r["cpu_per_chunk_us" if steady else "cpu_per_chunk_total_us"]
        for name, also in (r.get("also") or {}).items():
            key = "cpu_per_chunk_steady_us" if steady else "cpu_per_chunk_total_us"
            also["cpu_per_chunk_cmp_us"] = also.get(key)
            r[f"{name}_cpu_per_chunk_cmp_us"] = also.get(key)
    base = _get(sides, "post", "cpu_per_chunk_cmp_us")
    for s in ("get_memory", "get_redis"):
        v = _get(sides, s, "cpu_per_chunk_cmp_us")
        if base and v is not None:
            sides[s]["overhead_vs_post_us"] = v - base
            sides[s]["overhead_vs_post_ratio"] = v / base


async def settled_rss(pid: int, least_s: float = 1.0, most_s: float = 8.0) -> int:
    """RSS of a process tree once it holds still (within 1% for ``least_s``; a
    background load right after start-up, a model say, is waited for)."""
    pids = process_tree(pid)
    t0 = time.perf_counter()
    last, still_since = rss_kib(pids), t0
    while time.perf_counter() - t0 < most_s:
        await asyncio.sleep(0.25)
        now = rss_kib(pids)
        if abs(now - last) > 0.01 * last:
            last, still_since = now, time.perf_counter()
        elif time.perf_counter() - still_since >= least_s:
            break
    return last


async def part_rss(server: Bare | Gateway, sizes: Sizes, up: Upstream) -> dict[str, Any]:
    """A fresh process: RSS before any traffic; after a warm-up, ``rss_streams`` streams
    held after their first token, (RSS held - RSS before them) / streams; then all
    released by the upstream, and every one must complete."""
    server.stop()
    await server.start()
    fresh = await settled_rss(server.pid)
    target = server.target()
    await warm(target, sizes)
    pids = process_tree(server.pid)
    await asyncio.sleep(1.0)
    idle = rss_kib(pids)
    n = sizes.rss_streams
    # The first token at once; then each is held until POST /release (a group no run fills).
    payload = target.payload(2, 0, int(sizes.part_timeout_s * 1000), n + 1)
    results = [StreamResult() for _ in range(n)]
    protos: list[SSEClientProtocol] = []
    tasks: list[asyncio.Future[StreamResult]] = []
    up0 = await up.stats()
    t0 = time.perf_counter()
    deadline = t0 + sizes.part_timeout_s
    while time.perf_counter() < deadline:
        started = len(tasks)
        settled = sum(1 for r in results[:started] if r.ttft is not None or r.elapsed is not None)
        if settled == n:
            break
        for r in results[
            started : started + min(sizes.rss_wave - (started - settled), n - started)
        ]:
            tasks.append(
                asyncio.ensure_future(
                    one_stream(HOST, target.port, payload, r, protos, target.route)
                )
            )
        await asyncio.sleep(0.01)
    opened_s = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    held = sum(1 for r in results if r.ttft is not None and r.elapsed is None)
    samples = []
    for _ in range(5):
        samples.append(rss_kib(pids))
        await asyncio.sleep(0.2)
    rss_open = max(samples)
    up_held = await up.stats()
    released = await up.release()
    t1 = time.perf_counter()
    _, pending = await asyncio.wait(tasks, timeout=max(10.0, deadline - t1))
    release_s = time.perf_counter() - t1
    if pending:
        for r in results:
            if r.elapsed is None and r.error is None:
                r.error = "timeout: stream still open after its release"
        for p in protos:
            p.abort()
        await asyncio.wait(pending, timeout=10)
    await asyncio.sleep(1.0)
    rss_after = rss_kib(pids)
    stats = await settle(up)
    return {
        "streams": n,
        "fresh_rss_kib": fresh,
        "held_open": held,
        "complete": sum(1 for r in results if r.ok(2)),
        "open_s": opened_s,
        "release_s": release_s,
        "ttft_ms": summarize(ms([r.ttft for r in results if r.ttft is not None])),
        "idle_rss_kib": idle,
        "open_rss_kib": rss_open,
        "after_close_rss_kib": rss_after,
        "per_stream_kib": (rss_open - idle) / held if held else None,
        "upstream_active_while_held": up_held.get("active"),
        "upstream_released": released,
        "upstream": upstream_delta(up0, stats),
        "failures": failures(results, 2),
    }


async def part_fresh_local(up: Upstream, cpu: int | None) -> dict[str, Any]:
    """A fresh gateway with the embedded model enabled (the default) but not the default
    model and never asked for: its RSS before any traffic."""
    gw = Gateway(up.port, cpu, extra_env={"GATEWAY_LOCAL_ENABLED": "true"}, name="gateway-local")
    try:
        await gw.start()
        return {"fresh_rss_kib": await settled_rss(gw.pid), "startup_s": gw.startup_s}
    except GatewayFailed as exc:
        return {"error": str(exc)[:600]}
    finally:
        gw.stop()


async def part_routes(
    targets: list[Target], sizes: Sizes, up: Upstream
) -> dict[str, dict[str, dict[str, Any]]]:
    """The ttft and unbatched loads through each of ROUTES (its own protocol)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for route in ROUTES:
        res: dict[str, dict[str, Any]] = {"ttft": {}, "unbatched": {}}
        for t in targets:
            rt = dataclasses.replace(t, route=route)
            log(f"routes: {route} ttft: {t.name} ...")
            res["ttft"][t.name] = r = await part_ttft(rt, sizes, up)
            log(f"routes: {route} ttft: {t.name} done: {short('ttft', r)}")
        for t in targets:
            if t.pid is None:
                continue
            rt = dataclasses.replace(t, route=route)
            log(f"routes: {route} unbatched: {t.name} ...")
            res["unbatched"][t.name] = r = await part_stream_load(
                rt,
                up,
                sizes.unb_streams,
                sizes.route_chunks,
                sizes.unb_interval_ms,
                sizes.part_timeout_s,
            )
            log(f"routes: {route} unbatched: {t.name} done: {short('unbatched', r)}")
        out[route] = res
    return out


async def part_workers(up: Upstream, sizes: Sizes, workers: int) -> dict[str, Any]:
    """The saturated and burst loads through ``python -m app --workers N``, on every CPU."""
    gw = Gateway(up.port, None, name=f"gateway-{workers}w", workers=workers)
    try:
        await gw.start()
        t = gw.target()
        await warm(t, sizes)
        out: dict[str, Any] = {"workers": workers, "cpus": ALL_CPUS}
        out["processes"] = len(process_tree(gw.pid))
        log(f"workers: {workers} workers, saturated ...")
        out["saturated"] = r = await part_stream_load(
            t, up, sizes.sat_streams, sizes.sat_chunks, 0, sizes.part_timeout_s, together=True
        )
        log(f"workers: saturated done: {short('saturated', r)}")
        log(f"workers: {workers} workers, burst ...")
        out["burst"] = r = await run_load("burst", t, sizes, up)
        log(f"workers: burst done: {short('burst', r)}")
        if not gw.alive():
            out["error"] = f"gateway died (exit {gw.proc.returncode})"  # type: ignore[union-attr]
        return out
    except GatewayFailed as exc:
        return {"workers": workers, "error": str(exc)[:600]}
    finally:
        gw.stop()


async def run_load(part: str, t: Target, sizes: Sizes, up: Upstream) -> dict[str, Any]:
    """One of the stream loads, by part name."""
    if part == "saturated":
        return await part_stream_load(
            t, up, sizes.sat_streams, sizes.sat_chunks, 0, sizes.part_timeout_s, together=True
        )
    if part == "unbatched":
        n, chunks, interval = sizes.unb_streams, sizes.unb_chunks, sizes.unb_interval_ms
    elif part == "burst":
        n, chunks, interval = sizes.burst_streams, sizes.burst_chunks, sizes.burst_interval_ms
    else:
        n, chunks, interval = sizes.many_streams, sizes.many_chunks, sizes.many_interval_ms
    return await part_stream_load(t, up, n, chunks, interval, sizes.part_timeout_s)


# --- orchestration -------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    parts = [p for p in PARTS + EXTRA_PARTS if p in args.parts]
    out: dict[str, Any] = {
        "meta": {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv[1:],
            "quick": args.quick,
            "parts": parts,
            "workers": args.workers,
            "sizes": asdict(sizes),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gateway_cpu": args.gateway_cpu,
            "load_cpu": args.load_cpu,
            "nofile": raise_nofile(),
        },
        "parts": {},
    }
    up = Upstream(args.load_cpu)
    up.start()
    bare: Bare | None = None
    gw: Gateway | None = None
    try:
        targets = [Target("direct", up.port, "", None)]
        if not args.direct_only:
            why = Gateway.available()
            if why:
                raise GatewayFailed(why)
            bare = Bare(up.port, args.gateway_cpu)
            await bare.start()
            gw = Gateway(up.port, args.gateway_cpu, args.profile)
            await gw.start()
            out["meta"]["gateway_startup_s"] = gw.startup_s
            targets += [bare.target(), gw.target()]
        servers: dict[str, Bare | Gateway | None] = {"bare": bare, "gateway": gw}
        for t in targets:
            await warm(t, sizes)
        if gw is not None and args.profile:
            os.kill(gw.pid, signal.SIGUSR1)  # start profiling now that warm-up is done
        per_request_us: dict[str, float] = {}
        for part in parts:
            if part not in ("ttft", "saturated", "unbatched", "burst", "many"):
                continue
            res: dict[str, Any] = {}
            for t in targets:
                if part == "unbatched" and t.pid is None:
                    continue  # direct: no relay CPU to measure
                server = servers.get(t.name)
                if server is not None and not server.alive():
                    res[t.name] = {"error": f"{t.name} died (exit {server.proc.returncode})"}  # type: ignore[union-attr]
                    continue
                log(f"{part}: {t.name} ...")
                if part == "ttft":
                    r = await part_ttft(t, sizes, up)
                    if r.get("cpu_per_request_us") is not None:
                        per_request_us[t.name] = r["cpu_per_request_us"]
                else:
                    r = await run_load(part, t, sizes, up)
                if part == "unbatched" and t.name in per_request_us and r.get("chunks_relayed"):
                    # Whole run less the per-request cost measured by the ttft part.
                    setup = per_request_us[t.name] * sizes.unb_streams / 1e6
                    r["per_request_us_used"] = per_request_us[t.name]
                    r["cpu_per_chunk_excl_setup_us"] = (
                        (r["cpu"]["cpu_s"] - setup) / r["chunks_relayed"] * 1e6
                    )
                res[t.name] = r
                log(f"{part}: {t.name} done: {short(part, r)}")
            out["parts"][part] = res
        if "routes" in parts:
            if gw is None:
                log("routes: needs the gateway (not with --direct-only); skipped")
            else:
                out["parts"]["routes"] = await part_routes(targets, sizes, up)
        if "floor" in parts:
            out["parts"]["floor"] = await part_floor(up, sizes, args.gateway_cpu)
        if "resumable" in parts:
            if gw is None:
                log("resumable: needs the gateway (not with --direct-only); skipped")
            else:
                out["parts"]["resumable"] = await part_resumable(
                    up, gw, sizes, args.gateway_cpu, args.load_cpu
                )
                log(f"resumable: done in {out['parts']['resumable']['wall_s']:.0f} s")
        if args.workers > 1:
            if gw is None:
                log("workers: needs the gateway (not with --direct-only); skipped")
            else:
                out["parts"]["workers"] = await part_workers(up, sizes, args.workers)
        if "rss" in parts:
            if gw is None or bare is None:
                log("rss: needs the bare relay and the gateway (not with --direct-only); skipped")
            else:
                res = {}
                for server in (bare, gw):
                    log(f"rss: a fresh {server.name}, {sizes.rss_streams} streams held ...")
                    res[server.name] = r = await part_rss(server, sizes, up)
                    log(f"rss: {server.name} done: {short('rss', r)}")
                log("rss: a fresh gateway with the embedded model enabled ...")
                res["gateway_local"] = await part_fresh_local(up, args.gateway_cpu)
                out["parts"]["rss"] = res
    finally:
        if gw is not None:
            out["meta"]["gateway_exit"] = gw.stop()
        if bare is not None:
            out["meta"]["bare_exit"] = bare.stop()
        up.stop()
    return out


def write_profile() -> None:
    import io
    import pstats

    files = sorted(RESULTS_DIR.glob("gateway-*.prof"))
    if not files:
        log("no gateway profile was written")
        return
    buf = io.StringIO()
    stats = pstats.Stats(str(files[0]), stream=buf)  # the first gateway: every part but rss
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(60)
    out = RESULTS_DIR / "gateway-profile.txt"
    out.write_text(buf.getvalue())
    log(f"gateway profile: {out} (raw: {', '.join(f.name for f in files)})")


def short(part: str, r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"error: {str(r['error'])[:200]}"
    if part == "rss":
        return (
            f"fresh {fmt(r.get('fresh_rss_kib', 0) / 1024)} MiB, {r.get('held_open')} held, "
            f"{fmt(r.get('per_stream_kib'))} KiB/stream, complete {r.get('complete')}"
        )
    bits = [f"complete {r.get('complete')}"]
    if r.get("ttft_ms", {}).get("p50") is not None:
        bits.append(f"ttft p50 {r['ttft_ms']['p50']:.3f} ms p99 {r['ttft_ms']['p99']:.3f} ms")
    if r.get("cpu_per_chunk_us") is not None:
        bits.append(f"{r['cpu_per_chunk_us']:.1f} us cpu/chunk")
    if r.get("cpu_per_request_us") is not None:
        bits.append(f"{r['cpu_per_request_us']:.0f} us cpu/request")
    if r.get("failures", {}).get("reasons"):
        bits.append(f"failures {r['failures']['reasons']}")
    return ", ".join(bits)


def short_resumable(r: dict[str, Any]) -> str:
    bits = [f"complete {r.get('complete')}/{r.get('streams')}"]
    if r.get("ttft_ms", {}).get("p50") is not None:
        bits.append(f"ttft p50 {r['ttft_ms']['p50']:.1f} ms p99 {r['ttft_ms']['p99']:.1f} ms")
    bits.append(
        f"gw {fmt(r.get('cpu_per_chunk_total_us'))} us cpu/chunk whole run, "
        f"{fmt(_get(r, 'steady', 'cpu_per_chunk_us'))} steady"
    )
    for name, also in (r.get("also") or {}).items():
        bits.append(f"{name} {fmt(also.get('cpu_per_chunk_total_us'))} us cpu/chunk whole run")
    if r.get("failures", {}).get("reasons"):
        bits.append(f"failures {r['failures']['reasons']}")
    return ", ".join(bits)


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Gateway streaming benchmark: the gateway against a bare aiohttp byte "
        "relay (and straight to the upstream), measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 1 min)")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default all): {','.join(PARTS)}; also "
        "'many': 1,000 streams x 50 chunks 20 ms apart; and 'resumable': "
        "those loads through POST /chat/stream vs GET /chat/stream with the replay log in "
        "memory and in Redis (a redis-server of its own)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="N > 1: also run the saturated and burst loads through `python -m app "
        "--workers N` (on every CPU) and compare with the one-worker gateway",
    )
    parser.add_argument(
        "--direct-only",
        action="store_true",
        help="only the direct side (no bare relay, no gateway)",
    )
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--json", default=str(RESULTS_DIR / "latest.json"), help="where to write the results"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the gateway under cProfile (slower!); top functions go to "
        "bench/results/gateway-profile.txt",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a target is missed (else only on errors)"
    )
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS + EXTRA_PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS + EXTRA_PARTS)}")
    args.parts = chosen
    if args.workers < 1:
        parser.error("--workers must be 1 or more")
    if args.no_pin:
        args.gateway_cpu = args.load_cpu = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for old in RESULTS_DIR.glob("gateway-*.prof"):
        old.unlink()
    if args.load_cpu is not None:
        available = os.sched_getaffinity(0)
        if args.load_cpu not in available or args.gateway_cpu not in available:
            log(f"cpus {args.gateway_cpu}/{args.load_cpu} not both available ({available}); no pin")
            args.gateway_cpu = args.load_cpu = None
        else:
            os.sched_setaffinity(0, {args.load_cpu})
    raise_nofile()
    t0 = time.perf_counter()
    error: str | None = None
    try:
        out = uvloop.run(run(args))
    except GatewayFailed as exc:
        error = str(exc)
        out = {"error": error}
    wall = time.perf_counter() - t0
    out.setdefault("meta", {})["wall_s"] = wall
    text, summary = render(out) if error is None else ("", {"missed": []})
    out = {"summary": summary, **out}
    missed = summary["missed"]
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    if error is not None:
        print(f"bench: gateway failed: {error}", file=sys.stderr)
        return 2
    if args.profile:
        text = "(gateway ran under cProfile: its numbers are inflated)\n" + text
        write_profile()
    print(text)
    print(f"\n(results in {path}; run took {wall:.0f} s)")
    if args.strict and missed:
        return 1
    return 0
