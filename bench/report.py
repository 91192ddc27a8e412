"""The results table: direct vs gateway, the overhead, and the aims."""

from __future__ import annotations

from typing import Any

AIM_TTFT_ADDED_P50_MS = 1.0
AIM_CPU_SATURATED_US = 15.0
AIM_CPU_UNBATCHED_US = 40.0
AIM_RSS_PER_STREAM_KIB = 64.0


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


# The resumable part's sides, in the order of the table.
RESUMABLE_ROWS = {
    "post": "(a) POST",
    "get_memory": "(b) GET memory log",
    "get_redis": "(c) GET Redis log",
}


def _sides(part: str, res: dict[str, Any]) -> list[tuple[str, Any]]:
    """(side, result) of one part: direct / gateway; the floor's relay loads; the resumable
    part's loads x sides (``unbatched/post`` ...)."""
    if part == "floor":
        return list((res.get("relay") or {}).items())
    if part == "resumable":
        return [
            (f"{load}/{side}", r)
            for load in ("unbatched", "saturated")
            for side, r in (res.get(load) or {}).items()
        ]
    return list(res.items())


def _f(v: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else f"{format(v, spec)}{unit}"


def _check(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "MISSED")


def render(out: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The table as text, and a summary: each aim's value and verdict, the misses, notes."""
    parts = out.get("parts", {})
    sizes = _get(out, "meta", "sizes") or {}
    rows: list[tuple[str, str, str, str, str, str]] = []
    missed: list[str] = []
    notes: list[str] = []
    summary: dict[str, Any] = {}

    def aim(name: str, ok: bool | None, value: Any = None, target: str = "") -> str:
        summary[name] = {"value": value, "aim": target, "ok": ok}
        if ok is False:
            missed.append(name)
        return _check(ok)

    # 1. TTFT at one stream
    if "ttft" in parts:
        d, g = parts["ttft"].get("direct", {}), parts["ttft"].get("gateway")
        n = sizes.get("ttft_requests")
        for q in ("p50", "p99"):
            dv, gv = _get(d, "ttft_ms", q), _get(g, "ttft_ms", q)
            added = gv - dv if dv is not None and gv is not None else None
            if q == "p50":
                ok = None if added is None else added <= AIM_TTFT_ADDED_P50_MS
                aim_s = f"added <= {AIM_TTFT_ADDED_P50_MS:g} ms"
                verdict = aim("ttft_added_p50_ms", ok, added, f"<= {AIM_TTFT_ADDED_P50_MS:g}")
            else:
                aim_s, verdict = "", ""
            rows.append(
                (
                    f"TTFT {q}, 1 stream, {n} seq. (ms)",
                    _f(dv, ".3f"),
                    _f(gv, ".3f"),
                    "" if added is None else f"+{added:.3f} ms",
                    aim_s,
                    verdict,
                )
            )
        conns = _get(g, "upstream", "connections")
        if conns and g and conns >= 0.5 * (g.get("requests") or 1):
            notes.append(
                f"ttft: the gateway opened {conns} upstream connections for {g.get('requests')} "
                "sequential requests (no keep-alive reuse to the upstream?)"
            )
        if g:
            rows.append(
                (
                    "gateway CPU per request, 1 chunk (us)",
                    "-",
                    _f(_get(g, "cpu_per_request_us"), ".0f"),
                    "",
                    "(info)",
                    "",
                )
            )

    # 2a. saturated
    if "saturated" in parts:
        d, g = parts["saturated"].get("direct", {}), parts["saturated"].get("gateway")
        label = f"{sizes.get('sat_streams')}x{sizes.get('sat_chunks')}"
        dv, gv = _get(d, "bulk", "chunks_per_s"), _get(g, "bulk", "chunks_per_s")
        rows.append(
            (
                f"saturated {label}: chunks/s",
                _f(dv, ",.0f"),
                _f(gv, ",.0f"),
                "" if not dv or gv is None else f"{gv / dv:.2f}x",
                "(info)",
                "",
            )
        )
        cpu = _get(g, "cpu_per_chunk_us")
        busy = _get(g, "bulk", "busy")
        total = _get(g, "cpu_per_chunk_total_us")
        rows.append(
            (
                f"saturated {label}: gw CPU/chunk (us)",
                "-",
                _f(cpu, ".1f"),
                "" if total is None else f"{total:.1f} whole run, busy {_f(busy, '.0%')}",
                f"<= {AIM_CPU_SATURATED_US:g} us",
                aim(
                    "cpu_per_chunk_saturated_us",
                    None if cpu is None else cpu <= AIM_CPU_SATURATED_US,
                    cpu,
                    f"<= {AIM_CPU_SATURATED_US:g}",
                ),
            )
        )
        if g and busy is not None and busy < 0.9:
            notes.append(
                f"saturated: the gateway was only {busy:.0%} busy while the chunks flowed: "
                "it was not the bottleneck, so this is not a full saturation"
            )

    # 2b. unbatched
    if "unbatched" in parts:
        g = parts["unbatched"].get("gateway")
        label = (
            f"{sizes.get('unb_streams')}x{sizes.get('unb_chunks')} "
            f"@{sizes.get('unb_interval_ms')}ms"
        )
        cpu = _get(g, "cpu_per_chunk_us")
        total = _get(g, "cpu_per_chunk_total_us")
        rows.append(
            (
                f"unbatched {label}: gw CPU/chunk (us)",
                "-",
                _f(cpu, ".1f"),
                "" if total is None else f"{total:.1f} whole run",
                f"<= {AIM_CPU_UNBATCHED_US:g} us",
                aim(
                    "cpu_per_chunk_unbatched_us",
                    None if cpu is None else cpu <= AIM_CPU_UNBATCHED_US,
                    cpu,
                    f"<= {AIM_CPU_UNBATCHED_US:g}",
                ),
            )
        )

    # 3. many streams
    if "many" in parts:
        d, g = parts["many"].get("direct", {}), parts["many"].get("gateway")
        n = sizes.get("many_streams")
        label = f"{n}x{sizes.get('many_chunks')} @{sizes.get('many_interval_ms')}ms"
        dc, gc = _get(d, "complete"), _get(g, "complete")
        rows.append(
            (
                f"{label}: complete",
                "-" if dc is None else f"{dc}/{n}",
                "-" if gc is None else f"{gc}/{n}",
                "",
                f"all {n}",
                aim("many_complete", None if gc is None else gc == n, gc, f"== {n}"),
            )
        )
        if dc is not None and dc != n:
            notes.append(f"many: only {dc}/{n} direct streams completed (harness/load problem)")
        dv, gv = _get(d, "ttft_ms", "p99"), _get(g, "ttft_ms", "p99")
        rows.append(
            (
                f"{label}: TTFT p99 (ms)",
                _f(dv, ".1f"),
                _f(gv, ".1f"),
                "" if dv is None or gv is None else f"+{gv - dv:.1f} ms",
                "(info)",
                "",
            )
        )
        dw, gw = _get(d, "wall_s"), _get(g, "wall_s")
        rows.append(
            (
                f"{label}: wall time (s)",
                _f(dw, ".2f"),
                _f(gw, ".2f"),
                "" if gw is None else f"gw busy {_f(_get(g, 'cpu_busy'), '.0%')}",
                "(info)",
                "",
            )
        )

    # The raw relay floor (optional part)
    if "floor" in parts:
        relay = parts["floor"].get("relay", {})
        for name in ("saturated", "unbatched"):
            r = relay.get(name)
            if r:
                rows.append(
                    (
                        f"{name}: raw uvloop relay floor, CPU/chunk (us)",
                        "-",
                        _f(r.get("cpu_per_chunk_us"), ".1f"),
                        "(not the gateway)",
                        "(info)",
                        "",
                    )
                )

    # The replay log's cost (optional part): (a) POST, (b) GET + memory log, (c) GET + Redis log
    if "resumable" in parts:
        res = parts["resumable"]
        labels = {
            "unbatched": (
                f"{sizes.get('unb_streams')}x{sizes.get('unb_chunks')} "
                f"@{sizes.get('unb_interval_ms')}ms"
            ),
            "saturated": f"{sizes.get('sat_streams')}x{sizes.get('res_sat_chunks')}",
        }
        for load, label in labels.items():
            sides = res.get(load) or {}
            basis = sides.get("basis", "")
            base = _get(sides, "post", "cpu_per_chunk_cmp_us")
            for side, name in RESUMABLE_ROWS.items():
                r = sides.get(side)
                if not isinstance(r, dict):
                    continue
                cpu = _get(r, "cpu_per_chunk_cmp_us")
                if side == "post":
                    extra = f"({basis})" if basis else ""
                elif cpu is not None and base:
                    extra = f"{cpu - base:+.1f} us ({cpu / base - 1:+.0%}) vs (a)"
                else:
                    extra = ""
                rows.append(
                    (
                        f"{load} {label} {name}: gw CPU/chunk (us)",
                        "-",
                        _f(cpu, ".1f"),
                        extra,
                        "(info)",
                        "",
                    )
                )
            redis = _get(sides, "get_redis", "also", "redis")
            if redis:
                busy = _get(redis, "cpu_busy")
                rows.append(
                    (
                        f"{load} {label} (c): redis-server CPU/chunk (us)",
                        "-",
                        _f(redis.get("cpu_per_chunk_cmp_us"), ".1f"),
                        "not the gateway" + ("" if busy is None else f", busy {busy:.0%}"),
                        "(info)",
                        "",
                    )
                )
            if load == "saturated":
                rates = [
                    f"{name.split()[0]} {_f(_get(sides, side, 'bulk', 'chunks_per_s'), ',.0f')}"
                    for side, name in RESUMABLE_ROWS.items()
                    if isinstance(sides.get(side), dict)
                ]
                if rates:
                    notes.append(f"resumable saturated: chunks/s {', '.join(rates)}")

    # 4. RSS
    if "rss" in parts:
        g = parts["rss"].get("gateway")
        d = parts["rss"].get("direct")
        n = sizes.get("rss_streams")
        if g:
            per = _get(g, "per_stream_kib")
            idle, opened = _get(g, "idle_rss_kib"), _get(g, "open_rss_kib")
            rows.append(
                (
                    f"RSS per open stream, {_get(g, 'held_open')}/{n} held (KiB)",
                    "-",
                    _f(per, ".1f"),
                    "" if idle is None else f"idle {idle / 1024:.0f} -> {opened / 1024:.0f} MiB",
                    f"<= {AIM_RSS_PER_STREAM_KIB:g} KiB",
                    aim(
                        "rss_per_stream_kib",
                        None if per is None else per <= AIM_RSS_PER_STREAM_KIB,
                        per,
                        f"<= {AIM_RSS_PER_STREAM_KIB:g}",
                    ),
                )
            )
            left = _get(g, "upstream_left_open_after_close")
            if left:
                notes.append(
                    f"rss: {left} upstream streams still open {_get(g, 'upstream_release_s'):.0f}"
                    " s after the clients disconnected (gateway did not release them)"
                )
        elif d:
            rows.append(
                (
                    f"RSS per open stream, upstream only, {_get(d, 'held_open')}/{n} (KiB)",
                    _f(_get(d, "per_stream_kib"), ".1f"),
                    "-",
                    "",
                    "(harness check)",
                    "",
                )
            )

    # Where the gateway's time goes, from the numbers above.
    per_req = _get(parts, "ttft", "gateway", "cpu_per_request_us")
    added = None
    if _get(parts, "ttft", "gateway", "ttft_ms", "p50") is not None:
        added = (
            parts["ttft"]["gateway"]["ttft_ms"]["p50"] - parts["ttft"]["direct"]["ttft_ms"]["p50"]
        )
    if per_req is not None and added is not None:
        notes.append(
            f"gateway: {per_req / 1000:.2f} ms CPU per request vs {added:.2f} ms added TTFT p50"
            + (": TTFT overhead is the per-request CPU" if per_req / 1000 >= 0.6 * added else "")
        )
    unb = _get(parts, "unbatched", "gateway")
    if per_req is not None and unb and unb.get("cpu") and unb.get("chunks_relayed"):
        setup = per_req * unb["streams"] / 1e6
        share = setup / unb["cpu"]["cpu_s"] if unb["cpu"]["cpu_s"] else 0
        notes.append(
            f"unbatched: per-request set-up is ~{share:.0%} of the gateway's CPU in that part "
            f"({unb['streams']} requests x {per_req:.0f} us vs {unb['chunks_relayed']} chunks); "
            f"per chunk: {_f(unb.get('cpu_per_chunk_us'), '.1f')} us steady"
            + (
                f" vs {sat:.1f} us batched (saturated)"
                if (sat := _get(parts, "saturated", "gateway", "cpu_per_chunk_us")) is not None
                else ""
            )
        )
    many = _get(parts, "many", "gateway")
    if per_req is not None and many and many.get("cpu") and (many.get("cpu_busy") or 0) > 0.7:
        setup = per_req * many["streams"] / 1e6
        notes.append(
            f"many: {many['streams']} requests x {per_req:.0f} us = {setup:.1f} s of set-up CPU "
            f"alone (of {many['cpu']['cpu_s']:.1f} s): the gateway is CPU-bound on one core and "
            "TTFT queues behind it"
        )

    for part, res in parts.items():
        for side, r in _sides(part, res):
            if not isinstance(r, dict):
                continue
            if r.get("error"):
                notes.append(f"{part}/{side}: {r['error']}")
            fails = _get(r, "failures", "reasons")
            if fails:
                samples = "; ".join(_get(r, "failures", "samples") or [])
                notes.append(f"{part}/{side}: failures {fails}; e.g. {samples[:600]}")
            other = _get(r, "machine", "other_share")
            steal = _get(r, "machine", "steal_share")
            if other is not None and other > 0.25:
                notes.append(
                    f"{part}/{side}: {other:.0%} of a CPU busy outside this bench's processes "
                    "(another run or job on the machine? or unattributed kernel work)"
                )
            if steal is not None and steal > 0.05:
                notes.append(f"{part}/{side}: the hypervisor stole {steal:.0%} of a CPU")
            src = r.get("cpu_per_chunk_from")
            if src and src != "steady" and part in ("saturated", "unbatched"):
                notes.append(f"{part}/{side}: CPU per chunk from the {src}")
            left = _get(r, "upstream", "left_open")
            if left:
                notes.append(f"{part}/{side}: {left} upstream streams still open afterwards")
            stat, clock = _get(r, "cpu", "stat_s"), _get(r, "cpu", "clock_s")
            if stat is not None and clock and abs(stat - clock) > max(0.03, 0.1 * clock):
                notes.append(
                    f"{part}/{side}: CPU from /proc stat {stat:.3f}s vs CPU clock {clock:.3f}s"
                )

    header = ("metric", "direct", "gateway", "overhead", "aim", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
    lines = []
    for i, r in enumerate([header, *rows]):
        cells = [r[0].ljust(widths[0])] + [
            r[j].rjust(widths[j]) if j in (1, 2, 3) else r[j].ljust(widths[j]) for j in range(1, 6)
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in notes)
    if missed:
        lines.append(f"\naims missed: {', '.join(missed)}")
    summary = {"aims": summary, "aims_missed": missed, "notes": notes}
    return "\n".join(lines), summary
