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
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import psutil

from . import clock
from .config import load_system
from .errors import CorruptFileError, NotFound
from .ids import is_valid_id
from .locks import lock_for
from .paths import Home
from .store import move_aside, read_json, replace_json
from .tasks import Task

SPEC_STATES = ("starting", "idle", "busy", "draining", "stopping", "stopped")
EXIT_REASONS = ("idle", "max_tasks", "max_uptime", "drained", "signal", "error", "crashed",
                "once")


class _SpecFields(TypedDict):
    """The keys every worker spec has (see :class:`WorkerSpec`)."""

    version: int
    worker_id: str
    instance: str
    pid: int
    process_start_time: float | None
    hostname: str
    unit: str | None
    types: list[str] | None
    worker_type: str
    state: str
    created_at: str
    started_at: str
    heartbeat_at: str
    progress: float
    current_task_id: str | None
    task_started_at: str | None
    tasks_done: int
    tasks_failed: int
    tokens_used: int
    completed_at: str | None
    exit_reason: str | None


# total=False rather than NotRequired[]: with postponed annotations, Python 3.11's
# TypedDict cannot see NotRequired at run time (__optional_keys__ would miss it).
class WorkerSpec(_SpecFields, total=False):
    """A worker spec file (coordination/schemas/worker-spec.schema.json): every key
    required except ``crash_proof``. ``state`` and ``exit_reason`` are plain ``str``;
    :data:`SPEC_STATES` / :data:`EXIT_REASONS` and :func:`check_spec` hold the values."""

    crash_proof: str


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
             unit: str | None = None, pid: int | None = None) -> WorkerSpec:
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
    """The active spec of ``worker_id`` (UsageError when it is not a valid worker id)."""
    return home.spec_file(worker_id)


# The worker holds a plain ``{}`` until it registers (daemons/worker/state.py), hence the
# union; every spec it writes was built by :func:`new_spec`.
def write_spec(home: Home, spec: WorkerSpec | dict[str, Any], *, create: bool = False) -> bool:
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_spec(spec: Any, stem: str | None = None) -> list[str]:
    """What is wrong with a worker spec as read from a file ([] when it is usable).

    A spec is usable only when liveness can be proven from it one day: a valid
    ``worker_id`` (equal to the file name's ``stem``), a positive integer ``pid``, a
    non-empty ``hostname``; and when the fields other code reads have their types
    (``current_task_id`` null or a task id, ``heartbeat_at`` a string, counters integers).
    An unusable spec is reported (status, doctor), never counted as a worker, and
    quarantined by ``harness doctor --repair``."""
    if not isinstance(spec, dict):
        return ["not a JSON object"]
    problems = []
    worker_id = spec.get("worker_id")
    if not is_valid_id(worker_id):
        problems.append(f"worker_id {worker_id!r} is not a valid worker id")
    elif stem is not None and worker_id != stem:
        problems.append(f"worker_id {worker_id!r} does not match the file name")
    pid = spec.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        problems.append(f"pid {pid!r} is not a positive integer")
    if not isinstance(spec.get("hostname"), str) or not spec.get("hostname"):
        problems.append("hostname is missing")
    current = spec.get("current_task_id")
    if current is not None and not is_valid_id(current):
        problems.append(f"current_task_id {current!r} is not null or a task id")
    for key in ("heartbeat_at", "started_at", "task_started_at", "state", "instance"):
        if spec.get(key) is not None and not isinstance(spec.get(key), str):
            problems.append(f"{key} must be a string")
    for key in ("tasks_done", "tasks_failed", "tokens_used"):
        if spec.get(key) is not None and not _is_int(spec.get(key)):
            problems.append(f"{key} must be an integer")
    start = spec.get("process_start_time")
    if start is not None and (not isinstance(start, int | float) or isinstance(start, bool)):
        problems.append("process_start_time must be a number or null")
    if spec.get("types") is not None and not (
            isinstance(spec["types"], list) and all(isinstance(t, str) for t in spec["types"])):
        problems.append("types must be null or a list of strings")
    return problems


def is_completed(home: Home, worker_id: Any) -> bool:
    """Whether ``worker_id`` has a completed spec (False for a string that is no worker id:
    such an id names no file)."""
    return is_valid_id(worker_id) and home.spec_file(worker_id, completed=True).exists()


def quarantine_unusable(home: Home, now: float) -> list[tuple[Path, str]]:
    """Move every active spec that cannot be used (:func:`check_spec`, or unparseable) to
    ``quarantine/``, under the specs lock (re-checked there: a spec fixed meanwhile
    stays). Returns ``(quarantined path, problem)`` pairs. Such a spec counts as no worker
    and its running task is reclaimed as having no active spec."""
    moved: list[tuple[Path, str]] = []
    bad = [r for r in read_specs(home) if r.spec is None]
    if not bad:
        return moved
    cfg = load_system(home)
    with lock_for(home.lock_path("specs")).held_for(cfg.lock_timeout):
        for item in bad:
            again = [r for r in read_specs(home) if r.path == item.path]
            if again and again[0].spec is None:
                moved.append((move_aside(item.path, home.quarantine, clock.compact(now)),
                               again[0].error or "unusable"))
    return moved


@dataclass
class SpecRead:
    path: Path
    spec: WorkerSpec | None
    error: str | None = None


def read_specs(home: Home, completed: bool = False) -> list[SpecRead]:
    """Every spec in active/ (or completed/), sorted by file name; an unparseable file or
    an unusable spec (:func:`check_spec`) carries ``error`` and no ``spec``."""
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
            problems = check_spec(spec, path.stem)
            if problems:
                raise CorruptFileError(path, "invalid worker spec: " + "; ".join(problems))
            out.append(SpecRead(path, cast(WorkerSpec, spec)))  # checked just above
        except FileNotFoundError:
            continue  # moved while we listed
        except CorruptFileError as exc:
            out.append(SpecRead(path, None, str(exc)))
    return out


def liveness(spec: Mapping[str, Any], now: float, heartbeat_timeout_s: float) -> str | None:
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


def orphan_proof(task: Task, active: Container[str], dead: dict[str, str],
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
