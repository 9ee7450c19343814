"""The queue's policy, shared by every backend: pure functions, no I/O, no clock reads.

docs/coordination.md, "Claim order", "Retries", "Dependencies" and "Deduplication" state the
rules; each function here is the one implementation of one of them. A backend stores tasks
and applies these rules to them; it never re-implements one.

Tasks are the plain dicts of :mod:`coordination.tasks` (exactly ``TASK_FIELDS``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any

from .. import clock
from ..errors import InvalidTransition, NotFound
from ..redact import redact_record
from ..tasks import PRIORITY_RANK, HistoryRecord, Task, stored_record

ClaimKey = tuple[int, str, str]


def claim_key(task: Mapping[str, Any]) -> ClaimKey:
    """The claim order: highest priority first, then oldest ``created_at``, then task_id
    (ascending tuples; the smallest is claimed first)."""
    return (PRIORITY_RANK[task["priority"]], task.get("created_at") or "", task["task_id"])


def worker_type_of(task: Mapping[str, Any]) -> str:
    return str(task.get("worker_type") or "default")


def is_runnable(task: Mapping[str, Any], live: Container[str], now_iso: str,
                paused: Container[str], wanted: Container[str] | None = None) -> bool:
    """Whether ``task`` may be claimed now: queued, its ``not_before`` due (timestamps
    compare as text), no ``depends_on`` task still in ``live``, its worker type not in
    ``paused`` and, when ``wanted`` is given, in it."""
    if task["status"] != "queued":
        return False
    wtype = worker_type_of(task)
    if (wanted is not None and wtype not in wanted) or wtype in paused:
        return False
    nb = task.get("not_before")
    if nb is not None and nb > now_iso:
        return False
    return not any(dep in live for dep in task.get("depends_on") or ())


def backoff_delay(attempts: int, cfg: Mapping[str, Any],
                  uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Retry delay after ``attempts`` attempts: exponential from ``retry_backoff_base_s``,
    with ``retry_jitter`` (a fraction), capped last by ``retry_backoff_max_s``, so no retry
    is ever scheduled beyond the cap."""
    base = float(cfg["retry_backoff_base_s"])
    cap = float(cfg["retry_backoff_max_s"])
    delay = min(base * (2 ** max(attempts - 1, 0)), cap)
    jitter = float(cfg["retry_jitter"])
    return float(min(delay * uniform(1 - jitter, 1 + jitter), cap))


def check_running(task: Mapping[str, Any] | None, task_id: str,
                  worker_id: str | None, lease: str | None = None) -> None:
    """The transition rule for complete / fail / release: the task is live, ``running`` and
    (unless ``worker_id`` is None, a reclaim without owner check) held by ``worker_id``,
    and, when ``lease`` is given, still under that claim (:func:`lease_token`). Raises
    NotFound / InvalidTransition ("lease lost"); a worker that lost its task can never
    commit."""
    if task is None:
        raise NotFound(f"task {task_id} is not live (see `harness task show {task_id}`)")
    if task["status"] != "running":
        raise InvalidTransition(f"task {task_id} is {task['status']}, not running")
    if worker_id is not None and task.get("worker_id") != worker_id:
        raise InvalidTransition(f"task {task_id} is held by {task.get('worker_id')}, "
                                f"not {worker_id}")
    if lease is not None and lease_token(task) != lease:
        raise InvalidTransition(f"task {task_id}: lease lost (the claim is now "
                                f"{lease_token(task)}, not {lease})")


def lease_token(task: Mapping[str, Any]) -> str:
    """The fencing token of a running task's current claim: ``lease_token``, fresh for
    every claim (:func:`claimed`), so an old holder's token never matches again. A task
    claimed before leases existed has none: its worker and attempt number stand in."""
    token = task.get("lease_token")
    if token:
        return str(token)
    return f"{task.get('worker_id')}:{task.get('attempts')}"


def lease_expired(task: Mapping[str, Any], now_iso: str) -> bool:
    """Whether ``task`` is running under a lease that ended before ``now_iso`` (timestamps
    compare as text). A running task with no ``lease_until`` (claimed before leases
    existed) has not expired: fail closed, only a proof of death reclaims it."""
    until = task.get("lease_until")
    return task.get("status") == "running" and until is not None and until < now_iso


def claimed(task: Task, worker_id: str, now_iso: str, *, host_id: str | None = None,
            token: str | None = None, lease_until: str | None = None) -> None:
    """Apply a claim to a queued task (in place): running under ``worker_id`` on
    ``host_id``, one more attempt, a fresh lease ``token`` valid until ``lease_until``."""
    task.update({"status": "running", "worker_id": worker_id, "started_at": now_iso,
                 "completed_at": None, "attempts": task["attempts"] + 1, "exit_code": None,
                 "host_id": host_id, "lease_token": token, "lease_until": lease_until})


def unleased(task: Task) -> None:
    """A task back in the queue holds no claim (in place): no worker, host or lease."""
    task.update({"worker_id": None, "host_id": None, "lease_token": None,
                 "lease_until": None})


def with_status(task: Task, status: str) -> Task:
    """A copy of ``task`` with another ``status`` (the live task is left as it is)."""
    copy = task.copy()
    copy["status"] = status
    return copy


def history_record(task: Task, *, final: bool, outcome: str, recorded_at: str,
                   result: dict[str, Any] | None = None) -> HistoryRecord:
    """The history line for ``task`` as it now is. History is a record for people: secrets
    in ``last_error``, ``description``, the ``command`` argv and the result are masked
    (:func:`~coordination.redact.redact_record`; the live task and its dead letter keep the
    exact text, which a retry needs)."""
    record: HistoryRecord = {**task, "final": final, "outcome": outcome,
                             "recorded_at": recorded_at, "result": result}
    # redact_record works on any record shape and keeps every key: the edge back to the type.
    return stored_record(redact_record(dict(record)))


def cascades(status: str) -> bool:
    """Whether a task ending ``status`` cancels the queued tasks that depend on it (every
    ending but ``completed``)."""
    return status != "completed"


def dependents_to_cancel(finished_id: str, status: str,
                         waiters: Iterable[Mapping[str, Any]]) -> list[str]:
    """Queued tasks that must be cancelled because ``finished_id`` ended ``status``: every
    queued waiter that names it, unless it completed (the cascade then goes on from each
    cancelled one, which the caller does by calling this again for it)."""
    if not cascades(status):
        return []
    return [w["task_id"] for w in waiters
            if w["status"] == "queued" and finished_id in (w.get("depends_on") or ())]


def find_cycle(start: Iterable[str], deps_of: Callable[[str], Iterable[str] | None]) -> list[str]:
    """A dependency cycle reachable from the ids in ``start``, as a list of ids ending with
    its first node again ([] when none). ``deps_of`` returns a live task's ``depends_on`` or
    None for an id that is not live (a finished dependency closes no cycle). Only new tasks
    can close a cycle, so admission starts from them: the cost is what they reach."""
    state: dict[str, int] = {}
    for root in start:
        if state.get(root) or deps_of(root) is None:
            continue
        stack: list[tuple[str, Any]] = [(root, iter(deps_of(root) or ()))]
        path = [root]
        state[root] = 1
        while stack:
            node, deps = stack[-1]
            for dep in deps:
                dep_deps = deps_of(dep)
                if dep_deps is None:
                    continue
                if state.get(dep) == 1:
                    return [*path[path.index(dep):], dep]
                if not state.get(dep):
                    state[dep] = 1
                    path.append(dep)
                    stack.append((dep, iter(dep_deps)))
                    break
            else:
                state[node] = 2
                stack.pop()
                path.pop()
    return []


def finish_fields(task: Task, status: str, now_iso: str) -> None:
    """Mark ``task`` terminal (in place)."""
    task.update({"status": status, "completed_at": now_iso, "updated_at": now_iso})


def requeued_from_dead(task: Task, *, reset_attempts: bool) -> None:
    """A dead letter made a fresh queued task again (in place)."""
    task.update({"status": "queued", "not_before": None, "started_at": None,
                 "completed_at": None, "cancel_requested": False, "exit_code": None})
    unleased(task)
    if reset_attempts:
        task["attempts"] = 0


def retry_at(now: float, delay: float) -> str:
    return clock.iso(now + delay)
