"""The queue's operations as changes to one open transaction, shared by every backend.

A backend runs each of these inside its own transaction (the file backend under its lock,
the postgres backend in a database transaction); what the operation does to the tasks,
history, dead letters and events is written once, here, from :mod:`.rules`. A backend's
transaction object offers what :class:`OpsTxn` names.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, overload

from .. import clock
from ..config import load_system, load_worker_types
from ..errors import InvalidTransition, NotFound, UsageError
from ..events import Event, make_event
from ..hosts import host_id as this_host_id
from ..paths import Home
from ..tasks import HistoryRecord, Task, check_priority, new_task, stored_task
from . import admission, rules
from .admission import AdmitTxn
from .contract import ChangeFeed, EnqueueResult

#: The ``source`` of every event the queue emits.
SOURCE = "queue"


def queue_event(event_type: str, message: str, task: Mapping[str, Any] | None, *,
                severity: str, now: float, data: dict[str, Any]) -> Event:
    """An event of the queue about ``task`` (its id, worker and correlation id), as every
    backend's transaction records it (appended after the commit)."""
    return make_event(event_type, severity=severity, source=SOURCE, message=message,
                      task_id=task["task_id"] if task else None,
                      worker_id=task.get("worker_id") if task else None,
                      correlation_id=task.get("correlation_id") if task else None,
                      data=data, now=now)


class OpsTxn(AdmitTxn, Protocol):
    """An open transaction, as the operations see it."""

    now_iso: str
    history: list[HistoryRecord]
    dead_letters: list[Task]

    def lock(self, task_id: str) -> Task | None:
        """The live task, held by this transaction until it ends (None: not live)."""
    def waiters(self, task_id: str) -> list[Task]:
        """Live tasks whose depends_on names ``task_id``."""
    def remove(self, task_id: str, status: str | None) -> None: ...


def validate_batch(home: Home, requests: list[dict[str, Any]], now: float) -> list[Task]:
    """Every request of an enqueue made a task (UsageError naming ``request[i]`` and the
    field at the first bad one, before anything is queued)."""
    cfg = load_system(home)
    types = load_worker_types(home)
    validated = []
    seen: set[str] = set()
    for index, request in enumerate(requests):
        where = "request" if len(requests) == 1 else f"request[{index}]"
        task = new_task(dict(request), worker_types=types, limits=cfg.values, now=now,
                        where=where)
        if task["task_id"] in seen:
            raise UsageError(f"{where}: duplicate task_id {task['task_id']} in the batch")
        seen.add(task["task_id"])
        validated.append(task)
    return validated


def resolve(txn: OpsTxn, task_id: str) -> EnqueueResult:
    """What became of a request admitted in ``txn``: its task, or the dedup holder."""
    task = txn.get(task_id)
    if task is not None:
        return EnqueueResult(task.copy(), True)
    holder = txn.dedup.get(task_id)
    if holder is not None:
        held = txn.get(holder)
        # The holder vanished in the same transaction: only its id is known.
        return EnqueueResult(held.copy() if held is not None
                             else stored_task({"task_id": holder}), False)
    raise NotFound(f"task {task_id} vanished during its own enqueue")


@dataclass(frozen=True)
class ClaimLease:
    """What a claim records besides the worker: the claiming process's host and how long
    the lease lasts (system.json ``heartbeat_timeout_s``)."""

    host_id: str
    seconds: float


def claim_lease(home: Home) -> ClaimLease:
    """The lease a claim made by this process takes (:mod:`coordination.hosts`)."""
    return ClaimLease(this_host_id(), float(load_system(home).values["heartbeat_timeout_s"]))


def take(txn: OpsTxn, task: Task, worker_id: str, lease: ClaimLease) -> Task:
    """Claim ``task`` (chosen by the backend in claim order) for ``worker_id``: a fresh
    lease token, valid for ``lease.seconds`` unless a heartbeat extends it."""
    rules.claimed(task, worker_id, txn.now_iso, host_id=lease.host_id,
                  token=f"{task['attempts'] + 1}-{secrets.token_hex(8)}",
                  lease_until=clock.iso(txn.now + lease.seconds))
    txn.put(task)
    txn.event("task_claimed", f"attempt {task['attempts']}/{task['max_attempts']}",
              task, attempt=task["attempts"])
    return task.copy()


def running(txn: OpsTxn, task_id: str, worker_id: str | None,
            lease: str | None = None) -> Task:
    task = txn.lock(task_id)
    rules.check_running(task, task_id, worker_id, lease)
    assert task is not None
    return task


def finish(txn: OpsTxn, task: Task, status: str, outcome: str,
           result: dict[str, Any] | None = None) -> None:
    """Move a task out of the live queue into history (and dead letters if failed),
    cancelling queued tasks that depend on it unless it completed."""
    rules.finish_fields(task, status, txn.now_iso)
    txn.history.append(rules.history_record(task, final=True, outcome=outcome,
                                            recorded_at=txn.now_iso, result=result))
    if status == "failed":
        txn.dead_letters.append(task.copy())
    waiters = txn.waiters(task["task_id"]) if rules.cascades(status) else []
    txn.remove(task["task_id"], status)
    for other_id in rules.dependents_to_cancel(task["task_id"], status, waiters):
        other = txn.lock(other_id)
        if other is None:
            continue
        reason = f"dependency {task['task_id']} ended {status}"
        other["last_error"] = reason
        finish(txn, other, "cancelled", "dependency_failed")
        txn.event("task_cancelled", reason, other, severity="warning")


def complete(txn: OpsTxn, task_id: str, worker_id: str, exit_code: int,
             result: dict[str, Any] | None, lease: str | None) -> Task:
    task = running(txn, task_id, worker_id, lease)
    task.update({"exit_code": exit_code, "last_error": None})
    finish(txn, task, "completed", "completed", result)
    txn.event("task_completed", f"completed on attempt {task['attempts']}", task,
              exit_code=exit_code)
    return task.copy()


def fail(txn: OpsTxn, task_id: str, worker_id: str | None, *, error: str,
         exit_code: int | None, retry: bool, result: dict[str, Any] | None, outcome: str,
         lease: str | None, cfg: Mapping[str, Any]) -> Task:
    """A failed attempt: retried after rules.backoff_delay while attempts remain, else
    failed with a dead letter (cancelled when a cancel was requested)."""
    task = running(txn, task_id, worker_id, lease)
    task.update({"exit_code": exit_code, "last_error": error[:4096]})
    if retry and task["attempts"] < task["max_attempts"] and not task.get("cancel_requested"):
        txn.history.append(rules.history_record(
            rules.with_status(task, "failed"), final=False, outcome=outcome,
            recorded_at=txn.now_iso, result=result))
        delay = rules.backoff_delay(task["attempts"], cfg)
        task.update({"status": "queued", "not_before": rules.retry_at(txn.now, delay)})
        rules.unleased(task)
        txn.put(task)
        txn.event("task_retry_scheduled", f"attempt {task['attempts']} {outcome}: "
                  f"{error[:200]}; retry in {delay:.1f}s", task, severity="warning",
                  attempt=task["attempts"], delay_s=round(delay, 3), outcome=outcome)
    elif task.get("cancel_requested"):
        finish(txn, task, "cancelled", "cancelled", result)
        txn.event("task_cancelled", "cancelled while running", task)
    else:
        finish(txn, task, "failed", outcome, result)
        txn.event("task_failed", f"failed after {task['attempts']} attempt(s): "
                  f"{error[:200]}", task, severity="error", outcome=outcome)
        txn.event("task_dead_lettered", "moved to dead letters", task, severity="warning")
    return task.copy()


def release(txn: OpsTxn, task_id: str, worker_id: str, reason: str,
            lease: str | None) -> Task:
    """Hand a running task back without spending an attempt."""
    task = running(txn, task_id, worker_id, lease)
    if task.get("cancel_requested"):
        finish(txn, task, "cancelled", "cancelled")
        txn.event("task_cancelled", "cancelled while running", task)
        return task.copy()
    txn.history.append(rules.history_record(
        rules.with_status(task, "queued"), final=False, outcome="released",
        recorded_at=txn.now_iso))
    task.update({"status": "queued", "attempts": task["attempts"] - 1,
                 "last_error": reason})
    rules.unleased(task)
    txn.put(task)
    txn.event("task_released", reason, task)
    return task.copy()


def cancel(txn: OpsTxn, task_id: str, reason: str) -> Task:
    """Queued: cancelled at once. Running: cancel_requested (its worker stops it)."""
    task = txn.lock(task_id)
    if task is None:
        raise NotFound(f"task {task_id} is not live; only queued or running tasks "
                       "can be cancelled")
    if task["status"] == "queued":
        task["last_error"] = reason
        finish(txn, task, "cancelled", "cancelled")
        txn.event("task_cancelled", reason, task)
    elif not task.get("cancel_requested"):
        task["cancel_requested"] = True
        txn.put(task)
        txn.event("task_cancel_requested", reason, task)
    return task.copy()


def reprioritize(txn: OpsTxn, task_id: str, priority: str) -> Task:
    task = txn.lock(task_id)
    if task is None:
        raise NotFound(f"task {task_id} is not live")
    old = task["priority"]
    if old != priority:
        task["priority"] = priority
        txn.put(task)
        txn.event("task_reprioritized", f"{old} -> {priority}", task, old=old, new=priority)
    return task.copy()


def heartbeat(txn: OpsTxn, worker_id: str, leases: Mapping[str, str],
              seconds: float) -> dict[str, str]:
    """Extend the lease of each task in ``leases`` (task id -> its lease token) held by
    ``worker_id`` to ``seconds`` from now; returns task id -> the new ``lease_until``.
    All or nothing: NotFound / InvalidTransition ("lease lost") for the first task that is
    not running under that claim any more, and then no lease is extended."""
    out: dict[str, str] = {}
    until = clock.iso(txn.now + seconds)
    for task_id in sorted(leases):
        task = running(txn, task_id, worker_id, leases[task_id])
        task["lease_until"] = until
        txn.put(task, touch=False)  # updated_at stays the last change of state
        out[task_id] = until
    return out


def reclaim(txn: OpsTxn, task_id: str, *, reason: str, worker_id: str | None,
            lease: str | None, expired_only: bool, cfg: Mapping[str, Any]) -> Task | None:
    """Take a running task back (the attempt counts) as a ``fail`` with outcome
    ``reclaimed``. With ``worker_id`` (and ``lease``) the owner (and claim) is checked in
    the transaction and None is returned when the task is not running under it any more;
    with ``expired_only`` also when its lease has not expired (a heartbeat came first)."""
    if worker_id is not None:
        try:
            task = running(txn, task_id, worker_id, lease)
        except (NotFound, InvalidTransition):
            return None
        if expired_only and not rules.lease_expired(task, txn.now_iso):
            return None
    return fail(txn, task_id, worker_id, error=f"reclaimed: {reason}", exit_code=None,
                retry=True, result=None, outcome="reclaimed", lease=lease, cfg=cfg)


class CallbackFeed:
    """A :class:`~.contract.ChangeFeed` fed by an ``on_change`` callback: each call writes
    a byte to a pipe whose read end is the descriptor."""

    def __init__(self, on_change: Callable[[Callable[[], None]], Callable[[], None]]) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._stop = on_change(self._poke)
        except BaseException:
            os.close(self._r)
            os.close(self._w)
            raise

    def _poke(self) -> None:
        fd = self._w
        if fd >= 0:  # else closed: never write to a number that may be reused
            with contextlib.suppress(BlockingIOError, OSError):  # full: already readable
                os.write(fd, b"x")

    def fileno(self) -> int:
        return self._r

    def drain(self) -> bool:
        seen = False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 4096):
                seen = True
        return seen

    def close(self) -> None:
        self._stop()
        write_end, self._w = self._w, -1
        os.close(write_end)
        os.close(self._r)


class _Prepare:
    """A claim's ``prepare`` hook as the backend runs it (``after_write``): an exception
    is kept until the transaction has returned, so the commit's events are out first."""

    def __init__(self, prepare: Callable[[Task], None] | None) -> None:
        self.prepare = prepare
        self.error: BaseException | None = None

    def claimed(self, task: Task | None) -> None:
        if self.prepare is not None and task is not None:
            try:
                self.prepare(task)
            except BaseException as exc:
                self.error = exc

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


class Operations:
    """The port's producer, worker and operator methods, written once over the backend's
    transaction. A backend provides :meth:`_transaction` (run ``body(txn)`` in one
    transaction, commit, then side effects), :meth:`_claim_in` (take the best runnable
    task in ``txn``, in rules.claim_key order), :meth:`_paused` (the paused worker types
    now), :meth:`_check_backpressure`, :meth:`_completed_ids` (for admission) and
    :meth:`on_change` (for :meth:`wait`)."""

    home: Home

    @property
    def view_file(self) -> Path:
        """The jq view every backend keeps in the home (docs/coordination.md)."""
        return self.home.queue_file

    # -- what a backend provides -----------------------------------------------------
    def _transaction(self, now: float | None, body: Callable[[Any], Any], *,
                     drain: bool = True,
                     events_out: list[Event] | None = None,
                     after_write: Callable[[Any], None] | None = None) -> Any:
        """Run ``body(txn)`` in one transaction and commit; ``after_write(out)`` runs once
        the commit is written and, at the latest, before the events and the return (the
        file backend: before its fdatasync)."""
        raise NotImplementedError

    def _claim_in(self, txn: Any, worker_id: str, wanted: set[str] | None,
                  paused: set[str], lease: ClaimLease) -> Task | None:
        raise NotImplementedError

    def expired_leases(self, now: float | None = None) -> list[Task]:
        raise NotImplementedError

    def _register_worker(self, txn: Any, worker_id: str) -> None:
        """Record ``worker_id``'s heartbeat in the backend's worker registry, if it keeps
        one (postgres: the ``workers`` table); the file backend's registry is the worker
        specs, which the worker writes itself."""

    #: Whether :meth:`heartbeat` with no leases still has something to record.
    _keeps_registry = False

    def forget_worker(self, worker_id: str) -> None:
        """Drop ``worker_id`` from the worker registry (see the port); nothing to do
        without one."""

    def _paused(self, now: float) -> set[str]:
        raise NotImplementedError

    def _check_backpressure(self, limit: int, adding: int) -> None:
        raise NotImplementedError

    def _completed_ids(self, wanted: set[str]) -> set[str]:
        raise NotImplementedError

    # -- producers -------------------------------------------------------------------
    def enqueue(self, request: dict[str, Any], *, force: bool = False,
                now: float | None = None) -> EnqueueResult:
        """Add one task and return once it is durable (see the port)."""
        return self.enqueue_batch([request], force=force, now=now)[0]

    def enqueue_batch(self, requests: list[dict[str, Any]], *, force: bool = False,
                      now: float | None = None) -> list[EnqueueResult]:
        """Add many tasks in one commit; all requests are validated before any is queued."""
        ts = clock.now() if now is None else now
        if not force:
            self._check_backpressure(load_system(self.home).values["max_queue_depth"],
                                     len(requests))
        validated = validate_batch(self.home, requests, ts)

        def body(txn: Any) -> list[EnqueueResult]:
            admission.admit(self.home, txn, [(t.copy(), None) for t in validated],
                            self._completed_ids)
            return [resolve(txn, t["task_id"]) for t in validated]
        results: list[EnqueueResult] = self._transaction(ts, body)
        return results

    def submit(self, request: dict[str, Any], *, now: float | None = None,
               durable: bool = False) -> str:
        """Validate ``request`` and publish it in this host's inbox without touching the
        queue; the next transaction of any process here admits it. ``durable`` fsyncs the
        inbox file (when nothing else acknowledges it)."""
        return admission.submit(self.home, request, now=clock.now() if now is None else now,
                                durable=durable)

    # -- workers ---------------------------------------------------------------------
    def claim(self, worker_id: str, *, types: Iterable[str] | None = None,
              now: float | None = None,
              events_out: list[Event] | None = None,
              prepare: Callable[[Task], None] | None = None) -> Task | None:
        """Atomically take the best runnable task for ``worker_id`` (see the port)."""
        wanted = set(types) if types is not None else None
        ts = clock.now() if now is None else now
        paused = self._paused(ts)
        lease = claim_lease(self.home)

        def body(txn: Any) -> Task | None:
            return self._claim_in(txn, worker_id, wanted, paused, lease)

        prepared = _Prepare(prepare)
        out: Task | None = self._transaction(ts, body, events_out=events_out,
                                             after_write=prepared.claimed)
        prepared.reraise()
        return out

    def complete_and_claim(self, task_id: str, worker_id: str, *, exit_code: int = 0,
                           result: dict[str, Any] | None = None,
                           types: Iterable[str] | None = None, now: float | None = None,
                           events_out: list[Event] | None = None,
                           lease: str | None = None,
                           prepare: Callable[[Task], None] | None = None) \
            -> tuple[Task, Task | None]:
        """:meth:`complete` then :meth:`claim` in one transaction (one commit). Raises like
        :meth:`complete` (nothing is claimed then)."""
        wanted = set(types) if types is not None else None
        ts = clock.now() if now is None else now
        paused = self._paused(ts)
        claim = claim_lease(self.home)

        def body(txn: Any) -> tuple[Task, Task | None]:
            done = complete(txn, task_id, worker_id, exit_code, result, lease)
            return done, self._claim_in(txn, worker_id, wanted, paused, claim)

        prepared = _Prepare(prepare)
        out: tuple[Task, Task | None] = self._transaction(
            ts, body, events_out=events_out, after_write=lambda pair: prepared.claimed(pair[1]))
        prepared.reraise()
        return out

    def complete(self, task_id: str, worker_id: str, *, exit_code: int = 0,
                 result: dict[str, Any] | None = None, now: float | None = None,
                 lease: str | None = None) -> Task:
        """Mark a running task completed (see the port)."""
        done: Task = self._transaction(
            now, lambda txn: complete(txn, task_id, worker_id, exit_code, result, lease))
        return done

    def fail(self, task_id: str, worker_id: str | None, *, error: str,
             exit_code: int | None = None, retry: bool = True,
             result: dict[str, Any] | None = None, outcome: str = "failed",
             now: float | None = None, lease: str | None = None) -> Task:
        """Record a failed attempt of a running task (see the port)."""
        cfg = load_system(self.home).values
        out: Task = self._transaction(now, lambda txn: fail(
            txn, task_id, worker_id, error=error, exit_code=exit_code, retry=retry,
            result=result, outcome=outcome, lease=lease, cfg=cfg))
        return out

    def release(self, task_id: str, worker_id: str, *, reason: str,
                now: float | None = None, lease: str | None = None) -> Task:
        """Hand a running task back without spending an attempt (see the port)."""
        out: Task = self._transaction(
            now, lambda txn: release(txn, task_id, worker_id, reason, lease))
        return out

    @overload
    def reclaim(self, task_id: str, *, reason: str, worker_id: None = None,
                lease: str | None = None, expired_only: bool = False,
                now: float | None = None) -> Task: ...
    @overload
    def reclaim(self, task_id: str, *, reason: str, worker_id: str,
                lease: str | None = None, expired_only: bool = False,
                now: float | None = None) -> Task | None: ...

    def reclaim(self, task_id: str, *, reason: str, worker_id: str | None = None,
                lease: str | None = None, expired_only: bool = False,
                now: float | None = None) -> Task | None:
        """Take a running task back from a worker proven dead, or whose lease expired (see
        the port); the owner, claim and expiry checks run inside the transaction, so each
        task is reclaimed at most once and never while its lease is valid."""
        cfg = load_system(self.home).values
        out: Task | None = self._transaction(now, lambda txn: reclaim(
            txn, task_id, reason=reason, worker_id=worker_id, lease=lease,
            expired_only=expired_only, cfg=cfg))
        return out

    def heartbeat(self, worker_id: str, leases: Mapping[str, str], *,
                  now: float | None = None) -> dict[str, str]:
        """Extend the leases ``worker_id`` holds (see the port); no transaction at all when
        there is nothing to extend or register."""
        if not leases and not self._keeps_registry:
            return {}
        seconds = float(load_system(self.home).values["heartbeat_timeout_s"])

        def body(txn: Any) -> dict[str, str]:
            out = heartbeat(txn, worker_id, leases, seconds)
            self._register_worker(txn, worker_id)
            return out
        extended: dict[str, str] = self._transaction(now, body, drain=False)
        return extended

    # -- operators -------------------------------------------------------------------
    def cancel(self, task_id: str, *, reason: str = "cancelled by operator",
               now: float | None = None) -> Task:
        """Cancel a live task (see the port)."""
        out: Task = self._transaction(now, lambda txn: cancel(txn, task_id, reason))
        return out

    def reprioritize(self, task_id: str, priority: str, *, now: float | None = None) -> Task:
        """Change the priority of a live task (claims see it at once)."""
        check_priority(priority)
        out: Task = self._transaction(now, lambda txn: reprioritize(txn, task_id, priority))
        return out

    # -- wake-ups --------------------------------------------------------------------
    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        raise NotImplementedError

    def changes(self) -> ChangeFeed:
        """A change feed over :meth:`on_change` (a backend with a descriptor of its own,
        such as inotify, returns that instead)."""
        return CallbackFeed(self.on_change)

    def wait(self, timeout: float | None) -> bool:
        """Block until the queue may have changed, or ``timeout``; True when woken."""
        event = threading.Event()
        stop = self.on_change(event.set)
        try:
            return event.wait(timeout)
        finally:
            stop()
