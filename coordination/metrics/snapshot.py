"""The metrics snapshot: its schema (:func:`snapshot_from`) and ``metrics-snapshots.jsonl``.

This module owns ``coordination/metrics-snapshots.jsonl``: :func:`take_snapshot` appends
one snapshot under ``locks/metrics.lock``; :func:`last_snapshot` and
:func:`recent_snapshots` read it backwards (docs/observability.md).
"""

from __future__ import annotations

from typing import Any

from .. import clock
from ..config import load_system
from ..jsonl import iter_lines_reverse, parse_record, tail_jsonl
from ..locks import lock_for
from ..paths import Home
from ..store import append_line
from .counters import update_counters
from .health import WORKER_STATES
from .observation import Observation, observe
from .values import percentile, rounded

SNAPSHOT_VERSION = 1


def _worker_counts(obs: Observation) -> dict[str, Any]:
    counts: dict[str, Any] = {"active": len(obs.workers)}
    for state in WORKER_STATES:
        counts[state] = sum(1 for w in obs.workers if w["state"] == state)
    # Proven dead (specs.liveness) but not yet retired: counted here, never as busy/idle.
    counts["dead"] = sum(1 for w in obs.workers if w["state"] == "dead")
    stalled = sorted(set(obs.health.get("stalled_workers") or []))
    counts["stalled"] = len(stalled)
    counts["stalled_ids"] = stalled
    return counts


def snapshot_from(obs: Observation, counters: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics snapshot (one line of metrics-snapshots.jsonl) of an observation."""
    w = obs.window
    per_min = w.window_s / 60.0
    snap: dict[str, Any] = {
        "version": SNAPSHOT_VERSION,
        "timestamp": clock.iso(obs.now),
        "window_s": w.window_s,
        "queue": obs.queue,
        "workers": _worker_counts(obs),
        "throughput": {
            "completed_1m": w.completed_1m, "failed_1m": w.failed_1m,
            "completed_per_min_1m": float(w.completed_1m),
            "failed_per_min_1m": float(w.failed_1m),
            "completed_window": w.completed, "failed_window": w.failed,
            "completed_per_min_window": round(w.completed / per_min, 3),
            "failed_per_min_window": round(w.failed / per_min, 3),
        },
        "success_rate": rounded(w.success_rate, 4),
        "error_rate": rounded(w.error_rate, 4),
        "durations": {
            "task_p50_s": rounded(percentile(w.durations, 0.5)),
            "task_p95_s": rounded(percentile(w.durations, 0.95)),
            "task_samples": len(w.durations),
            "wait_p50_s": rounded(percentile(w.waits, 0.5)),
            "wait_p95_s": rounded(percentile(w.waits, 0.95)),
            "wait_samples": len(w.waits),
        },
        "tokens": {"window": w.tokens,
                   "total": None if counters is None else counters.get("tokens_total")},
        "backpressure": obs.backpressure,
        "health": {k: obs.health[k] for k in ("state", "reasons", "source", "updated_at")},
        "paused_types": sorted(obs.paused),
        "circuits": obs.circuits,
        "disk": obs.disk,
        "files": obs.files,
        "supervisor": {k: obs.service[k] for k in ("supervisor", "health_updated_at",
                                                     "health_age_s")},
        "history_window_complete": w.complete,
    }
    if counters is not None:
        snap["counters"] = counters
    return snap


def last_snapshot(home: Home) -> dict[str, Any] | None:
    """The newest parseable snapshot (a torn or garbage last line is skipped)."""
    for raw in iter_lines_reverse(home.metrics_file, 16 << 20):
        snap = parse_record(raw)
        if snap is not None and isinstance(snap.get("timestamp"), str):
            return snap
    return None


def recent_snapshots(home: Home, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` snapshots, oldest first (a backwards read)."""
    return [s for s in tail_jsonl(home.metrics_file, limit) if isinstance(s.get("timestamp"),
                                                                         str)]


def build_snapshot(home: Home, now: float | None = None, *, counters: bool = True,
                   previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A snapshot of the home now (not appended). ``counters`` adds the cumulative counters,
    continued from ``previous`` (default: the last stored snapshot)."""
    obs = observe(home, now)
    totals = None
    if counters:
        prev = previous if previous is not None else last_snapshot(home)
        totals = update_counters(home, (prev or {}).get("counters"))
    return snapshot_from(obs, totals)


def take_snapshot(home: Home, now: float | None = None) -> dict[str, Any]:
    """Build a snapshot and append it to metrics-snapshots.jsonl under locks/metrics.lock."""
    home.require()
    cfg = load_system(home)
    with lock_for(home.lock_path("metrics")).held_for(cfg.lock_timeout):
        snap = build_snapshot(home, now)
        append_line(home.metrics_file, snap, cfg.durability)
    return snap
