"""The file backend of the queue port (docs/coordination.md, "Queue", and
docs/architecture.md, "The file queue").

Files, all under ``coordination/`` and ``locks/queue.lock``:
- ``task-queue.journal``: the record of every committed transaction (see :mod:`.journal`).
  A commit is one ``pwrite`` of one line and one ``fdatasync``: the commit point.
- ``task-queue.json``: the jq view, a snapshot of the live tasks republished by rename at
  most every ``SNAPSHOT_INTERVAL_S`` (longer for a big view, within the bound) while the
  queue changes; exact once the queue has been
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

from collections.abc import Callable, Iterable

from ... import clock
from ...config import load_system
from ...control import paused_types
from ...errors import Backpressure, InvalidTransition, NotFound
from ...events import make_event
from ...jsonl import iter_jsonl, jsonl_archives, scan_jsonl_gz
from ...rotation import Rotator, rotated_files
from ...store import read_json
from ...tasks import Task, check_task_id, stored_task
from .. import admission, ops, rules
from ..contract import QueueFinding, RetentionReport
from .publisher import Publisher
from .txn import SOURCE, Txn, unlink_quietly


class FileQueue(Publisher, ops.Operations):
    """The file backend over one harness home. One instance per process and home is
    enough; it is safe to share between threads."""

    backend_name = "file"



    def _claim_in(self, txn: Txn, worker_id: str, wanted: set[str] | None,
                  paused: set[str], lease: ops.ClaimLease) -> Task | None:
        """The claim step of a transaction: the best runnable task by the in-memory heaps
        (rules.claim_key order), taken by ops.take (the shared transition)."""
        task_id = txn.state.best_runnable(txn.now_iso, wanted, paused)
        if task_id is None:
            return None
        task = txn.get(task_id)
        assert task is not None
        return ops.take(txn, task, worker_id, lease)

    def expired_leases(self, now: float | None = None) -> list[Task]:
        """Running tasks whose lease ended before ``now`` (see the port), from the
        in-memory queue: only the running tasks are looked at and parsed (O(running))."""
        now_iso = clock.iso(clock.now() if now is None else now)
        with self._mutex:
            state = self._sync(locked=False)
            running = [t for t in map(state.task, list(state.running)) if t]
        return sorted((t for t in running if rules.lease_expired(t, now_iso)),
                      key=lambda t: (t["lease_until"], t["task_id"]))

    def _paused(self, now: float) -> set[str]:
        return paused_types(self._control(), now)

    def _drain_inbox(self, txn: Txn) -> None:
        admission.drain_inbox(self.home, txn, self._completed_ids)

    def _completed_ids(self, wanted: set[str]) -> set[str]:
        """Which of ``wanted`` have a final ``completed`` record in history (streams), also
        in the janitor's archives of it (newest first, only while some are not found)."""
        found: set[str] = set()
        for _, record in iter_jsonl(self.home.history_file):
            if record and record.get("final") and record.get("task_id") in wanted \
                    and record.get("status") == "completed":
                found.add(record["task_id"])
        for archive in jsonl_archives(self.home.history_file):
            rest = wanted - found
            if not rest:
                break
            for record in scan_jsonl_gz(archive, [t.encode() for t in rest]):
                if record.get("final") and record.get("task_id") in rest \
                        and record.get("status") == "completed":
                    found.add(record["task_id"])
        return found

    def _check_backpressure(self, limit: int, adding: int) -> None:
        with self._mutex:
            queued = self._sync(locked=False).queued_count()
        if queued + adding > limit:
            raise Backpressure(
                f"backpressure: {queued} tasks queued, max_queue_depth is {limit}; retry later"
                " or pass --force")

    def ingest(self, *, now: float | None = None, timeout: float | None = None) -> int:
        """Drain the inbox into the queue; returns how many tasks were added (no lock is
        taken when the inbox is empty). ``timeout``: wait at most that long for the queue
        lock (0: only if it is free at once), LockTimeout after; default lock_timeout_s."""
        if not self._inbox_names():
            return 0

        def body(txn: Txn) -> int:
            return sum(1 for e in txn.events if e["type"] == "task_enqueued")
        count: int = self._transaction(now, body, lock_timeout=timeout)
        return count

    def requeue_dead(self, task_id: str, *, reset_attempts: bool = True,
                     now: float | None = None) -> Task:
        """Move a dead letter back into the queue as a fresh queued task; the dead-letter
        file is removed after the commit."""
        check_task_id(task_id)

        def body(txn: Txn) -> Task:
            path = self.home.dead_letter(task_id)
            try:
                task = stored_task(read_json(path))
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
            return task.copy()
        out: Task = self._transaction(now, body)
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

    # ================================================================== upkeep
    def keep_view_fresh(self) -> Callable[[], None]:
        """Nothing to start: every process that commits republishes task-queue.json
        within its publish interval itself, and no other host writes this queue."""
        return _nothing

    def apply_retention(self, *, now: float | None = None,
                        dry_run: bool = False) -> RetentionReport:
        """Rotate task-history.jsonl as the janitor rotates its own files (the protocol
        of :mod:`coordination.rotation`: an interrupted rotation recovered, archives beyond
        ``archive_generations`` deleted, the file rotated into ``task-history.1.jsonl.gz``
        when over ``history_max_lines`` / ``history_max_bytes``, keeping the newest
        ``history_keep_lines``). Takes janitor.lock (re-entrant: the janitor holds it)."""
        rotator = Rotator(self.home, clock.now() if now is None else now, dry_run)
        rotator.rotate_files(tuple(r for r in rotated_files(self.home) if r.key == "history"))
        return RetentionReport(summary=rotator.summary, errors=rotator.errors)


def _nothing() -> None:
    """The stop function of a watch that started nothing."""
