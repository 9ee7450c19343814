"""Death proof, fencing and reclaim: a running task whose worker is proven dead goes back.

A running task whose worker is proven dead (:func:`death_proof`: pid gone, zombie, pid
reused, or heartbeat older than ``heartbeat_timeout_s``) is reclaimed: the attempt counts,
so it is queued again or dead-lettered (the queue's ``reclaim``, checked against the owner
under the queue lock). ``task_reclaimed`` is emitted after the commit, with the proof. The
dead worker's spec moves to completed with exit_reason ``crashed``, and processes its task
left on this host are killed. A dead worker whose process still exists here (frozen,
wedged) is fenced first (:func:`fence_worker`: SIGKILL, with its tasks' process groups).
:func:`reclaim_pass` is what ``harness supervisor reclaim`` runs and each pass starts with.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Mapping
from typing import Any

import psutil

from coordination import clock
from coordination.config import load_system
from coordination.errors import HarnessError, NotFound
from coordination.hosts import host_id
from coordination.paths import Home
from coordination.queue import QueueBackend, open_queue
from coordination.queue.rules import lease_token
from coordination.specs import (
    WorkerSpec,
    complete_spec,
    is_completed,
    liveness,
    orphan_proof,
    process_start_time,
    read_specs,
)
from coordination.tasks import Task

from .actuators import kill_orphaned_tasks
from .state import _emit, log


def _same_host(spec: Mapping[str, Any]) -> bool:
    return spec.get("hostname") == socket.gethostname() and isinstance(spec.get("pid"), int)


def _exit_proof(pid: int) -> str | None:
    """Whether ``pid`` has exited: a zombie (not yet reaped by its parent), or gone now."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return f"pid {pid} is gone"
    except (psutil.Error, OSError):
        return None
    if status == psutil.STATUS_ZOMBIE:
        return f"pid {pid} has exited (zombie, not yet reaped)"
    return None


def death_proof(spec: Mapping[str, Any], now: float, heartbeat_timeout_s: float) -> str | None:
    """:func:`coordination.specs.liveness`, plus: a zombie (exited, not yet reaped by its
    parent) is dead too; liveness reads its start time and would call it alive. The second
    look also catches a process reaped between liveness's look and ours."""
    proof = liveness(dict(spec), now, heartbeat_timeout_s)
    if proof is None and _same_host(spec):
        proof = _exit_proof(int(spec["pid"]))
    return proof


def _pid_matches(spec: Mapping[str, Any]) -> bool:
    """Whether the spec's pid is still the worker's process (same start time)."""
    if not _same_host(spec):
        return False
    started = process_start_time(int(spec["pid"]))
    recorded = spec.get("process_start_time")
    return started is not None and isinstance(recorded, int | float) \
        and abs(started - recorded) <= 0.05


def _task_groups(pid: int) -> list[int]:
    """Process groups led by children of ``pid`` in their own group: a worker's tasks."""
    groups = []
    try:
        children = psutil.Process(pid).children()
    except (psutil.Error, OSError):
        return []
    for child in children:
        with contextlib.suppress(OSError):
            if os.getpgid(child.pid) == child.pid:
                groups.append(child.pid)
    return groups


def fence_worker(spec: Mapping[str, Any]) -> bool:
    """SIGKILL a worker on this host and its tasks' process groups; False when its pid is
    not (or no longer) the worker's process."""
    if not _pid_matches(spec):
        return False
    pid = int(spec["pid"])
    groups = _task_groups(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return True


def reclaim_task(home: Home, queue: QueueBackend, task: Task, proof: str,
                 now: float, *, cause: str = "dead_worker") -> dict[str, Any] | None:
    """Take a running task back from its dead owner (the attempt counts): queued again, or
    dead-lettered once attempts are spent. Checked against the owner and the claim (lease
    token) in the queue's transaction, so a task completed or re-claimed meanwhile is left
    alone (None); with cause ``lease_expired`` also one whose lease a heartbeat extended
    meanwhile. Emits ``task_reclaimed`` after the commit."""
    owner = task.get("worker_id")
    if not isinstance(owner, str):
        return None
    after = queue.reclaim(task["task_id"], reason=proof, worker_id=owner,
                          lease=lease_token(task), expired_only=cause == "lease_expired",
                          now=now)
    if after is None:
        return None
    requeued = after.get("status") == "queued"
    _emit(home, "task_reclaimed",
          f"reclaimed from {owner}: {proof}; "
          + ("queued again" if requeued else f"now {after.get('status')}"),
          severity="warning", task_id=task["task_id"], worker_id=owner,
          correlation_id=task.get("correlation_id"), now=now,
          data={"proof": proof, "cause": cause, "attempt": after.get("attempts"),
                "max_attempts": after.get("max_attempts"), "requeued": requeued,
                "status": after.get("status")})
    return {"task_id": task["task_id"], "worker_id": owner, "proof": proof, "cause": cause,
            "attempt": after.get("attempts"), "status": after.get("status")}


def reclaim_pass(home: Home, now: float, *, queue: QueueBackend | None = None,
                 dry_run: bool = False, heartbeat_timeout_s: float | None = None,
                 specs: list[WorkerSpec] | None = None,
                 kill_orphans: bool = True, host: str | None = None) -> dict[str, Any]:
    """One orphan-reclaim pass (what ``harness supervisor reclaim`` runs).

    Tasks claimed on this host (``host_id`` is ``host``, default
    :func:`coordination.hosts.host_id`, or unknown) are judged by this host's worker specs
    (the fast proofs: pid gone, zombie, reused, heartbeat). A task of any host whose lease
    expired (:meth:`QueueBackend.expired_leases`) is reclaimed too, with the expiry checked
    again in the transaction (cause ``lease_expired``); another host's task whose lease
    holds is never touched, whatever this host's specs say.

    Returns ``{"reclaimed": [...], "dead_workers": [...], "orphans_killed": [...],
    "fenced": [...]}``; with ``dry_run`` nothing is changed and the lists say what would be.
    A dead worker whose process still exists on this host (heartbeat proof: frozen or
    wedged) is fenced first (SIGKILL, with its tasks' process groups); ``kill_orphans``
    False skips fencing and the orphan kill.
    """
    queue = queue or open_queue(home)
    hb = float(heartbeat_timeout_s if heartbeat_timeout_s is not None
               else load_system(home)["heartbeat_timeout_s"])
    if specs is None:
        specs = [s.spec for s in read_specs(home) if s.spec is not None]
    active = {str(s["worker_id"]): s for s in specs}
    dead: dict[str, str] = {}
    for worker_id, spec in active.items():
        proof = death_proof(spec, now, hb)
        if proof is not None:
            dead[worker_id] = proof
    out: dict[str, Any] = {"reclaimed": [], "dead_workers": [], "orphans_killed": [],
                           "fenced": []}
    if not dry_run and kill_orphans:
        # Declared dead on its heartbeat but its process still exists (frozen, wedged):
        # SIGKILL it first, so it cannot finish the task beside the retry and releases any
        # lock it holds (a worker stopped inside write_spec would block complete_spec).
        for worker_id in sorted(dead):
            if fence_worker(active[worker_id]):
                out["fenced"].append(worker_id)
    own = host or host_id()
    judged: list[tuple[Task, str, str]] = []
    leases: list[str] = []
    for task in queue.live_tasks(status="running"):
        if task.get("lease_until"):
            leases.append(str(task["lease_until"]))
        if task.get("host_id") not in (None, own):
            continue  # another host's: its lease alone tells (below)
        proof = orphan_proof(task, active, dead,
                             lambda w: is_completed(home, w), now, hb)
        if proof is not None:
            judged.append((task, proof, "dead_worker"))
    seen = {t["task_id"] for t, _, _ in judged}
    # The next instant a lease may expire: the supervisor's loop wakes then (a timer, not
    # a shorter tick), so a dead host's task is reclaimed right as its lease ends.
    later = [until for until in leases if until >= clock.iso(now)]
    out["next_lease_expiry"] = min(later) if later else None
    for task in queue.expired_leases(now):
        if task["task_id"] not in seen:
            judged.append((task, f"lease expired at {task.get('lease_until')} (worker "
                           f"{task.get('worker_id')} on host {task.get('host_id')})",
                           "lease_expired"))
    for task, proof, cause in judged:
        if dry_run:
            out["reclaimed"].append({"task_id": task["task_id"],
                                     "worker_id": task.get("worker_id"), "proof": proof,
                                     "cause": cause, "attempt": task["attempts"],
                                     "status": "would reclaim"})
            continue
        done = reclaim_task(home, queue, task, proof, now, cause=cause)
        if done is not None:
            out["reclaimed"].append(done)
    for worker_id, proof in sorted(dead.items()):
        spec = active[worker_id]
        item = {"worker_id": worker_id, "instance": spec.get("instance"),
                "pid": spec.get("pid"), "proof": proof,
                "task_id": spec.get("current_task_id"), "completed": False}
        out["dead_workers"].append(item)
        if dry_run:
            continue
        if kill_orphans and spec.get("hostname") == socket.gethostname():
            out["orphans_killed"] += kill_orphaned_tasks(worker_id)
        with contextlib.suppress(HarnessError):  # else doctor reports the row later
            queue.forget_worker(worker_id)
        try:
            complete_spec(home, worker_id, "crashed", now, extra={"crash_proof": proof})
            item["completed"] = True
        except NotFound:
            continue  # the worker deregistered itself meanwhile
        except HarnessError as exc:
            log.error("cannot complete spec %s: %s", worker_id, exc)
            continue
        _emit(home, "worker_crashed", f"worker {worker_id} is dead: {proof}",
              severity="warning", worker_id=worker_id, now=now,
              data={"proof": proof, "instance": spec.get("instance"), "pid": spec.get("pid"),
                    "task_id": spec.get("current_task_id")})
    return out
