"""Charts of the overview, drawn by the server as inline SVG (no script, no library).

Every label goes through ``html.escape`` (via daemons/reporting/report.py's :func:`line_chart`), and
no ``style`` attribute is used, so the strict Content-Security-Policy allows them.
"""

from __future__ import annotations

import html
from typing import Any

from ..reporting.report import line_chart, snapshot_series

BAR_COLOURS = {"queued": "#0969da", "running": "#1a7f37"}


def hour_charts(snaps: list[dict[str, Any]]) -> list[str]:
    """Throughput and p95 duration over the last hour of metrics snapshots."""
    return [
        line_chart("chart-throughput", "Throughput, last hour (attempts per minute)", [
            ("completed", "#1a7f37", snapshot_series(snaps, "throughput",
                                                     "completed_per_min_1m")),
            ("failed", "#cf222e", snapshot_series(snaps, "throughput", "failed_per_min_1m"))],
            height=180),
        line_chart("chart-p95", "p95 task duration, last hour", [
            ("run p95", "#8250df", snapshot_series(snaps, "durations", "task_p95_s")),
            ("wait p95", "#bf8700", snapshot_series(snaps, "durations", "wait_p95_s"))],
            unit="s", height=180),
    ]


def depth_bars(chart_id: str, title: str, rows: dict[str, dict[str, int]],
               width: int = 420) -> str:
    """Horizontal stacked bars (queued, running) per row label."""
    esc = html.escape
    bar_h, gap, left, top = 18, 6, 110, 22
    height = top + max(1, len(rows)) * (bar_h + gap) + 4
    peak = max((r.get("queued", 0) + r.get("running", 0) for r in rows.values()), default=0)
    scale = (width - left - 60) / peak if peak else 0.0
    parts = [f'<figure class="chart" id="{esc(chart_id)}"><figcaption>{esc(title)}'
             f'</figcaption><svg viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{esc(title)}"><title>{esc(title)}</title>']
    x = left
    for name, colour in BAR_COLOURS.items():
        parts.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="13">{name}</text>')
        x += 80
    if not rows:
        parts.append(f'<text x="{left}" y="{top + 13}">empty</text>')
    for i, (label, counts) in enumerate(rows.items()):
        y = top + i * (bar_h + gap)
        parts.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">'
                     f"{esc(label[:16])}</text>")
        x0 = float(left)
        for status, colour in BAR_COLOURS.items():
            n = int(counts.get(status, 0))
            w = n * scale
            if w > 0:
                parts.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(w, 1.0):.1f}" '
                             f'height="{bar_h}" fill="{colour}"><title>{esc(label)} '
                             f"{status}: {n}</title></rect>")
            x0 += w
        total = sum(int(counts.get(s, 0)) for s in BAR_COLOURS)
        parts.append(f'<text x="{x0 + 6:.1f}" y="{y + 13}">{total}</text>')
    parts.append("</svg></figure>")
    return "".join(parts)
