"""Prometheus text exposition (format 0.0.4) of a metrics snapshot, and the textfile.

``harness metrics show --format prometheus`` prints it; with ``metrics_textfile`` set in
system.json, ``harness metrics snapshot`` (and ``show``) also publish it atomically (write a
hidden temp file in the same directory, fsync, rename) for node_exporter's textfile
collector, which only reads ``*.prom`` and so never sees the temp file. Every metric is in
the ``harness_`` namespace with HELP and TYPE lines (docs/observability.md lists them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from coordination.metrics import HEALTH_STATES, WORKER_STATES
from coordination.paths import Home
from coordination.store import replace_bytes
from coordination.tasks import PRIORITIES

Sample = tuple[str, dict[str, str], float | None]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class Exposition:
    """Collects metric families and renders them in the text format."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        self._lines.append(f"# HELP {name} {help_text.replace(chr(92), '')}")
        self._lines.append(f"# TYPE {name} {kind}")
        for sample_name, labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            braces = f"{{{label_text}}}" if label_text else ""
            self._lines.append(f"{sample_name}{braces} {_value(value)}")

    def gauge(self, name: str, help_text: str, value: float | None,
              labels: dict[str, str] | None = None) -> None:
        self.family(name, "gauge", help_text, [(name, labels or {}, value)])

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"


def _num(v: Any) -> float | None:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    return None


def render(snap: dict[str, Any]) -> str:
    """The exposition of one snapshot (counters need a snapshot built with counters)."""
    x = Exposition()
    queue = snap["queue"]
    x.family("harness_queue_tasks", "gauge", "Live tasks by status and priority.",
             [("harness_queue_tasks", {"status": status, "priority": p},
               float(queue["by_priority"].get(p, {}).get(status, 0)))
              for p in PRIORITIES for status in ("queued", "running")])
    x.gauge("harness_queue_inbox_pending", "Task requests waiting in the inbox.",
            _num(queue.get("inbox_pending")))
    x.gauge("harness_oldest_queued_age_seconds",
            "Age of the oldest queued task (0 when none is queued).",
            _num(queue.get("oldest_queued_age_s")) or 0.0)
    x.gauge("harness_oldest_runnable_age_seconds",
            "How long the oldest runnable queued task has waited (0 when none is runnable; "
            "harness check: check_oldest_queued_s).",
            _num(queue.get("oldest_runnable_age_s")) or 0.0)
    supervisor = snap.get("supervisor") or {}
    x.gauge("harness_supervisor_health_age_seconds",
            "Age of the supervisor's health.json (NaN when absent; harness check: "
            "check_supervisor_stale_s while tasks wait).",
            _num(supervisor.get("health_age_s")))
    x.gauge("harness_dead_letters", "Tasks in the dead-letter directory.",
            _num(queue.get("dead_letters")))
    x.gauge("harness_max_queue_depth", "Configured max_queue_depth (backpressure limit).",
            _num(queue.get("max_queue_depth")))
    workers = snap["workers"]
    x.family("harness_workers", "gauge", "Active workers by spec state; state=\"dead\": "
             "proven dead (pid gone or reused, heartbeat too old), not yet reclaimed.",
             [("harness_workers", {"state": s}, float(workers.get(s, 0)))
              for s in (*WORKER_STATES, "dead")])
    x.gauge("harness_workers_stalled", "Busy workers without heartbeat or progress.",
            float(workers.get("stalled", 0)))
    x.gauge("harness_backpressure_active", "1 while the queue is at or past "
            "max_queue_depth.", 1.0 if snap.get("backpressure") else 0.0)
    state = snap["health"]["state"]
    x.gauge("harness_health", "Health: 0 healthy, 1 degraded, 2 unhealthy.",
            float(HEALTH_STATES.index(state)) if state in HEALTH_STATES else None)
    x.family("harness_health_state", "gauge", "1 for the current health state.",
             [("harness_health_state", {"state": s}, 1.0 if s == state else 0.0)
              for s in HEALTH_STATES])
    x.gauge("harness_success_rate", "Completed / finished attempts over health_window_s "
            "(NaN without attempts).", _num(snap.get("success_rate")))
    tp = snap["throughput"]
    x.family("harness_attempts_per_minute", "gauge",
             "Finished attempts per minute, over the last minute and over health_window_s.",
             [("harness_attempts_per_minute", {"result": r, "window": w},
               _num(tp.get(f"{r}_per_min_{key}")))
              for r in ("completed", "failed") for w, key in (("1m", "1m"),
                                                              ("health", "window"))])
    counters = snap.get("counters")
    durations = snap["durations"]
    duration_counts = (counters or {}).get("duration") or {}
    wait_counts = (counters or {}).get("wait") or {}
    x.family("harness_task_duration_seconds", "summary",
             "Attempt run time: quantiles over health_window_s, sum and count cumulative.",
             [("harness_task_duration_seconds", {"quantile": "0.5"},
               _num(durations.get("task_p50_s"))),
              ("harness_task_duration_seconds", {"quantile": "0.95"},
               _num(durations.get("task_p95_s"))),
              ("harness_task_duration_seconds_sum", {}, _num(duration_counts.get("sum_s"))
               or 0.0),
              ("harness_task_duration_seconds_count", {}, _num(duration_counts.get("count"))
               or 0.0)])
    x.family("harness_task_queue_wait_seconds", "summary",
             "Wait from enqueue (or not_before) to claim: quantiles over health_window_s.",
             [("harness_task_queue_wait_seconds", {"quantile": "0.5"},
               _num(durations.get("wait_p50_s"))),
              ("harness_task_queue_wait_seconds", {"quantile": "0.95"},
               _num(durations.get("wait_p95_s"))),
              ("harness_task_queue_wait_seconds_sum", {}, _num(wait_counts.get("sum_s"))
               or 0.0),
              ("harness_task_queue_wait_seconds_count", {}, _num(wait_counts.get("count"))
               or 0.0)])
    if counters is not None:
        x.family("harness_tasks_total", "counter", "Finished tasks by outcome (final history "
                 "records).",
                 [("harness_tasks_total", {"outcome": o}, float(n))
                  for o, n in sorted(counters["tasks_total"].items())]
                 or [("harness_tasks_total", {"outcome": "completed"}, 0.0)])
        x.family("harness_task_attempts_total", "counter", "Finished attempts by result.",
                 [("harness_task_attempts_total", {"result": r}, float(n))
                  for r, n in sorted(counters["attempts_total"].items())])
        x.family("harness_tokens_used_total", "counter",
                 "Tokens reported by task results (result tokens_used).",
                 [("harness_tokens_used_total", {}, _num(counters.get("tokens_total")) or 0.0)])
        exits = counters["worker_exits"]["counts"]
        x.family("harness_worker_exits_total", "counter",
                 "Worker exits by exit_reason (completed worker specs).",
                 [("harness_worker_exits_total", {"reason": r}, float(n))
                  for r, n in sorted(exits.items())]
                 or [("harness_worker_exits_total", {"reason": "none"}, 0.0)])
    x.family("harness_worker_type_paused", "gauge", "1 for each paused worker type.",
             [("harness_worker_type_paused", {"type": t}, 1.0)
              for t in snap.get("paused_types") or []])
    x.gauge("harness_disk_free_bytes", "Free bytes on the home's filesystem.",
            _num(snap["disk"].get("free_bytes")))
    x.family("harness_file_size_bytes", "gauge", "Size of each coordination file.",
             [("harness_file_size_bytes", {"file": name}, float(size))
              for name, size in sorted((snap.get("files") or {}).items())])
    stamp = snap.get("timestamp")
    if isinstance(stamp, str):
        from coordination.clock import parse_iso

        x.gauge("harness_snapshot_timestamp_seconds", "When this snapshot was taken.",
                parse_iso(stamp))
    return x.render()


def publish_textfile(home: Home, snap: dict[str, Any]) -> Path | None:
    """Publish ``render(snap)`` at ``metrics_textfile`` when configured (else None)."""
    from coordination.config import load_system

    cfg = load_system(home)
    configured = cfg["metrics_textfile"]
    if not configured:
        return None
    path = textfile_path(home, configured)
    write_textfile(path, render(snap), cfg.durability)
    return path


def snapshot_and_publish(home: Home, now: float | None = None) -> dict[str, Any]:
    """``harness metrics snapshot`` as a function: append a snapshot (coordination.metrics
    ``take_snapshot``) and refresh the textfile. For daemons that take snapshots on their
    own tick (``harness up``)."""
    from coordination.metrics import take_snapshot

    snap = take_snapshot(home, now)
    publish_textfile(home, snap)
    return snap


def textfile_path(home: Home, configured: str) -> Path:
    """``metrics_textfile`` resolved: absolute, or relative to the home."""
    path = Path(configured).expanduser()
    return path if path.is_absolute() else home.root / path


def write_textfile(path: Path, text: str, durability: str = "fsync") -> None:
    """Publish ``text`` at ``path`` by rename (readers see the old or the new file)."""
    replace_bytes(path, text.encode(), "none" if durability == "none" else "fsync")


__all__ = ["Exposition", "publish_textfile", "render", "snapshot_and_publish",
           "textfile_path", "write_textfile"]
