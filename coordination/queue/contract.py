"""The queue port: what every backend guarantees (docs/coordination.md, "Queue").

Daemons, the CLI, metrics and doctor are typed against :class:`QueueBackend` and nothing
else: they never name a backend's files or call its private methods. ``open_queue(home)``
(in :mod:`coordination.queue`) picks the backend from system.json ``queue_backend``.

Every method is atomic with respect to every other caller, in this process or another.
A method that changes the queue returns once the change is durable (per ``durability``);
its events are appended after that. Policy (claim order, retries, dependencies, dedup) is
:mod:`coordination.queue.rules`, the same for every backend.

Shaped for a networked backend too: a claim is a lease (docs/coordination.md, "Leases
and hosts"): it records the claiming host (``host_id``), a fresh fencing token
(:func:`~coordination.queue.rules.lease_token`) and ``lease_until``, which ``heartbeat``
extends; a worker that lost its task cannot commit (complete / fail / release check the
owner and token under the backend's own lock or row lock), and a task whose lease expired
is reclaimed by the supervisor of any host (``expired_leases``, ``reclaim``); the
history cursor is an opaque string (a file offset here, a sequence number in a database);
``wait`` / ``on_change`` / ``changes`` are what inotify or LISTEN/NOTIFY provide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, overload, runtime_checkable

from ..errors import HarnessError
from ..events import Event

# Re-exported: the port's record types (TypedDicts owned by coordination.tasks).
from ..tasks import HistoryRecord as HistoryRecord
from ..tasks import Task as Task


@dataclass
class EnqueueResult:
    """What became of one enqueued request."""

    task: Task
    created: bool  # False: deduplicated onto an existing live task (``task`` is that one)


@dataclass
class QueueFinding:
    """One result of :meth:`QueueBackend.check` (doctor's levels: error, warning, info)."""

    level: str
    code: str
    message: str
    path: str | None = None
    repaired: bool = False


class Findings(list[QueueFinding]):
    """What a backend's ``check`` collects: :meth:`add` appends one finding and returns it
    (so a repair can mark it ``repaired``)."""

    def add(self, level: str, code: str, message: str, path: Any = None) -> QueueFinding:
        finding = QueueFinding(level, code, message, str(path) if path else None)
        self.append(finding)
        return finding


@dataclass
class RetentionReport:
    """What :meth:`QueueBackend.apply_retention` did (in a dry run: would do).

    ``summary`` holds keys of the janitor's summary (docs/janitor.md), added into it:
    the file backend's ``rotations``, ``recovered``, ``torn``, ... of task-history.jsonl;
    the postgres backend's ``trimmed`` (one ``{"table", "reason", "rows_deleted",
    "kept_rows"}`` per table it trimmed). ``errors``: what failed; the rest still ran."""

    summary: dict[str, Any] = field(default_factory=dict)
    errors: list[HarnessError] = field(default_factory=list)


@runtime_checkable
class ChangeFeed(Protocol):
    """A descriptor a loop selects on with its own (signals, a task's pipe): readable when
    the queue may have changed. :meth:`drain` consumes what is pending, without blocking,
    and says whether any of it was a change; :meth:`close` releases it. One reader."""

    def fileno(self) -> int: ...
    def drain(self) -> bool: ...
    def close(self) -> None: ...


@runtime_checkable
class QueueBackend(Protocol):
    """The queue contract. See each method for its guarantee."""

    #: "file", "postgres", ...
    backend_name: str

    # -- producers -------------------------------------------------------------------
    def enqueue(self, request: dict[str, Any], *, force: bool = False,
                now: float | None = None) -> EnqueueResult:
        """Add one task; return once it is durable. UsageError on bad input (nothing is
        queued), Backpressure (exit 75) above ``max_queue_depth`` unless ``force``; a
        ``dedup_key`` held by a live task returns that task with ``created`` False."""
    def enqueue_batch(self, requests: list[dict[str, Any]], *, force: bool = False,
                      now: float | None = None) -> list[EnqueueResult]:
        """Add many tasks in one commit, all or nothing."""
    def submit(self, request: dict[str, Any], *, now: float | None = None,
               durable: bool = False) -> str:
        """Validate and hand a request to this host's inbox without waiting for the queue
        (create-task.sh's path); the next ``ingest`` admits it. Returns the task id."""
    def ingest(self, *, now: float | None = None, timeout: float | None = None) -> int:
        """Admit this host's pending inbox requests; returns how many were added. Cheap
        when the inbox is empty (no lock is taken). ``timeout`` bounds the wait for the
        queue (0: only if free at once; LockTimeout otherwise)."""
    @property
    def view_file(self) -> Path:
        """The jq view this backend keeps (docs/coordination.md, task-queue.json)."""

    def ensure_published(self, *, now: float | None = None) -> bool:
        """Make the operator-facing view exist (an empty queue in a new home); True when it
        was written. Never replaces one."""

    # -- workers ---------------------------------------------------------------------
    def claim(self, worker_id: str, *, types: Iterable[str] | None = None,
              now: float | None = None,
              events_out: list[Event] | None = None,
              prepare: Callable[[Task], None] | None = None) -> Task | None:
        """Take the best runnable task (rules.claim_key) for ``worker_id``: it becomes
        ``running`` with ``attempts`` + 1, this process's ``host_id``, a fresh
        ``lease_token`` and ``lease_until`` = now + ``heartbeat_timeout_s``. None when
        none is runnable. With ``events_out``
        the caller appends the committed transaction's events itself. ``prepare(task)``
        runs once a task is claimed, before the call returns: the claim is committed
        (every process sees it) but possibly not durable yet (the file backend runs it
        between its journal write and the fdatasync, so the hook overlaps the flush). The
        worker starts the task there: a claim lost to a power loss loses no task, which is
        queued again (at-least-once); the hook must not record anything that assumes the
        claim survived. It should not raise: an exception is raised after the commit and
        its events, with the task claimed."""
    def complete(self, task_id: str, worker_id: str, *, exit_code: int = 0,
                 result: dict[str, Any] | None = None, now: float | None = None,
                 lease: str | None = None) -> Task:
        """Finish a task running under ``worker_id``: a final history record, the task
        leaves the live queue. NotFound / InvalidTransition (nothing changes) when it is
        not running under ``worker_id`` any more (reclaimed meanwhile), or, with ``lease``
        (rules.lease_token of the claimed task), when that claim is not the current one."""
    def complete_and_claim(self, task_id: str, worker_id: str, *, exit_code: int = 0,
                           result: dict[str, Any] | None = None,
                           types: Iterable[str] | None = None, now: float | None = None,
                           events_out: list[Event] | None = None,
                           lease: str | None = None,
                           prepare: Callable[[Task], None] | None = None) \
            -> tuple[Task, Task | None]:
        """``complete`` then ``claim`` for the same worker in one commit (``prepare`` as
        for :meth:`claim`)."""
    def fail(self, task_id: str, worker_id: str | None, *, error: str,
             exit_code: int | None = None, retry: bool = True,
             result: dict[str, Any] | None = None, outcome: str = "failed",
             now: float | None = None, lease: str | None = None) -> Task:
        """Record a failed attempt: queued again after rules.backoff_delay while attempts
        remain (and ``retry``), else ``failed`` with a dead letter. ``worker_id`` None
        skips the owner check. ``outcome`` names it in history (failed, reclaimed)."""
    def release(self, task_id: str, worker_id: str, *, reason: str,
                now: float | None = None, lease: str | None = None) -> Task:
        """Hand a running task back without spending an attempt."""
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
        """Take a task back from a worker proven dead or whose lease expired (the attempt
        counts). With ``worker_id`` the owner (and, with ``lease``, the claim) is checked
        in the transaction and None is returned when the task is no longer running under
        it (each task is reclaimed at most once); with ``expired_only`` also when its
        lease has not expired at ``now`` (fail closed: a heartbeat committed first)."""
    def heartbeat(self, worker_id: str, leases: Mapping[str, str], *,
                  now: float | None = None) -> dict[str, str]:
        """Extend to now + ``heartbeat_timeout_s`` the lease of each task in ``leases``
        (task id -> lease token) held by ``worker_id``; returns task id -> new
        ``lease_until``. All or nothing: NotFound / InvalidTransition ("lease lost") when
        a task is not running under that claim any more (its worker must stop it). A
        backend with a worker registry (postgres) records the heartbeat there too, also
        with no leases."""
    def forget_worker(self, worker_id: str) -> None:
        """Drop ``worker_id`` from the backend's worker registry (a worker exiting, or
        found dead); nothing happens without a registry (the file backend) or a row."""
    def expired_leases(self, now: float | None = None) -> list[Task]:
        """Running tasks whose ``lease_until`` is before ``now``, oldest lease first, on
        every host: what any host's supervisor reclaims. Tasks without a lease (claimed
        before leases existed) are never listed."""

    # -- operators -------------------------------------------------------------------
    def cancel(self, task_id: str, *, reason: str = "cancelled by operator",
               now: float | None = None) -> Task:
        """Queued: cancelled at once. Running: ``cancel_requested``, its worker stops it."""
    def reprioritize(self, task_id: str, priority: str, *,
                     now: float | None = None) -> Task:
        """Change a live task's priority; claims see it at once."""
    def requeue_dead(self, task_id: str, *, reset_attempts: bool = True,
                     now: float | None = None) -> Task:
        """Move a dead letter back into the queue as a fresh queued task."""
    def purge_dead(self, task_ids: Iterable[str] | None = None) -> list[str]:
        """Delete dead letters (all when None); returns the ids removed."""

    # -- reads -----------------------------------------------------------------------
    def get(self, task_id: str) -> Task | None:
        """The live task, else its dead letter, else its newest final history record."""
    def live_tasks(self, status: str | None = None) -> list[Task]:
        """Queued and running tasks (only ``status`` ones when given), a consistent view."""
    def dead_letters(self) -> list[Task]:
        """Every dead letter, oldest task id first."""
    def history_of(self, task_id: str | None, *, correlation_id: str | None = None,
                   archives: bool = False) -> list[HistoryRecord]:
        """Every history record of one task (or, with ``correlation_id`` and no task id, of
        every task of that correlation id), oldest first; ``archives`` includes rotated
        history."""
    def history_since(self, cursor: str | None, *, start_at: float | None = None,
                      limit: int | None = None) -> tuple[list[HistoryRecord], str]:
        """History records after ``cursor`` and the cursor to pass next time. With no
        cursor: from ``start_at`` (a time: records recorded since) or the beginning. A
        cursor the backend no longer recognises (history rotated) starts over."""
    def next_due(self, *, types: Iterable[str] | None = None,
                 now: float | None = None) -> str | None:
        """The earliest ``not_before`` later than ``now`` among queued tasks (of ``types``
        when given), or None: what an idle worker sleeps until. Never parses the backlog
        into task dicts."""
    def stats(self, now: float | None = None) -> dict[str, Any]:
        """Counts by status and priority, runnable counts per type, oldest queued age,
        inbox and dead-letter sizes, revision."""

    # -- wake-ups and upkeep ---------------------------------------------------------
    def wait(self, timeout: float | None) -> bool:
        """Block until the queue may have changed (or ``timeout``); True when woken."""
    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from another thread) whenever the queue may have changed;
        returns the function that stops it."""
    def changes(self) -> ChangeFeed:
        """A :class:`ChangeFeed` of this queue, for a loop that waits on several
        descriptors at once (inotify itself for the file backend: no thread of ours)."""
    def check(self, *, repair: bool = False, now: float | None = None) -> list[QueueFinding]:
        """The queue's own invariants (doctor's queue part); with ``repair`` fix what can
        be fixed without losing data and mark those findings repaired."""
    def sync(self) -> None:
        """Bring the backend's operator-facing view (the jq file) up to date now."""
    def keep_view_fresh(self) -> Callable[[], None]:
        """Keep this host's jq view at most 1 s behind every change, whichever host made
        it, until the returned function is called (the supervisor runs this). The file
        backend's committers already republish within 0.4 s, so there it starts nothing."""
    def apply_retention(self, *, now: float | None = None,
                        dry_run: bool = False) -> RetentionReport:
        """History retention (the janitor's step; system.json ``history_*`` and
        ``archive_generations``): the file backend rotates task-history.jsonl into
        gzip archives; the postgres backend deletes the oldest history rows, and the
        oldest rows of its shared ``events`` table (``events_*``), in the database.
        Records a queued task still needs (the completion of a dependency) are kept."""
    def close(self) -> None:
        """Release descriptors and threads; pending view updates are published first."""
