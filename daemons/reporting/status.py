"""``harness status``: the one-glance summary of a home, and its recent alerts.

Built on one :func:`coordination.metrics.observe` of the home (bounded reads), so the
status, the snapshot and the checks see the same numbers. Everything returned is redacted.
Cost bound: the alert list scans the newest :data:`ALERT_SCAN_LINES` lines of the events
file, backwards.
"""

from __future__ import annotations

from typing import Any

from coordination.jsonl import iter_lines_reverse, parse_record
from coordination.metrics import Observation, observe, snapshot_from
from coordination.paths import Home
from coordination.redact import redact

#: Newest event lines scanned for the "last alerts" of status and dashboard.
ALERT_SCAN_LINES = 2000
ALERT_SEVERITIES = ("warning", "error", "critical")


def recent_alerts(home: Home, limit: int = 5, scan: int = ALERT_SCAN_LINES
                  ) -> list[dict[str, Any]]:
    """The newest warning+ events among the last ``scan`` lines (redacted), oldest first.

    Reads the events file backwards and parses only lines that mention a warning+
    severity word (a byte-level prefilter), stopping at ``limit`` alerts."""
    found: list[dict[str, Any]] = []
    if limit <= 0:
        return found
    words = tuple(s.encode() for s in ALERT_SEVERITIES)
    for seen, raw in enumerate(iter_lines_reverse(home.events_file, 64 << 20)):
        if seen >= scan:
            break
        if not any(w in raw for w in words):
            continue
        event = parse_record(raw)
        if event is not None and event.get("severity") in ALERT_SEVERITIES:
            found.append(event)
            if len(found) >= limit:
                break
    found.reverse()
    return [redact(e) for e in found]


def status_from(obs: Observation, home: Home, alerts: int = 5) -> dict[str, Any]:
    snap = snapshot_from(obs)
    status: dict[str, Any] = redact({
        "timestamp": snap["timestamp"], "home": str(home.root),
        "health": obs.health, "backpressure": obs.backpressure,
        "queue": obs.queue, "workers": obs.workers, "worker_counts": snap["workers"],
        "throughput": snap["throughput"], "success_rate": snap["success_rate"],
        "durations": snap["durations"],
        "paused_types": obs.paused, "circuits": obs.circuits,
        "alerts": recent_alerts(home, alerts),
        "service": obs.service,
        "disk": obs.disk, "history_window_complete": obs.window.complete,
    })
    return status


def collect_status(home: Home, now: float | None = None, alerts: int = 5, *,
                   queue: Any = None) -> dict[str, Any]:
    """The one-glance summary of ``harness status --json`` (bounded reads, redacted);
    ``queue`` as for :func:`observe`."""
    return status_from(observe(home, now, queue=queue), home, alerts)
