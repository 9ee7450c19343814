"""One read of the home: the queue, the workers, the history window, health, disk.

:func:`observe` reads everything that status, the snapshot and check need, once; the
health comes from the supervisor's ``health.json`` while it is fresh, else it is computed
from the files with the same rule (:mod:`coordination.metrics.health`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

from .. import clock
from ..config import SystemConfig, load_system
from ..control import paused_types, read_control
from ..paths import Home
from ..tasks import PRIORITIES, Task
from .health import compute_health, health_stale_after, read_health_file, worker_rows
from .values import rounded, ts_of
from .window import WindowStats, history_window, window_stats

_MB = 1024 * 1024


@dataclass
class Observation:
    """Everything status, snapshot and check need, read once."""

    now: float
    cfg: SystemConfig
    queue: dict[str, Any]
    workers: list[dict[str, Any]]
    window: WindowStats
    health: dict[str, Any]
    backpressure: bool
    paused: dict[str, Any]
    circuits: dict[str, Any]
    disk: dict[str, Any]
    files: dict[str, int]
    service: dict[str, Any]


def file_sizes(home: Home) -> dict[str, int]:
    """Bytes of every regular, non-hidden file directly in coordination/."""
    out = {}
    try:
        with os.scandir(home.coordination) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    out[entry.name] = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return {}
    return dict(sorted(out.items()))


def disk_usage(home: Home) -> dict[str, Any]:
    usage = shutil.disk_usage(home.root)
    return {"free_bytes": usage.free, "total_bytes": usage.total,
            "free_mb": round(usage.free / _MB, 1)}


def observe(home: Home, now: float | None = None, *, queue: Any = None) -> Observation:
    """Read the home once. Raises NotInitialized, ConfigError or CorruptFileError.

    ``queue``: the home's queue (QueueBackend) the caller already has, to read through (a
    long-lived one, e.g. a server's or the CLI's, is reused instead of read again); default
    the process's shared one."""
    from ..queue import open_queue  # the queue package is the heaviest import; keep it local

    home.require()
    ts = clock.now() if now is None else now
    cfg = load_system(home)
    queue_api = open_queue(home) if queue is None else queue
    stats = queue_api.stats(ts)
    window_s = float(cfg["health_window_s"])
    hist = history_window(home, ts - window_s)
    window = window_stats(hist.records, ts, window_s, hist.complete)
    workers = worker_rows(home, cfg, ts)
    max_depth = int(cfg["max_queue_depth"])
    queued = int(stats["by_status"]["queued"])
    backpressure = queued >= max_depth  # the next `task add` would be refused
    control = read_control(home)
    active_pauses = paused_types(control, ts)
    paused = {name: info for name, info in control.get("paused_types", {}).items()
              if name in active_pauses}
    oldest_runnable = (oldest_runnable_since(queue_api.live_tasks(), active_pauses, ts)
                       if queued else None)
    supervisor = read_health_file(home)
    age = None if supervisor is None else ts_of(supervisor.get("updated_at"))
    fresh = supervisor is not None and age is not None \
        and ts - age <= health_stale_after(cfg)
    computed_stalled = [str(w["worker_id"]) for w in workers if w["stalled"]]
    circuits: dict[str, Any] = {}
    if fresh and supervisor is not None:
        stalled = [str(s) for s in supervisor.get("stalled_workers") or []]
        for w in workers:
            if w["worker_id"] in stalled and not w["stalled"]:
                w.update(stalled=True, stall_reason="reported by the supervisor")
        raw_circuits = supervisor.get("circuits")
        circuits = dict(raw_circuits) if isinstance(raw_circuits, dict) else {}
        health: dict[str, Any] = {"state": supervisor["health"],
                  "reasons": [str(r) for r in supervisor.get("reasons") or []],
                  "source": "supervisor", "updated_at": supervisor.get("updated_at"),
                  "success_rate": supervisor.get("success_rate"),
                  "stalled_workers": sorted(set(stalled) | set(computed_stalled))}
        backpressure = bool(supervisor.get("backpressure", backpressure)) or backpressure
    else:
        state, reasons = compute_health(window.success_rate, computed_stalled, window_s,
                                        attempts=window.completed + window.failed,
                                        min_attempts=int(cfg["health_min_attempts"]))
        if supervisor is not None:
            reasons.append(f"health.json is stale (updated {supervisor.get('updated_at')}); "
                           "computed from the files")
        health = {"state": state, "reasons": reasons, "source": "computed",
                  "updated_at": clock.iso(ts), "success_rate": rounded(window.success_rate, 4),
                  "stalled_workers": computed_stalled}
    queue = {
        "queued": queued, "running": int(stats["by_status"]["running"]),
        "live": stats["live"],
        "by_priority": {p: dict(stats["by_priority"].get(p, {"queued": 0, "running": 0}))
                        for p in PRIORITIES},
        "inbox_pending": stats["inbox_pending"], "dead_letters": stats["dead_letters"],
        "oldest_queued_at": stats["oldest_queued_at"],
        "oldest_queued_age_s": stats["oldest_queued_age_s"],
        "oldest_runnable_at": oldest_runnable,
        "oldest_runnable_age_s": _age_s(oldest_runnable, ts),
        "max_queue_depth": max_depth,
    }
    service = service_state(queue, workers, health_file_at=None if supervisor is None
                            else supervisor.get("updated_at"), fresh=fresh, now=ts)
    return Observation(ts, cfg, queue, workers, window, health, backpressure, paused,
                       circuits, disk_usage(home), file_sizes(home), service)


def _age_s(stamp: str | None, now: float) -> float | None:
    at = ts_of(stamp)
    return None if at is None else round(max(0.0, now - at), 3)


def oldest_runnable_since(tasks: Sequence[Task], paused: Container[str],
                          now: float) -> str | None:
    """Since when the oldest runnable task has been waiting: its ``not_before`` when that
    is later than its ``created_at`` (a deferred task or a retry waits from then), else its
    ``created_at``; None when no task is runnable. Runnable is the claim rule
    (``coordination.queue.is_runnable``): queued, due, dependencies finished, type not
    paused, so a deliberately paused type or a future ``not_before`` never looks stuck."""
    from ..queue import is_runnable

    live = {t["task_id"] for t in tasks}
    now_iso = clock.iso(now)
    oldest: str | None = None
    for task in tasks:
        if is_runnable(task, live, now_iso, paused):
            since = max(task["created_at"], task.get("not_before") or "")
            if oldest is None or since < oldest:
                oldest = since
    return oldest


#: What to run when tasks wait and nothing serves them (``harness status`` prints it).
START_HINT = ("run `harness up` (foreground, no systemd), or with the systemd units "
              "installed (`harness systemd install --user`): `systemctl --user start "
              "harness-supervisor.service` (it starts the workers; plain systemctl for a "
              "--system install)")


def service_state(queue: dict[str, Any], workers: Sequence[dict[str, Any]], *,
                  health_file_at: str | None, fresh: bool, now: float) -> dict[str, Any]:
    """Whether anything serves the queue: ``waiting`` (queued tasks plus inbox requests),
    ``live_workers`` (alive, not draining or stopping), ``supervisor`` (``running``: its
    health.json is fresh; ``stale``; ``absent``), ``health_age_s``, ``served`` (False when
    tasks wait with neither a live worker nor a running supervisor) and ``hint``: what to
    run then (None otherwise)."""
    waiting = int(queue["queued"]) + int(queue.get("inbox_pending") or 0)
    live = sum(1 for w in workers if w.get("alive")
               and w.get("state") in ("starting", "idle", "busy"))
    supervisor = "absent" if health_file_at is None else "running" if fresh else "stale"
    served = not waiting or live > 0 or supervisor == "running"
    return {"waiting": waiting, "live_workers": live, "supervisor": supervisor,
            "health_updated_at": health_file_at,
            "health_age_s": _age_s(health_file_at, now),
            "served": served, "hint": None if served else START_HINT}
