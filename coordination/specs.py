"""Worker specs: ``coordination/worker-specs/{active,completed}/<worker_id>.json``.

A worker publishes its own spec by rename (:func:`write_spec`) when it registers and on
every heartbeat; when it exits, the spec moves to ``completed/`` with ``completed_at`` and
``exit_reason``. Writes and moves take ``locks/specs.lock`` so a move by the supervisor
(reclaiming a dead worker) and a late heartbeat never resurrect a completed spec.

Death is declared only on proof (:func:`liveness`): the pid is gone, the pid now belongs to
a process with another start time (reuse), or the heartbeat is older than the limit.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from . import clock
from .config import load_system
from .errors import CorruptFileError, NotFound
from .locks import lock_for
from .paths import Home
from .store import read_json, replace_json

SPEC_STATES = ("starting", "idle", "busy", "draining", "stopping", "stopped")
EXIT_REASONS = ("idle", "max_tasks", "max_uptime", "drained", "signal", "error", "crashed",
                "once")


def process_start_time(pid: int) -> float | None:
    """psutil's create_time of ``pid``; None when there is no such process.

    Raises :class:`psutil.AccessDenied` when the process exists but cannot be inspected,
    which is not a proof of death (callers fail closed).
    """
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def worker_type_label(types: list[str] | None) -> str:
    """The spec's ``worker_type``: the single type a worker serves, ``"any"`` when it
    serves every type (``types`` null), else its types joined by commas."""
    return "any" if not types else ",".join(types)


def new_spec(worker_id: str, instance: str, now: float, *, types: list[str] | None = None,
             unit: str | None = None, pid: int | None = None) -> dict[str, Any]:
    """A fresh spec in state ``starting``; ``created_at`` and ``started_at`` are ``now``
    (operators' scripts read ``created_at``; ``started_at`` is kept for older readers)."""
    pid = os.getpid() if pid is None else pid
    try:
        started = process_start_time(pid)
    except psutil.AccessDenied:
        started = None
    return {
        "version": 1, "worker_id": worker_id, "instance": instance, "pid": pid,
        "process_start_time": started, "hostname": socket.gethostname(),
        "unit": unit, "types": types, "worker_type": worker_type_label(types),
        "state": "starting", "created_at": clock.iso(now), "started_at": clock.iso(now),
        "heartbeat_at": clock.iso(now), "progress": 0, "current_task_id": None,
        "task_started_at": None, "tasks_done": 0, "tasks_failed": 0, "tokens_used": 0,
        "completed_at": None, "exit_reason": None,
    }


def active_path(home: Home, worker_id: str) -> Path:
    return home.specs_active / f"{worker_id}.json"


def write_spec(home: Home, spec: dict[str, Any], *, create: bool = False) -> bool:
    """Publish ``spec`` in ``active/``. Unless ``create``, only while it is still active:
    returns False (writing nothing) when the spec was moved to completed meanwhile."""
    cfg = load_system(home)
    path = active_path(home, spec["worker_id"])
    with lock_for(home.lock_path("specs")).held_for(cfg.lock_timeout):
        if not create and not path.exists():
            return False
        replace_json(path, spec, cfg.durability, pretty=True)
    return True


def complete_spec(home: Home, worker_id: str, exit_reason: str, now: float,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Move the active spec to ``completed/`` with ``completed_at`` and ``exit_reason``.

    The completed copy is published before the active one is unlinked, so a crash in
    between leaves both (doctor reports it; the completed copy wins)."""
    cfg = load_system(home)
    path = active_path(home, worker_id)
    with lock_for(home.lock_path("specs")).held_for(cfg.lock_timeout):
        try:
            spec = read_json(path)
        except FileNotFoundError:
            raise NotFound(f"no active worker spec {path}") from None
        spec.update(extra or {})
        spec.update({"state": "stopped", "completed_at": clock.iso(now),
                     "exit_reason": exit_reason, "current_task_id": None})
        replace_json(home.specs_completed / path.name, spec, cfg.durability, pretty=True)
        path.unlink()
    return dict(spec)


@dataclass
class SpecRead:
    path: Path
    spec: dict[str, Any] | None
    error: str | None = None


def read_specs(home: Home, completed: bool = False) -> list[SpecRead]:
    """Every spec in active/ (or completed/), sorted by file name; bad files carry ``error``."""
    folder = home.specs_completed if completed else home.specs_active
    out = []
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json")
                       and not n.startswith("."))
    except FileNotFoundError:
        return []
    for name in names:
        path = folder / name
        try:
            spec = read_json(path)
            if not isinstance(spec, dict) or "worker_id" not in spec:
                raise CorruptFileError(path, "not a worker spec object")
            out.append(SpecRead(path, spec))
        except FileNotFoundError:
            continue  # moved while we listed
        except CorruptFileError as exc:
            out.append(SpecRead(path, None, str(exc)))
    return out


def liveness(spec: dict[str, Any], now: float, heartbeat_timeout_s: float) -> str | None:
    """None when the worker may be alive; else the proof of its death, as a phrase.

    Fail closed: a worker on another host is judged only by its heartbeat.
    """
    try:
        beat = clock.parse_iso(spec.get("heartbeat_at") or "")
    except ValueError:
        beat = None
    if spec.get("hostname") == socket.gethostname() and isinstance(spec.get("pid"), int):
        try:
            started = process_start_time(spec["pid"])
        except psutil.AccessDenied:
            return None  # it exists and we may not look: no proof of anything
        if started is None:
            return f"pid {spec['pid']} is gone"
        recorded = spec.get("process_start_time")
        if isinstance(recorded, int | float) and abs(started - recorded) > 0.05:
            return f"pid {spec['pid']} was reused (start time {started:.2f} != {recorded:.2f})"
    if beat is not None and now - beat > heartbeat_timeout_s:
        return f"heartbeat is {now - beat:.1f}s old (limit {heartbeat_timeout_s}s)"
    return None


def orphan_proof(task: dict[str, Any], active: Container[str], dead: dict[str, str],
                 spec_completed: Callable[[str], bool], now: float,
                 heartbeat_timeout_s: float) -> str | None:
    """Why the running ``task``'s owner can no longer finish it, as a phrase; None when it
    may. The owner is proven dead (its proof in ``dead``, from :func:`liveness` or
    stronger), or it has no spec in ``active``: its spec is completed (it exited without
    finishing the task), or the task started more than ``heartbeat_timeout_s`` ago (a
    younger one may belong to a worker between its claim and its first spec write).
    Shared by the supervisor's reclaim and ``harness doctor``."""
    owner = task.get("worker_id")
    if owner in dead:
        return dead[owner]
    if owner in active:
        return None
    if owner and spec_completed(owner):
        return f"worker {owner} exited without finishing it (its spec is completed)"
    try:
        started: float | None = clock.parse_iso(task.get("started_at") or "")
    except ValueError:
        started = None
    if started is None or now - started > heartbeat_timeout_s:
        return f"worker {owner} has no active spec"
    return None
