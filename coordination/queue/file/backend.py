"""The file backend of the queue port (docs/coordination.md, "Queue", and
docs/architecture.md, "The file queue").

Files, all under ``coordination/`` and ``locks/queue.lock``:
- ``task-queue.journal``: the record of every committed transaction (see :mod:`.journal`).
  A commit is one ``pwrite`` of one line and one ``fdatasync``: the commit point.
- ``task-queue.json``: the jq view, a snapshot of the live tasks republished by rename at
  most every ``SNAPSHOT_INTERVAL_S`` while the queue changes; exact once the queue has been
  quiet for 1 s, never more than 1 s behind. A compaction publishes it durably and starts
  a new journal with only the lines after it.
- ``inbox/``, ``dead-letters/``, ``task-history.jsonl``: as before (group commit through
  the inbox; dead letters by rename; history appended under ``locks/history.lock``).

Each process keeps the live queue in memory (:class:`~.state.LiveState`) and applies only
the journal lines it has not seen, so an operation costs O(its change), not O(backlog).

Order within a commit (commit first, then side effects): history lines, dead-letter files,
the journal line (durable: the commit point), then inbox and dead-letter unlinks; events
after the lock is released; the snapshot after that, at its own pace. The history append is
not fsynced by itself: the journal line carries the same records, and compaction fsyncs the
history file before it drops journal lines, so a power loss is repaired from the journal
(``check(repair=True)``).

A hand edit of ``task-queue.json`` (jq and mv under ``flock locks/queue.lock``) is
honoured: a snapshot no process published is the base, and the journal lines after its
``revision`` are applied on top, so every edit of a task that did not change since that
snapshot holds; the next writer records the difference in the journal.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, overload

from ... import clock
from ...config import load_system
from ...control import paused_types
from ...errors import (
    InvalidTransition,
    NotFound,
)
from ...events import make_event
from ...store import (
    read_json,
)
from ...tasks import check_priority, check_task_id
from .. import rules
from ..contract import QueueFinding
from .admission import Admission
from .txn import SOURCE, Txn, unlink_quietly


class FileQueue(Admission):
    """The file backend over one harness home. One instance per process and home is
    enough; it is safe to share between threads."""

    backend_name = "file"

    def claim(self, worker_id: str, *, types: Iterable[str] | None = None,
              now: float | None = None,
              events_out: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """Atomically take the best runnable task for ``worker_id`` (see the port)."""
        wanted = set(types) if types is not None else None
        ts = clock.now() if now is None else now
        paused = paused_types(self._control(), ts)

        def body(txn: Txn) -> dict[str, Any] | None:
            return self._claim_in(txn, worker_id, wanted, paused)
        claimed: dict[str, Any] | None = self._transaction(ts, body, events_out=events_out)
        return claimed

    def complete_and_claim(self, task_id: str, worker_id: str, *, exit_code: int = 0,
                           result: dict[str, Any] | None = None,
                           types: Iterable[str] | None = None, now: float | None = None,
                           events_out: list[dict[str, Any]] | None = None,
                           lease: str | None = None,
                           ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """:meth:`complete` then :meth:`claim` in one transaction: one lock hold, one
        journal line, one fdatasync. Raises like :meth:`complete` (nothing is claimed)."""
        wanted = set(types) if types is not None else None
        ts = clock.now() if now is None else now
        paused = paused_types(self._control(), ts)

        def body(txn: Txn) -> tuple[dict[str, Any], dict[str, Any] | None]:
            done = self._complete_in(txn, task_id, worker_id, exit_code, result, lease)
            return done, self._claim_in(txn, worker_id, wanted, paused)
        out: tuple[dict[str, Any], dict[str, Any] | None] = self._transaction(
            ts, body, events_out=events_out)
        return out

    def _claim_in(self, txn: Txn, worker_id: str, wanted: set[str] | None,
                  paused: set[str]) -> dict[str, Any] | None:
        task_id = txn.state.best_runnable(txn.now_iso, wanted, paused)
        if task_id is None:
            return None
        task = txn.get(task_id)
        assert task is not None
        rules.claimed(task, worker_id, txn.now_iso)
        txn.put(task)
        txn.event("task_claimed", f"attempt {task['attempts']}/{task['max_attempts']}",
                  task, attempt=task["attempts"])
        return dict(task)

    def complete(self, task_id: str, worker_id: str, *, exit_code: int = 0,
                 result: dict[str, Any] | None = None, now: float | None = None,
                 lease: str | None = None) -> dict[str, Any]:
        """Mark a running task completed (see the port)."""
        def body(txn: Txn) -> dict[str, Any]:
            return self._complete_in(txn, task_id, worker_id, exit_code, result, lease)
        done: dict[str, Any] = self._transaction(now, body)
        return done

    def _complete_in(self, txn: Txn, task_id: str, worker_id: str, exit_code: int,
                     result: dict[str, Any] | None, lease: str | None) -> dict[str, Any]:
        task = self._running(txn, task_id, worker_id, lease)
        task.update(exit_code=exit_code, last_error=None)
        self._finish(txn, task, "completed", "completed", result)
        txn.event("task_completed", f"completed on attempt {task['attempts']}", task,
                  exit_code=exit_code)
        return dict(task)

    def fail(self, task_id: str, worker_id: str | None, *, error: str,
             exit_code: int | None = None, retry: bool = True,
             result: dict[str, Any] | None = None, outcome: str = "failed",
             now: float | None = None, lease: str | None = None) -> dict[str, Any]:
        """Record a failed attempt of a running task (see the port)."""
        cfg = load_system(self.home).values

        def body(txn: Txn) -> dict[str, Any]:
            task = self._running(txn, task_id, worker_id, lease)
            task.update(exit_code=exit_code, last_error=error[:4096])
            if retry and task["attempts"] < task["max_attempts"] \
                    and not task.get("cancel_requested"):
                txn.history.append(rules.history_record(
                    dict(task, status="failed"), final=False, outcome=outcome,
                    recorded_at=txn.now_iso, result=result))
                delay = rules.backoff_delay(task["attempts"], cfg, random.uniform)
                task.update(status="queued", worker_id=None,
                            not_before=rules.retry_at(txn.now, delay))
                txn.put(task)
                txn.event("task_retry_scheduled", f"attempt {task['attempts']} {outcome}: "
                          f"{error[:200]}; retry in {delay:.1f}s", task, severity="warning",
                          attempt=task["attempts"], delay_s=round(delay, 3), outcome=outcome)
            elif task.get("cancel_requested"):
                self._finish(txn, task, "cancelled", "cancelled", result)
                txn.event("task_cancelled", "cancelled while running", task)
            else:
                self._finish(txn, task, "failed", outcome, result)
                txn.event("task_failed", f"failed after {task['attempts']} attempt(s): "
                          f"{error[:200]}", task, severity="error", outcome=outcome)
                txn.event("task_dead_lettered", "moved to dead letters", task,
                          severity="warning")
            return dict(task)
        out: dict[str, Any] = self._transaction(now, body)
        return out

    def release(self, task_id: str, worker_id: str, *, reason: str,
                now: float | None = None, lease: str | None = None) -> dict[str, Any]:
        """Hand a running task back without spending an attempt (see the port)."""
        def body(txn: Txn) -> dict[str, Any]:
            task = self._running(txn, task_id, worker_id, lease)
            if task.get("cancel_requested"):
                self._finish(txn, task, "cancelled", "cancelled")
                txn.event("task_cancelled", "cancelled while running", task)
                return dict(task)
            txn.history.append(rules.history_record(
                dict(task, status="queued"), final=False, outcome="released",
                recorded_at=txn.now_iso))
            task.update(status="queued", worker_id=None, attempts=task["attempts"] - 1,
                        last_error=reason)
            txn.put(task)
            txn.event("task_released", reason, task)
            return dict(task)
        out: dict[str, Any] = self._transaction(now, body)
        return out

    @overload
    def reclaim(self, task_id: str, *, reason: str, worker_id: None = None,
                now: float | None = None) -> dict[str, Any]: ...

    @overload
    def reclaim(self, task_id: str, *, reason: str, worker_id: str,
                now: float | None = None) -> dict[str, Any] | None: ...

    def reclaim(self, task_id: str, *, reason: str, worker_id: str | None = None,
                now: float | None = None) -> dict[str, Any] | None:
        """Take a running task back from a worker proven dead (see the port)."""
        if worker_id is None:
            return self.fail(task_id, None, error=f"reclaimed: {reason}",
                             outcome="reclaimed", now=now)
        try:
            return self.fail(task_id, worker_id, error=f"reclaimed: {reason}",
                             outcome="reclaimed", now=now)
        except (NotFound, InvalidTransition):
            return None

    def _running(self, txn: Txn, task_id: str, worker_id: str | None,
                 lease: str | None = None) -> dict[str, Any]:
        task = txn.get(task_id)
        rules.check_running(task, task_id, worker_id, lease)
        assert task is not None
        return task

    def _finish(self, txn: Txn, task: dict[str, Any], status: str, outcome: str,
                result: dict[str, Any] | None = None) -> None:
        """Move a task out of the live queue into history (and dead letters if failed),
        cancelling queued tasks that depend on it unless it completed."""
        rules.finish_fields(task, status, txn.now_iso)
        txn.history.append(rules.history_record(task, final=True, outcome=outcome,
                                                recorded_at=txn.now_iso, result=result))
        if status == "failed":
            txn.dead_letters.append(dict(task))
        waiters = list(txn.state.waiters.get(task["task_id"], ()))
        txn.remove(task["task_id"], status)
        others = [t for t in map(txn.get, waiters) if t is not None]
        for other_id in rules.dependents_to_cancel(task["task_id"], status, others):
            other = txn.get(other_id)
            if other is None:
                continue
            other["last_error"] = f"dependency {task['task_id']} ended {status}"
            self._finish(txn, other, "cancelled", "dependency_failed")
            txn.event("task_cancelled", other["last_error"], other, severity="warning")

    def cancel(self, task_id: str, *, reason: str = "cancelled by operator",
               now: float | None = None) -> dict[str, Any]:
        """Cancel a live task (see the port)."""
        def body(txn: Txn) -> dict[str, Any]:
            task = txn.get(task_id)
            if task is None:
                raise NotFound(f"task {task_id} is not live; only queued or running tasks "
                               "can be cancelled")
            if task["status"] == "queued":
                task["last_error"] = reason
                self._finish(txn, task, "cancelled", "cancelled")
                txn.event("task_cancelled", reason, task)
            elif not task.get("cancel_requested"):
                task["cancel_requested"] = True
                txn.put(task)
                txn.event("task_cancel_requested", reason, task)
            return dict(task)
        out: dict[str, Any] = self._transaction(now, body)
        return out

    def reprioritize(self, task_id: str, priority: str, *,
                     now: float | None = None) -> dict[str, Any]:
        """Change the priority of a live task (claims pick it up at once)."""
        check_priority(priority)

        def body(txn: Txn) -> dict[str, Any]:
            task = txn.get(task_id)
            if task is None:
                raise NotFound(f"task {task_id} is not live")
            old = task["priority"]
            if old != priority:
                task["priority"] = priority
                txn.put(task)
                txn.event("task_reprioritized", f"{old} -> {priority}", task, old=old,
                          new=priority)
            return dict(task)
        out: dict[str, Any] = self._transaction(now, body)
        return out

    def requeue_dead(self, task_id: str, *, reset_attempts: bool = True,
                     now: float | None = None) -> dict[str, Any]:
        """Move a dead letter back into the queue as a fresh queued task; the dead-letter
        file is removed after the commit."""
        check_task_id(task_id)

        def body(txn: Txn) -> dict[str, Any]:
            path = self.home.dead_letter(task_id)
            try:
                task = read_json(path)
            except FileNotFoundError:
                raise NotFound(f"no dead letter {task_id} ({path})") from None
            if task_id in txn.state:
                raise InvalidTransition(f"task {task_id} is already live")
            key = task.get("dedup_key")
            holder = txn.state.by_dedup.get(key) if key else None
            if holder is not None:
                raise InvalidTransition(f"dedup_key {key!r} of {task_id} is held by live task "
                                        f"{holder}; cancel or finish it first")
            rules.requeued_from_dead(task, reset_attempts=reset_attempts)
            txn.put(task)
            txn.drop_dead_letters.append(task_id)
            txn.event("task_requeued", "requeued from dead letters", task)
            return dict(task)
        out: dict[str, Any] = self._transaction(now, body)
        return out

    def purge_dead(self, task_ids: Iterable[str] | None = None) -> list[str]:
        """Delete dead letters (all when ``task_ids`` is None); returns the ids removed.
        Their final history records stay."""
        ids = [d["task_id"] for d in self.dead_letters()] if task_ids is None \
            else [check_task_id(t) for t in task_ids]
        removed = [t for t in ids if self.home.dead_letter(t).exists()]
        with self._mutex:
            self._acquire(load_system(self.home).lock_timeout)
            try:
                for task_id in removed:
                    unlink_quietly(self.home.dead_letter(task_id))
            finally:
                self._lock.release()
        if removed:
            self._emit([make_event("dlq_purged", source=SOURCE,
                                   message=f"purged {len(removed)} dead letter(s)",
                                   data={"task_ids": removed[:100], "count": len(removed)})])
        return removed

    def check(self, *, repair: bool = False, now: float | None = None) -> list[QueueFinding]:
        """The queue's part of ``harness doctor`` (see :mod:`.check`)."""
        from .check import check_queue
        return check_queue(self, repair=repair, now=clock.now() if now is None else now)
