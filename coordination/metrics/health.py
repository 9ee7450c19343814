"""The stall rule and the health rule, and the worker rows they are judged on.

Stalled workers: :func:`stall_reason`, the rule the supervisor applies too (with its own
progress watermark). From the files alone (until the supervisor publishes its own list):
a busy, draining or stopping spec whose ``heartbeat_at`` is older than
``heartbeat_timeout_s``; or whose ``progress_at`` (or ``progress_updated_at``), when the
worker reports one, is ``worker_stall_timeout_s`` old; or, without such a timestamp, whose
task has run that long while ``progress`` is still 0/null.

Health: :func:`compute_health`, and :func:`health_document`, the ``health.json`` the
supervisor publishes (docs/observability.md, docs/supervisor.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import clock
from ..config import SystemConfig
from ..errors import CorruptFileError
from ..paths import Home
from ..specs import liveness, read_specs
from ..store import read_json
from .values import rounded, ts_of

#: Health rule (see :func:`compute_health`).
HEALTHY_SUCCESS_RATE = 0.8
UNHEALTHY_SUCCESS_RATE = 0.5
UNHEALTHY_STALLED = 2
HEALTH_STATES = ("healthy", "degraded", "unhealthy")
WORKER_STATES = ("starting", "idle", "busy", "draining", "stopping")
#: Worker states in which a worker runs a task, so can stall (the worker's own states).
STALL_STATES = ("busy", "draining", "stopping")


def stall_reason(spec: Mapping[str, Any], now: float, heartbeat_timeout_s: float | None,
                 stall_timeout_s: float, *, unchanged_since: float | None = None
                 ) -> str | None:
    """Why a worker counts as stalled, or None: the one stall rule, shared by status,
    check and snapshots (:func:`worker_rows`) and the supervisor, which fences what it
    finds (docs/supervisor.md).

    A worker in a :data:`STALL_STATES` state is stalled when its heartbeat is older than
    ``heartbeat_timeout_s`` (when given), or when its progress has not changed for
    ``stall_timeout_s`` or longer. Since when it has not changed: ``unchanged_since`` when
    the caller watched it (the supervisor's watermark: when it first saw this progress of
    this task); else the spec's ``progress_at`` (or ``progress_updated_at``); else, while
    ``progress`` is still 0/null, the task's ``task_started_at``."""
    if spec.get("state") not in STALL_STATES:
        return None
    if heartbeat_timeout_s is not None:
        beat = ts_of(spec.get("heartbeat_at"))
        if beat is not None and now - beat > heartbeat_timeout_s:
            return f"heartbeat {now - beat:.0f}s old (limit {heartbeat_timeout_s:g}s)"
    since = unchanged_since
    if since is None:
        since = ts_of(spec.get("progress_at") or spec.get("progress_updated_at"))
    if since is None:
        started = ts_of(spec.get("task_started_at"))
        if started is not None and now - started >= stall_timeout_s \
                and not spec.get("progress"):
            return (f"task running {now - started:.0f}s with no progress reported "
                    f"(limit {stall_timeout_s:g}s)")
        return None
    if now - since >= stall_timeout_s:
        return f"no progress for {now - since:.0f}s (limit {stall_timeout_s:g}s)"
    return None


def worker_rows(home: Home, cfg: SystemConfig, now: float) -> list[dict[str, Any]]:
    """One row per active spec: id, state, task, heartbeat age, stalled and why, alive.

    Liveness is :func:`coordination.specs.liveness`, the proof the supervisor and doctor
    use (pid gone, pid reused per psutil ``create_time`` vs ``process_start_time``, or
    heartbeat older than ``heartbeat_timeout_s``). A proven-dead worker's row has
    ``state`` ``dead`` (what its spec still claims is ``spec_state``), ``alive`` False and
    ``dead_reason`` the proof, so it is never counted as busy or idle. ``stalled`` is
    judged as before, from the spec alone."""
    rows: list[dict[str, Any]] = []
    hb_limit = float(cfg["heartbeat_timeout_s"])
    stall_limit = float(cfg["worker_stall_timeout_s"])
    for read in read_specs(home):
        spec = read.spec
        if spec is None:
            rows.append({"worker_id": read.path.stem, "state": "unreadable", "error": read.error,
                         "spec_state": None, "alive": None, "dead_reason": None,
                         "current_task_id": None, "heartbeat_age_s": None,
                         "task_age_s": None, "stalled": False, "stall_reason": None})
            continue
        beat = ts_of(spec.get("heartbeat_at"))
        started = ts_of(spec.get("task_started_at"))
        reason = stall_reason(spec, now, hb_limit, stall_limit)
        dead = liveness(spec, now, hb_limit)
        rows.append({
            "worker_id": spec.get("worker_id"), "instance": spec.get("instance"),
            "state": "dead" if dead else spec.get("state"), "spec_state": spec.get("state"),
            "alive": dead is None, "dead_reason": dead,
            "current_task_id": spec.get("current_task_id"),
            "heartbeat_at": spec.get("heartbeat_at"),
            "heartbeat_age_s": rounded(None if beat is None else now - beat, 1),
            "task_started_at": spec.get("task_started_at"),
            "task_age_s": rounded(None if started is None or not spec.get("current_task_id")
                                 else now - started, 1),
            "progress": spec.get("progress"), "tasks_done": spec.get("tasks_done"),
            "tasks_failed": spec.get("tasks_failed"), "tokens_used": spec.get("tokens_used"),
            "pid": spec.get("pid"), "unit": spec.get("unit"),
            "stalled": reason is not None, "stall_reason": reason,
        })
    return rows


def compute_health(success_rate: float | None, stalled_workers: Sequence[str],
                   window_s: float | None = None, *, attempts: int | None = None,
                   min_attempts: int = 0) -> tuple[str, list[str]]:
    """The health rule shared with the supervisor: ``(state, reasons)``.

    healthy: success rate >= 80% (or no finished attempt in the window) and no stalled
    worker; unhealthy: success rate < 50% or more than 2 stalled workers; else degraded.
    ``success_rate`` is completed / (completed + failed) attempts over ``health_window_s``;
    it is not judged while ``attempts`` (that count) is below ``min_attempts``
    (``health_min_attempts``).
    """
    if attempts is not None and attempts < min_attempts:
        success_rate = None
    reasons: list[str] = []
    over = f" over {window_s:g}s" if window_s else ""
    stalled = len(stalled_workers)
    unhealthy = degraded = False
    if success_rate is not None and success_rate < UNHEALTHY_SUCCESS_RATE:
        unhealthy = True
        reasons.append(f"success rate {success_rate:.0%} < {UNHEALTHY_SUCCESS_RATE:.0%}{over}")
    elif success_rate is not None and success_rate < HEALTHY_SUCCESS_RATE:
        degraded = True
        reasons.append(f"success rate {success_rate:.0%} < {HEALTHY_SUCCESS_RATE:.0%}{over}")
    if stalled > UNHEALTHY_STALLED:
        unhealthy = True
    elif stalled:
        degraded = True
    if stalled:
        names = ", ".join(list(stalled_workers)[:5]) + (", ..." if stalled > 5 else "")
        reasons.append(f"{stalled} stalled worker(s): {names}")
    state = "unhealthy" if unhealthy else "degraded" if degraded else "healthy"
    return state, reasons


def health_stale_after(cfg: SystemConfig) -> float:
    """A health.json older than this is ignored (its supervisor is presumed gone)."""
    return max(60.0, 10.0 * float(cfg["supervisor_tick_s"]))


def read_health_file(home: Home) -> dict[str, Any] | None:
    """The supervisor's health.json, None when absent or unreadable."""
    try:
        raw = read_json(home.health_file)
    except (FileNotFoundError, CorruptFileError):
        return None
    if not isinstance(raw, dict) or raw.get("health") not in HEALTH_STATES:
        return None
    return raw


def health_document(success_rate: float | None, stalled_workers: Sequence[str], *,
                    backpressure: bool, now: float, window_s: float | None = None,
                    circuits: dict[str, Any] | None = None, attempts: int | None = None,
                    min_attempts: int = 0) -> dict[str, Any]:
    """A health.json document (the supervisor's format) for the given inputs."""
    state, reasons = compute_health(success_rate, stalled_workers, window_s,
                                    attempts=attempts, min_attempts=min_attempts)
    return {"version": 1, "updated_at": clock.iso(now), "health": state,
            "success_rate": rounded(success_rate, 4), "stalled_workers": list(stalled_workers),
            "reasons": reasons, "backpressure": backpressure, "circuits": circuits or {}}
