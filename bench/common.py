"""Small helpers shared by the bench processes: limits, /proc readings, stats."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import resource
import time
from collections.abc import Iterable, Sequence
from typing import Any

# Model ids the fake upstream understands: ``bench-<chunks>-<interval_ms>[-<delay>[-<group>]]``.
MODEL_PREFIX = "bench"
GATEWAY_PROVIDER = "bench"
API_KEY = "bench-key"
TOKEN = b"tok "

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def model_id(chunks: int, interval_ms: int, delay_ms: int = 0, group: int = 0) -> str:
    name = f"{MODEL_PREFIX}-{chunks}-{interval_ms}"
    if delay_ms or group:
        name += f"-{delay_ms}"
    if group:
        name += f"-{group}"
    return name


def parse_model(model: str) -> tuple[int, int, int, int] | None:
    """``bench-<chunks>-<interval_ms>[-<delay_ms>[-<group>]]`` -> the four numbers.

    Any ``provider/`` prefix is ignored. After the first content chunk a stream
    pauses ``delay_ms``; with ``group`` > 0 it instead waits until ``group``
    streams of the same model are waiting (at most ``delay_ms``, 10 s if 0) and
    they all go on together.
    """
    name = model.rsplit("/", 1)[-1]
    parts = name.split("-")
    if not 3 <= len(parts) <= 5 or parts[0] != MODEL_PREFIX:
        return None
    try:
        numbers = [int(p) for p in parts[1:]]
    except ValueError:
        return None
    if any(n < 0 for n in numbers):
        return None
    numbers += [0] * (4 - len(numbers))
    return numbers[0], numbers[1], numbers[2], numbers[3]


def raise_nofile(want: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (in case the server forks workers)."""
    found = [pid]
    i = 0
    while i < len(found):
        p = found[i]
        i += 1
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    found.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return found


def stat_cpu_s(pids: Iterable[int]) -> float:
    """utime+stime from /proc/<pid>/stat, summed, in seconds (clock-tick resolution)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _CLK_TCK


def clock_cpu_s(pids: Iterable[int]) -> float | None:
    """The same quantity as utime+stime (the process CPU clock), at ns resolution.

    Falls back to ``None`` where clock_getcpuclockid is unavailable.
    """
    if _libc is None:
        return None
    total = 0.0
    for pid in pids:
        cid = ctypes.c_int()
        if _libc.clock_getcpuclockid(pid, ctypes.byref(cid)) != 0:
            return None
        try:
            total += time.clock_gettime(cid.value)
        except OSError:
            return None
    return total


def system_cpu_s() -> tuple[float, float]:
    """Machine-wide (busy, steal) CPU seconds from /proc/stat, all CPUs together."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _CLK_TCK, steal / _CLK_TCK


def rss_kib(pids: Iterable[int]) -> int:
    """VmRSS from /proc/<pid>/status, summed, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def cpu_s(pids: Iterable[int]) -> float:
    """Process CPU time in seconds: the CPU clock where available, else /proc stat."""
    clock = clock_cpu_s(pids)
    return clock if clock is not None else stat_cpu_s(pids)


class CpuMeter:
    """CPU time of a process tree between two points, both ways of reading it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pids = process_tree(pid)
        self._stat0 = stat_cpu_s(self.pids)
        self._clock0 = clock_cpu_s(self.pids)

    def stop(self) -> dict[str, Any]:
        stat = stat_cpu_s(self.pids) - self._stat0
        clock1 = clock_cpu_s(self.pids)
        clock = None if clock1 is None or self._clock0 is None else clock1 - self._clock0
        return {"stat_s": stat, "clock_s": clock, "cpu_s": clock if clock is not None else stat}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }
