"""``harness report``: the metrics snapshots over time, as text or one HTML page.

The HTML page is self-contained: inline CSS, charts as inline SVG drawn here in Python,
and one tiny inline script (it shows timestamps in the reader's local time and marks the
document ready); no external asset, font or URL. Every text shown is redacted and escaped.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from coordination import clock
from coordination.metrics import last_snapshot, recent_snapshots
from coordination.paths import Home
from coordination.redact import redact

from .status import recent_alerts

Point = tuple[float, float | None]
Series = tuple[str, str, list[Point]]  # name, colour, points
MAX_POINTS = 720  # per series; longer series are bucketed (max per bucket)

CSS = """
:root { color-scheme: light; --fg:#1d232a; --muted:#5b6570; --line:#d8dde3; --bg:#ffffff; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 24px; max-width: 1100px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.muted { color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; min-width: 150px; }
.card b { display: block; font-size: 20px; }
.healthy { color: #1a7f37; } .degraded { color: #9a6700; } .unhealthy { color: #cf222e; }
figure.chart { margin: 0 0 18px; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
figure.chart figcaption { font-weight: 600; margin: 0 0 4px 6px; }
svg { width: 100%; height: auto; display: block; }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.sev-warning { color: #9a6700; } .sev-error, .sev-critical { color: #cf222e; }
@media print { body { padding: 0; } figure.chart { break-inside: avoid; } }
"""

# Shows <time> elements in local time; marks the page ready (the Chromium test checks it).
SCRIPT = """
(function () {
  var nodes = document.querySelectorAll("time[datetime]");
  for (var i = 0; i < nodes.length; i++) {
    var d = new Date(nodes[i].getAttribute("datetime"));
    if (!isNaN(d.getTime())) { nodes[i].title = d.toLocaleString(); }
  }
  document.documentElement.setAttribute("data-report-ready", String(nodes.length));
})();
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _fmt(v: float) -> str:
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:.0f}"
    return f"{v:.3g}"


def _bucket(points: list[Point], limit: int = MAX_POINTS) -> list[Point]:
    """At most ``limit`` points: consecutive buckets keep their max (peaks stay visible)."""
    if len(points) <= limit:
        return points
    size = len(points) / limit
    out: list[Point] = []
    for i in range(limit):
        chunk = points[int(i * size):int((i + 1) * size)] or points[-1:]
        known = [v for _, v in chunk if v is not None]
        out.append((chunk[-1][0], max(known) if known else None))
    return out


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 4, 6, 8 (times a power of ten) that is >= ``value``: the top of
    the y axis, so that the four grid steps are round numbers."""
    import math

    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 4.0, 6.0, 8.0, 10.0):
        candidate = step * 10.0 ** exponent
        if candidate >= value * 0.999999:
            return candidate
    return 10.0 ** (exponent + 1)


def line_chart(chart_id: str, title: str, series: Sequence[Series], *, unit: str = "",
               width: int = 760, height: int = 220, y_max: float | None = None) -> str:
    """An inline SVG line chart (figure + svg) of time series; gaps where a value is None."""
    left, right, top, bottom = 56, 12, 26, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    series = [(name, colour, _bucket(sorted(points))) for name, colour, points in series]
    times = [t for _, _, pts in series for t, _ in pts]
    values = [v for _, _, pts in series for _, v in pts if v is not None]
    parts = [f'<figure class="chart" id="{_esc(chart_id)}"><figcaption>{_esc(title)}'
             f"</figcaption>",
             f'<svg viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{_esc(title)}"><title>{_esc(title)}</title>']
    if not times or not values:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">'
                     "no data</text></svg></figure>")
        return "".join(parts)
    t0, t1 = min(times), max(times)
    if t1 - t0 < 1:
        t0, t1 = t0 - 30, t1 + 30
    peak = y_max if y_max is not None else max(values)
    top_value = _nice_ceiling(peak) if peak > 0 else 1.0

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * plot_w

    def y(v: float) -> float:
        return top + plot_h - (v / top_value) * plot_h

    for i in range(5):  # horizontal grid with labels
        v = top_value * i / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     'stroke="#e6e9ed" stroke-width="1"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">'
                     f"{_esc(_fmt(v))}{_esc(unit)}</text>")
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        tick = t0 + (t1 - t0) * frac
        parts.append(f'<text x="{x(tick):.1f}" y="{height - 8}" text-anchor="{anchor}">'
                     f"{_esc(clock.iso(tick)[5:16].replace('T', ' '))}Z</text>")
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" '
                 'stroke="#aab2bb"/>')
    legend_x = left + 8
    for name, colour, points in series:
        segment: list[str] = []
        segments: list[list[str]] = []
        for pt, pv in points:
            if pv is None:
                if segment:
                    segments.append(segment)
                segment = []
            else:
                segment.append(f"{x(pt):.1f},{y(pv):.1f}")
        if segment:
            segments.append(segment)
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{_esc(colour)}"/>')
            else:
                parts.append(f'<polyline class="series" data-series="{_esc(name)}" '
                             f'fill="none" stroke="{_esc(colour)}" stroke-width="1.6" '
                             f'points="{" ".join(seg)}"/>')
        parts.append(f'<rect x="{legend_x}" y="4" width="10" height="10" '
                     f'fill="{_esc(colour)}"/><text x="{legend_x + 14}" y="13">'
                     f"{_esc(name)}</text>")
        legend_x += 22 + 7 * len(name)
    parts.append("</svg></figure>")
    return "".join(parts)


def snapshot_series(snaps: list[dict[str, Any]], *path: str) -> list[Point]:
    """``(time, value)`` of each snapshot at the key ``path`` (None where it is not a number)."""
    out: list[Point] = []
    for s in snaps:
        t = _ts(s.get("timestamp"))
        if t is None:
            continue
        value: Any = s
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        out.append((t, _num(value)))
    return out


def _ts(value: Any) -> float | None:
    try:
        return clock.parse_iso(value) if isinstance(value, str) else None
    except ValueError:
        return None


def charts(snaps: list[dict[str, Any]]) -> list[str]:
    return [
        line_chart("chart-queue", "Queue depth", [
            ("queued", "#0969da", snapshot_series(snaps, "queue", "queued")),
            ("running", "#1a7f37", snapshot_series(snaps, "queue", "running")),
            ("dead letters", "#cf222e", snapshot_series(snaps, "queue", "dead_letters"))]),
        line_chart("chart-throughput", "Throughput (attempts per minute)", [
            ("completed", "#1a7f37", snapshot_series(snaps, "throughput", "completed_per_min_1m")),
            ("failed", "#cf222e", snapshot_series(snaps, "throughput", "failed_per_min_1m"))]),
        line_chart("chart-durations", "Durations over the health window", [
            ("run p50", "#0969da", snapshot_series(snaps, "durations", "task_p50_s")),
            ("run p95", "#8250df", snapshot_series(snaps, "durations", "task_p95_s")),
            ("wait p95", "#bf8700", snapshot_series(snaps, "durations", "wait_p95_s"))], unit="s"),
        line_chart("chart-workers", "Workers", [
            ("active", "#57606a", snapshot_series(snaps, "workers", "active")),
            ("busy", "#1a7f37", snapshot_series(snaps, "workers", "busy")),
            ("idle", "#0969da", snapshot_series(snaps, "workers", "idle")),
            ("stalled", "#cf222e", snapshot_series(snaps, "workers", "stalled"))]),
        line_chart("chart-success", "Success rate over the health window", [
            ("success", "#1a7f37", snapshot_series(snaps, "success_rate"))], y_max=1.0),
    ]


def _summary(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    def known(*path: str) -> list[float]:
        return [v for _, v in snapshot_series(snaps, *path) if v is not None]

    queued = known("queue", "queued")
    done = known("throughput", "completed_per_min_1m")
    failed = known("throughput", "failed_per_min_1m")
    p95 = known("durations", "task_p95_s")
    states = [str((s.get("health") or {}).get("state")) for s in snaps]
    return {
        "from": snaps[0]["timestamp"] if snaps else None,
        "to": snaps[-1]["timestamp"] if snaps else None,
        "snapshots": len(snaps),
        "queued_max": max(queued, default=None), "queued_avg":
            sum(queued) / len(queued) if queued else None,
        "completed_sum": sum(done), "failed_sum": sum(failed),
        "p95_max_s": max(p95, default=None),
        "unhealthy_snapshots": states.count("unhealthy"),
        "degraded_snapshots": states.count("degraded"),
        "backpressure_snapshots": sum(1 for s in snaps if s.get("backpressure")),
    }


def summary_report(home: Home, *, limit: int = 1440) -> dict[str, Any]:
    """The summary of the newest ``limit`` snapshots as data (what ``--json`` prints):
    ``snapshots`` 0 and null figures when there is none."""
    snaps = sorted(recent_snapshots(home, limit), key=lambda s: str(s.get("timestamp")))
    out = {"home": str(home.root), **_summary(snaps)}
    last = snaps[-1] if snaps else {}
    out["now"] = {"queued": (last.get("queue") or {}).get("queued"),
                  "running": (last.get("queue") or {}).get("running"),
                  "health": (last.get("health") or {}).get("state")}
    out["tasks_total"] = dict((last.get("counters") or {}).get("tasks_total") or {})
    return out


def text_report(home: Home, *, limit: int = 1440) -> str:
    """A plain-text summary of the newest ``limit`` snapshots."""
    snaps = sorted(recent_snapshots(home, limit), key=lambda s: str(s.get("timestamp")))
    if not snaps:
        return (f"no metrics snapshots in {home.metrics_file} yet; run `harness metrics "
                "snapshot` (or enable harness-metrics.timer)")
    s = _summary(snaps)
    last = snaps[-1]

    def f(v: Any, unit: str = "") -> str:
        return "-" if v is None else f"{v:.1f}{unit}" if isinstance(v, float) else f"{v}{unit}"

    lines = [f"harness report {home.root}: {s['snapshots']} snapshots from {s['from']} "
             f"to {s['to']}",
             f"queue: max {f(s['queued_max'])}, average {f(s['queued_avg'])}; now "
             f"{last['queue']['queued']} queued, {last['queue']['running']} running",
             f"attempts (sum of per-minute samples): {f(s['completed_sum'])} completed, "
             f"{f(s['failed_sum'])} failed",
             f"p95 duration: max {f(s['p95_max_s'], 's')}",
             f"health: now {last['health']['state']}; degraded in {s['degraded_snapshots']}, "
             f"unhealthy in {s['unhealthy_snapshots']} snapshot(s); backpressure in "
             f"{s['backpressure_snapshots']}"]
    counters = last.get("counters") or {}
    if counters.get("tasks_total"):
        lines.append("tasks finished (all time): " + ", ".join(
            f"{k} {v}" for k, v in sorted(counters["tasks_total"].items())))
    return "\n".join(lines)


def html_report(home: Home, *, limit: int = 1440, now: float | None = None) -> str:
    """The self-contained HTML page."""
    snaps = sorted((redact(s) for s in recent_snapshots(home, limit)),
                   key=lambda s: str(s.get("timestamp")))
    generated = clock.iso(clock.now() if now is None else now)
    last = snaps[-1] if snaps else (last_snapshot(home) or {})
    s = _summary(snaps)
    health = str((last.get("health") or {}).get("state") or "unknown")
    queue = last.get("queue") or {}
    workers = last.get("workers") or {}
    cards = [("health", f'<b class="{_esc(health)}">{_esc(health)}</b>'),
             ("queued now", f"<b>{_esc(queue.get('queued', '-'))}</b>"),
             ("running now", f"<b>{_esc(queue.get('running', '-'))}</b>"),
             ("workers", f"<b>{_esc(workers.get('active', '-'))}</b>"),
             ("max queued", f"<b>{_esc(_opt(s['queued_max']))}</b>"),
             ("max p95", f"<b>{_esc(_opt(s['p95_max_s'], 's'))}</b>"),
             ("snapshots", f"<b>{s['snapshots']}</b>")]
    body = [f"<h1>harness report</h1><p class=\"muted\">{_esc(home.root)} &middot; "
            f"generated <time datetime=\"{_esc(generated)}\">{_esc(generated)}</time>"
            + (f" &middot; snapshots from <time datetime=\"{_esc(s['from'])}\">"
               f"{_esc(s['from'])}</time> to <time datetime=\"{_esc(s['to'])}\">"
               f"{_esc(s['to'])}</time>" if snaps else "") + "</p>",
            '<div class="cards">' + "".join(
                f'<div class="card"><span class="muted">{_esc(k)}</span>{v}</div>'
                for k, v in cards) + "</div>"]
    if not snaps:
        body.append(f"<p>No metrics snapshots in {_esc(home.metrics_file)} yet: run "
                    "<code>harness metrics snapshot</code> or enable harness-metrics.timer."
                    "</p>")
    body.append("<h2>Charts</h2>")
    body.extend(charts(snaps))
    counters = last.get("counters") or {}
    if counters.get("tasks_total"):
        body.append("<h2>Tasks finished (all time, by outcome)</h2><table><tr><th>outcome"
                    "</th><th class=\"num\">tasks</th></tr>" + "".join(
                        f"<tr><td>{_esc(k)}</td><td class=\"num\">{_esc(v)}</td></tr>"
                        for k, v in sorted(counters["tasks_total"].items())) + "</table>")
    alerts = recent_alerts(home, 20)
    body.append("<h2>Recent alerts</h2>")
    if alerts:
        body.append("<table><tr><th>time</th><th>severity</th><th>type</th><th>message</th>"
                    "</tr>" + "".join(
                        f"<tr class=\"sev-{_esc(a.get('severity'))}\"><td><time datetime=\""
                        f"{_esc(a.get('timestamp'))}\">{_esc(a.get('timestamp'))}</time></td>"
                        f"<td>{_esc(a.get('severity'))}</td><td>{_esc(a.get('type'))}</td>"
                        f"<td>{_esc(a.get('message'))}</td></tr>" for a in alerts)
                    + "</table>")
    else:
        body.append('<p class="muted">none among the newest events</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>harness report - {_esc(home.root)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}<script>{SCRIPT}</script></body></html>\n")


def _opt(v: Any, unit: str = "") -> str:
    if not isinstance(v, int | float):
        return "-"
    return f"{v:.0f}{unit}" if float(v).is_integer() or abs(v) >= 100 else f"{v:.1f}{unit}"


__all__ = ["charts", "html_report", "line_chart", "text_report"]
