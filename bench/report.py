"""The results table: the gateway against the bare byte relay of the same run, the
ratio, and issue 15's targets.

``render(out)`` takes ``runner.run``'s results and returns the text printed by
``make bench`` and a summary for ``latest.json``: every target's value, bound
and verdict (``targets``), the names of those missed (``missed``) and notes.

Columns: direct (straight to the fake upstream; a harness reference), bare
(``bench.bare``), gateway, gw/bare (the gateway's figure over the bare relay's),
the target and whether it is met. A target is ratio-based where the machine's
drift would make an absolute bound meaningless, absolute where the issue sets one.
Rows whose target is "(info)" are context, not judged. With ``--workers N`` a
second table sets the N-worker gateway beside the one-worker one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Issue 15's targets.
TTFT_ADDED_RATIO = 1.5  # added TTFT p50 over direct, gateway / bare
CPU_PER_REQUEST_US = 400.0  # gateway, a 1-chunk request
CPU_UNBATCHED_US = 30.0  # gateway, per chunk, one chunk per upstream read
CPU_UNBATCHED_RATIO = 1.5
CPU_SATURATED_RATIO = 1.5
BURST_TTFT_RATIO = 2.0  # TTFT p50 of the burst, gateway / bare
RSS_PER_STREAM_KIB = 40.0  # gateway, per held stream
# The embedded model enabled but never used may cost the gateway no more than this
# over the same gateway without it (the model alone is ~100 MiB once loaded).
LOCAL_UNUSED_MIB = 64.0

ROUTE_NAMES = {"responses": "/v1/responses", "messages": "/v1/messages"}
RESUMABLE_ROWS = {
    "post": "(a) POST",
    "get_memory": "(b) GET memory log",
    "get_redis": "(c) GET Redis log",
}


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _f(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(g: float | None, b: float | None) -> float | None:
    return None if g is None or not b else g / b


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


@dataclass(slots=True)
class Row:
    metric: str
    direct: str = ""
    bare: str = ""
    gateway: str = ""
    ratio: str = ""
    target: str = "(info)"
    met: str = ""

    def cells(self) -> tuple[str, ...]:
        return (
            self.metric,
            self.direct,
            self.bare,
            self.gateway,
            self.ratio,
            self.target,
            self.met,
        )


class Table:
    """Rows, and the verdict of each target as it is judged."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.targets: dict[str, dict[str, Any]] = {}
        self.missed: list[str] = []
        self.notes: list[str] = []

    def judge(self, name: str, value: float | None, bound: float, text: str) -> bool | None:
        """``value <= bound``; None (not judged) without a value."""
        ok = None if value is None else value <= bound
        self.targets[name] = {"value": value, "target": text, "ok": ok}
        if ok is False:
            self.missed.append(name)
        return ok

    @staticmethod
    def met(*verdicts: bool | None) -> str:
        known = [v for v in verdicts if v is not None]
        if not known:
            return "-"
        if len(verdicts) == 1:
            return "ok" if known[0] else "MISSED"
        return " / ".join("-" if v is None else ("ok" if v else "MISSED") for v in verdicts)

    def render(self, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = []
        for i, r in enumerate([header, *rows]):
            cells = [r[0].ljust(widths[0])]
            for j in range(1, len(header)):
                numeric = j < len(header) - 2
                cells.append(r[j].rjust(widths[j]) if numeric else r[j].ljust(widths[j]))
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return lines


def render(out: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The table as text, and the summary: each target's value and verdict, misses, notes."""
    parts = out.get("parts", {})
    sizes = _get(out, "meta", "sizes") or {}
    t = Table()
    for section in (_ttft, _unbatched, _saturated, _routes, _burst, _many, _rss):
        section(t, parts, sizes)
    _resumable(t, parts, sizes)
    _analysis(t, parts)
    _part_notes(t, parts)

    header = ("metric", "direct", "bare", "gateway", "gw/bare", "target", "met")
    lines = t.render(header, [r.cells() for r in t.rows])
    workers = _workers(t, parts, sizes)
    if workers:
        lines.append("")
        lines.extend(workers)
    if t.notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in t.notes)
    if t.missed:
        lines.append(f"\ntargets missed: {', '.join(t.missed)}")
    summary = {"targets": t.targets, "missed": t.missed, "notes": t.notes}
    return "\n".join(lines), summary


# --- sections --------------------------------------------------------------------------------


def _ttft_rows(t: Table, res: dict[str, Any], label: str, key: str) -> None:
    """Added TTFT p50 (judged as a ratio) and the CPU per 1-chunk request, of one route."""
    d, b, g = res.get("direct"), res.get("bare"), res.get("gateway")
    dv = _get(d, "ttft_ms", "p50")
    bv, gv = _get(b, "ttft_ms", "p50"), _get(g, "ttft_ms", "p50")
    t.rows.append(
        Row(f"{label}TTFT p50, 1 stream (ms)", _f(dv, ".3f"), _f(bv, ".3f"), _f(gv, ".3f"))
    )
    ba, ga = _sub(bv, dv), _sub(gv, dv)
    ratio = _ratio(ga, ba)
    ok = t.judge(
        f"{key}ttft_added_ratio", ratio, TTFT_ADDED_RATIO, f"<= {TTFT_ADDED_RATIO:g}x bare's"
    )
    t.rows.append(
        Row(
            f"{label}  added over direct (ms)",
            "",
            _f(ba, "+.3f"),
            _f(ga, "+.3f"),
            _x(ratio),
            f"<= {TTFT_ADDED_RATIO:g}x",
            t.met(ok),
        )
    )
    bc, gc = _get(b, "cpu_per_request_us"), _get(g, "cpu_per_request_us")
    ok = t.judge(
        f"{key}cpu_per_request_us", gc, CPU_PER_REQUEST_US, f"<= {CPU_PER_REQUEST_US:g} us"
    )
    t.rows.append(
        Row(
            f"{label}CPU per 1-chunk request (us)",
            "",
            _f(bc, ".0f"),
            _f(gc, ".0f"),
            _x(_ratio(gc, bc)),
            f"<= {CPU_PER_REQUEST_US:g} us",
            t.met(ok),
        )
    )


def _ttft(t: Table, parts: dict[str, Any], sizes: dict[str, Any]) -> None:
    res = parts.get("ttft")
    if not res:
        return
    _ttft_rows(t, res, "", "")
    d, b, g = (_get(res, s, "ttft_ms", "p99") for s in ("direct", "bare", "gateway"))
    t.rows.append(Row("TTFT p99, 1 stream (ms)", _f(d, ".3f"), _f(b, ".3f"), _f(g, ".3f")))
    conns = _get(res, "gateway", "upstream", "connections")
    requests = _get(res, "gateway", "requests") or 1
    if conns and conns >= 0.5 * requests:
        t.notes.append(
            f"ttft: the gateway opened {conns} upstream connections for {requests} "
            "sequential requests (no keep-alive reuse to the upstream?)"
        )


def _unbatched_row(
    t: Table, res: dict[str, Any], label: str, key: str
) -> tuple[float | None, float | None]:
    b, g = _get(res, "bare", "cpu_per_chunk_us"), _get(res, "gateway", "cpu_per_chunk_us")
    ratio = _ratio(g, b)
    ok_abs = t.judge(f"{key}cpu_per_chunk_unbatched_us", g, CPU_UNBATCHED_US, "<= 30 us")
    ok_ratio = t.judge(
        f"{key}cpu_per_chunk_unbatched_ratio",
        ratio,
        CPU_UNBATCHED_RATIO,
        f"<= {CPU_UNBATCHED_RATIO:g}x bare's",
    )
    t.rows.append(
        Row(
            label,
            "",
            _f(b, ".1f"),
            _f(g, ".1f"),
            _x(ratio),
            f"<= {CPU_UNBATCHED_US:g} us, <= {CPU_UNBATCHED_RATIO:g}x",
            t.met(ok_abs, ok_ratio),
        )
    )
    return b, g


def _unbatched(t: Table, parts: dict[str, Any], sizes: dict[str, Any]) -> None:
    res = parts.get("unbatched")
    if not res:
        return
    label = (
        f"CPU per chunk, unbatched {sizes.get('unb_streams')}x{sizes.get('unb_chunks')} "
        f"@{sizes.get('unb_interval_ms')}ms (us)"
    )
    _unbatched_row(t, res, label, "")
    _floor(t, parts, "unbatched")


def _saturated(t: Table, parts: dict[str, Any], sizes: dict[str, Any]) -> None:
    res = parts.get("saturated")
    if not res:
        return
    label = f"saturated {sizes.get('sat_streams')}x{sizes.get('sat_chunks')}"
    d, b, g = (_get(res, s, "bulk", "chunks_per_s") for s in ("direct", "bare", "gateway"))
    t.rows.append(
        Row(f"{label}: chunks/s", _f(d, ",.0f"), _f(b, ",.0f"), _f(g, ",.0f"), _x(_ratio(g, b)))
    )
    b, g = _get(res, "bare", "cpu_per_chunk_us"), _get(res, "gateway", "cpu_per_chunk_us")
    ratio = _ratio(g, b)
    ok = t.judge(
        "cpu_per_chunk_saturated_ratio",
        ratio,
        CPU_SATURATED_RATIO,
        f"<= {CPU_SATURATED_RATIO:g}x bare's",
    )
    t.rows.append(
        Row(
            f"{label}: CPU per chunk (us)",
            "",
            _f(b, ".1f"),
            _f(g, ".1f"),
            _x(ratio),
            f"<= {CPU_SATURATED_RATIO:g}x",
            t.met(ok),
        )
    )
    _floor(t, parts, "saturated")
    for side in ("bare", "gateway"):
        busy = _get(res, side, "bulk", "busy")
        if busy is not None and busy < 0.9:
            t.notes.append(
                f"saturated: the {side} was only {busy:.0%} busy while the chunks flowed: "
                "it was not the bottleneck, so this is not a full saturation"
            )


def _routes(t: Table, parts: dict[str, Any], sizes: dict[str, Any]) -> None:
    res = parts.get("routes")
    if not res:
        return
    for route, name in ROUTE_NAMES.items():
        r = res.get(route)
        if not r:
            continue
        key = f"{route}_"
        _ttft_rows(t, r.get("ttft") or {}, f"{name}: ", key)
        label = (
            f"{name}: CPU per chunk, unbatched {sizes.get('unb_streams')}x"
            f"{sizes.get('route_chunks')} (us)"
        )
        _unbatched_row(t, r.get("unbatched") or {}, label, key)


def _complete(r: Any, n: Any) -> str:
    c = _get(r, "complete")
    return "-" if c is None else f"{c}/{n}"


def _burst(t: Table, parts: dict[str, Any], sizes: dict[str, Any]) -> None:
    res = parts.get("burst")
    if not res:
        return
    n = sizes.get("burst_streams")
    label = (
        f"{n} streams at once, {sizes.get('burst_chunks')} chunks "
        f"@{sizes.get('burst_interval_ms')}ms"
    )
    d, b, g = (res.get(s) for s in ("direct", "bare", "gateway"))
    gc = _get(g, "complete")
    ok = None if gc is None else gc == n
    t.targets["burst_complete"] = {"value": gc, "target": f"== {n}", "ok": ok}
    if ok is False:
        t.missed.append("burst_complete")
    t.rows.append(
        Row(
            f"{label}: complete",
            _complete(d, n),
            _complete(b, n),
            _complete(g, n),
            "",
            "all",
            t.met(ok),
        )
    )
    if _get(d, "complete") not in (None, n):
        t.notes.append(f"burst: only {d['complete']}/{n} direct streams completed (harness?)")
    dv, bv, gv = (_get(x, "ttft_ms", "p50") for x in (d, b, g))
    ratio = _ratio(gv, bv)
    ok = t.judge(
        "burst_ttft_p50_ratio", ratio, BURST_TTFT_RATIO, f"<= {BURST_TTFT_RATIO:g}x bare's"
    )
    t.rows.append(
        Row(
            f"{label}: TTFT p50 (ms)",
            _f(dv, ".1f"),
            _f(bv, ".1f"),
            _f(gv, ".1f"),
            _x(ratio),
            f"<= {BURST_TTFT_RATIO:g}x",
            t.met(ok),
        )
    )
    dv, bv, gv = (_get(x, "ttft_ms", "p99") for x in (d, b, g))
    t.rows.append(
        Row(
            f"{label}: TTFT p99 (ms)",
            _f(dv, ".1f"),
            _f(bv, ".1f"),
            _f(gv, ".1f"),
            _x(_ratio(gv, bv)),
        )
    )
    dv, bv, gv = (_get(x, "open_s") for x in (d, b, g))
    t.rows.append(Row(f"{label}: all requests written in (s)", _f(dv), _f(bv), _f(gv)))


def _many(t: Table, parts: dict[str, Any], sizes: dict[str, Any]) -> None:
    res = parts.get("many")
    if not res:
        return
    n = sizes.get("many_streams")
    label = f"{n}x{sizes.get('many_chunks')} @{sizes.get('many_interval_ms')}ms"
    d, b, g = (res.get(s) for s in ("direct", "bare", "gateway"))
    t.rows.append(
        Row(f"{label}: complete", _complete(d, n), _complete(b, n), _complete(g, n), "", "(info)")
    )
    dv, bv, gv = (_get(x, "ttft_ms", "p99") for x in (d, b, g))
    t.rows.append(
        Row(
            f"{label}: TTFT p99 (ms)",
            _f(dv, ".1f"),
            _f(bv, ".1f"),
            _f(gv, ".1f"),
            _x(_ratio(gv, bv)),
        )
    )


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


def _rss(t: Table, parts: dict[str, Any], sizes: dict[str, Any]) -> None:
    res = parts.get("rss")
    if not res:
        return
    b, g, local = res.get("bare"), res.get("gateway"), res.get("gateway_local")
    bf, gf = _mib(_get(b, "fresh_rss_kib")), _mib(_get(g, "fresh_rss_kib"))
    t.rows.append(
        Row("memory before any traffic (MiB)", "", _f(bf, ".1f"), _f(gf, ".1f"), _x(_ratio(gf, bf)))
    )
    lf = _mib(_get(local, "fresh_rss_kib"))
    extra = _sub(lf, gf)
    ok = t.judge(
        "embedded_model_unused_extra_mib",
        extra,
        LOCAL_UNUSED_MIB,
        f"<= +{LOCAL_UNUSED_MIB:g} MiB over the gateway without it",
    )
    t.rows.append(
        Row(
            "  same, embedded model enabled, unused (MiB)",
            "",
            "",
            _f(lf, ".1f"),
            "" if extra is None else f"{extra:+.1f} MiB",
            f"<= +{LOCAL_UNUSED_MIB:g} MiB",
            t.met(ok),
        )
    )
    if _get(local, "error"):
        t.notes.append(f"rss/gateway_local: {local['error']}")
    n = sizes.get("rss_streams")
    gc = _get(g, "complete")
    ok = None if gc is None else gc == n
    t.targets["held_complete"] = {"value": gc, "target": f"== {n}", "ok": ok}
    if ok is False:
        t.missed.append("held_complete")
    t.rows.append(
        Row(
            f"{n} near-idle streams held, then complete",
            "",
            _complete(b, n),
            _complete(g, n),
            "",
            "all",
            t.met(ok),
        )
    )
    bp, gp = _get(b, "per_stream_kib"), _get(g, "per_stream_kib")
    ok = t.judge("rss_per_stream_kib", gp, RSS_PER_STREAM_KIB, f"<= {RSS_PER_STREAM_KIB:g} KiB")
    t.rows.append(
        Row(
            f"memory per open stream, {_get(g, 'held_open')} held (KiB)",
            "",
            _f(bp, ".1f"),
            _f(gp, ".1f"),
            _x(_ratio(gp, bp)),
            f"<= {RSS_PER_STREAM_KIB:g} KiB",
            t.met(ok),
        )
    )
    for side, r in (("bare", b), ("gateway", g)):
        if r and r.get("held_open") != n:
            t.notes.append(
                f"rss/{side}: {r.get('held_open')}/{n} streams held at once "
                f"(opened in {_f(r.get('open_s'), '.1f')} s)"
            )


def _floor(t: Table, parts: dict[str, Any], load: str) -> None:
    """The raw TCP relay's CPU per chunk of ``load``, in the bare column: the floor
    under any Python relay on this machine (part ``floor``)."""
    r = _get(parts, "floor", "relay", load)
    if r:
        t.rows.append(
            Row(
                f"  {load}: raw TCP relay floor, no HTTP (us)",
                "",
                _f(r.get("cpu_per_chunk_us"), ".1f"),
                "",
                "",
                "(info: in bare's column)",
            )
        )


def _resumable(t: Table, parts: dict[str, Any], sizes: dict[str, Any]) -> None:
    """The replay log's cost (optional part): (a) POST, (b) GET + memory log, (c) + Redis."""
    res = parts.get("resumable")
    if not res:
        return
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
            t.rows.append(
                Row(
                    f"{load} {label} {name}: CPU/chunk (us)",
                    "",
                    "",
                    _f(cpu, ".1f"),
                    "",
                    f"(info) {extra}".rstrip(),
                )
            )
        redis = _get(sides, "get_redis", "also", "redis")
        if redis:
            busy = _get(redis, "cpu_busy")
            t.rows.append(
                Row(
                    f"{load} {label} (c): redis-server CPU/chunk (us)",
                    "",
                    "",
                    _f(redis.get("cpu_per_chunk_cmp_us"), ".1f"),
                    "",
                    "(info: not the gateway)" + ("" if busy is None else f", busy {busy:.0%}"),
                )
            )
        if load == "saturated":
            rates = [
                f"{name.split()[0]} {_f(_get(sides, side, 'bulk', 'chunks_per_s'), ',.0f')}"
                for side, name in RESUMABLE_ROWS.items()
                if isinstance(sides.get(side), dict)
            ]
            if rates:
                t.notes.append(f"resumable saturated: chunks/s {', '.join(rates)}")


def _workers(t: Table, parts: dict[str, Any], sizes: dict[str, Any]) -> list[str]:
    """The N-worker gateway beside the one-worker one (its own small table)."""
    w = parts.get("workers")
    if not w:
        return []
    n = w.get("workers")
    if w.get("error"):
        t.notes.append(f"workers: {w['error']}")
    one_sat, many_sat = _get(parts, "saturated", "gateway"), w.get("saturated")
    one_burst, many_burst = _get(parts, "burst", "gateway"), w.get("burst")
    rows: list[tuple[str, ...]] = []

    def row(label: str, a: float | None, b: float | None, spec: str) -> None:
        rows.append((label, _f(a, spec), _f(b, spec), _x(_ratio(b, a))))

    sat = f"saturated {sizes.get('sat_streams')}x{sizes.get('sat_chunks')}"
    row(
        f"{sat}: chunks/s",
        _get(one_sat, "bulk", "chunks_per_s"),
        _get(many_sat, "bulk", "chunks_per_s"),
        ",.0f",
    )
    row(
        f"{sat}: CPU per chunk, all processes (us)",
        _get(one_sat, "cpu_per_chunk_us"),
        _get(many_sat, "cpu_per_chunk_us"),
        ".1f",
    )
    row(
        f"{sat}: CPU busy (CPUs)",
        _get(one_sat, "bulk", "busy"),
        _get(many_sat, "bulk", "busy"),
        ".2f",
    )
    burst = f"burst {sizes.get('burst_streams')} streams"
    b = sizes.get("burst_streams")
    rows.append((f"{burst}: complete", _complete(one_burst, b), _complete(many_burst, b), ""))
    row(
        f"{burst}: TTFT p50 (ms)",
        _get(one_burst, "ttft_ms", "p50"),
        _get(many_burst, "ttft_ms", "p50"),
        ".1f",
    )
    row(
        f"{burst}: TTFT p99 (ms)",
        _get(one_burst, "ttft_ms", "p99"),
        _get(many_burst, "ttft_ms", "p99"),
        ".1f",
    )
    header = ("gateway workers (info)", "1 worker", f"{n} workers", f"{n}/1")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = []
    for i, r in enumerate([header, *rows]):
        lines.append(
            "  ".join(
                [r[0].ljust(widths[0]), *(r[j].rjust(widths[j]) for j in range(1, 4))]
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        f"({n} workers: `python -m app --workers {n}` on CPUs {w.get('cpus')}, which the load "
        "shares; 1 worker: pinned to one CPU)"
    )
    return lines


def _analysis(t: Table, parts: dict[str, Any]) -> None:
    """Where the gateway's time goes, from the numbers above."""
    per_req = _get(parts, "ttft", "gateway", "cpu_per_request_us")
    d, g = (
        _get(parts, "ttft", "direct", "ttft_ms", "p50"),
        _get(parts, "ttft", "gateway", "ttft_ms", "p50"),
    )
    added = _sub(g, d)
    if per_req is not None and added is not None:
        t.notes.append(
            f"gateway: {per_req / 1000:.2f} ms CPU per request vs {added:.2f} ms added TTFT p50"
            + (": TTFT overhead is the per-request CPU" if per_req / 1000 >= 0.6 * added else "")
        )
    unb = _get(parts, "unbatched", "gateway")
    if per_req is not None and unb and unb.get("cpu") and unb.get("chunks_relayed"):
        setup = per_req * unb["streams"] / 1e6
        share = setup / unb["cpu"]["cpu_s"] if unb["cpu"]["cpu_s"] else 0
        sat = _get(parts, "saturated", "gateway", "cpu_per_chunk_us")
        t.notes.append(
            f"unbatched: per-request set-up is ~{share:.0%} of the gateway's CPU in that part "
            f"({unb['streams']} requests x {per_req:.0f} us vs {unb['chunks_relayed']} chunks); "
            f"per chunk: {_f(unb.get('cpu_per_chunk_us'), '.1f')} us steady"
            + ("" if sat is None else f" vs {sat:.1f} us batched (saturated)")
        )


def _sides(part: str, res: dict[str, Any]) -> list[tuple[str, Any]]:
    """(side, result) of one part, for the notes: direct / bare / gateway; the routes'
    loads; the floor's relay loads; the resumable part's loads x sides; workers' loads."""
    if part == "floor":
        return list((res.get("relay") or {}).items())
    if part == "routes":
        return [
            (f"{route}/{load}/{side}", r)
            for route, loads in res.items()
            for load, sides in (loads or {}).items()
            for side, r in (sides or {}).items()
        ]
    if part == "resumable":
        return [
            (f"{load}/{side}", r)
            for load in ("unbatched", "saturated")
            for side, r in (res.get(load) or {}).items()
        ]
    if part == "workers":
        return [(load, res.get(load)) for load in ("saturated", "burst")]
    return list(res.items())


def _part_notes(t: Table, parts: dict[str, Any]) -> None:
    """Errors, failures and suspect measurements of every part and side."""
    busy: list[str] = []
    stolen: list[str] = []
    for part, res in parts.items():
        for side, r in _sides(part, res):
            if not isinstance(r, dict):
                continue
            where = f"{part}/{side}"
            if r.get("error"):
                t.notes.append(f"{where}: {r['error']}")
            fails = _get(r, "failures", "reasons")
            if fails:
                samples = "; ".join(_get(r, "failures", "samples") or [])
                t.notes.append(f"{where}: failures {fails}; e.g. {samples[:600]}")
            other = _get(r, "machine", "other_share")
            steal = _get(r, "machine", "steal_share")
            if other is not None and other > 0.25:
                busy.append(f"{where} {other:.0%}")
            if steal is not None and steal > 0.05:
                stolen.append(f"{where} {steal:.0%}")
            src = r.get("cpu_per_chunk_from")
            if src and src != "steady" and part in ("saturated", "unbatched", "routes"):
                t.notes.append(f"{where}: CPU per chunk from the {src}")
            left = _get(r, "upstream", "left_open")
            if left:
                t.notes.append(f"{where}: {left} upstream streams still open afterwards")
            stat, clock = _get(r, "cpu", "stat_s"), _get(r, "cpu", "clock_s")
            if stat is not None and clock and abs(stat - clock) > max(0.03, 0.1 * clock):
                t.notes.append(
                    f"{where}: CPU from /proc stat {stat:.3f}s vs CPU clock {clock:.3f}s"
                )
    if busy:
        t.notes.append(
            "CPU busy outside this bench's processes (another job on the machine, or kernel "
            f"work not charged to them), share of a CPU: {', '.join(busy)}"
        )
    if stolen:
        t.notes.append(f"CPU stolen by the hypervisor, share of a CPU: {', '.join(stolen)}")
