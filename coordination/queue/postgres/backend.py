"""The PostgreSQL backend of the queue port (docs/multi-host.md).

Tables (:mod:`.schema`): ``tasks`` holds live tasks (``queued``, ``running``) and dead
letters (``failed``) as rows with the task as ``data`` jsonb plus the columns claims and
checks filter on; ``history`` is append-only, its ``seq`` the history cursor;
``queue_revision`` counts commits (``stats()["revision"]``).

Guarantees
- Each method that changes the queue is one transaction (READ COMMITTED; the rows it
  changes are locked with ``FOR UPDATE``); it returns once committed, durably (the
  server's ``synchronous_commit``), except a transaction that only claims (a worker's
  :meth:`claim` that admitted no inbox request: :meth:`.txn._Txn.only_claims`), which
  commits with ``synchronous_commit`` off, in the COMMIT's own round trip: it returns
  before its WAL is flushed. A server crash (or a failover to a standby) can then lose
  the claim, never a task or an outcome: the task is queued again and runs again
  (at-least-once), and the worker's later complete, fail or heartbeat is fenced by the
  lease token ("lease lost"), as after any restart. WAL is flushed in order, so a
  synchronous commit after the claim (its complete) makes the claim durable too.
  A transaction that lost a race (a dedup key or task id taken meanwhile, a deadlock)
  is re-run from the start. Its statements go in batches, as few round trips as it
  needs answers (:mod:`.txn`): an enqueue, a claim and a complete take two each.
- A claim takes ``SELECT ... ORDER BY rules.claim_key FOR UPDATE SKIP LOCKED LIMIT 1`` and
  updates that row in the same transaction: two claimers never get the same task and never
  wait for each other.
- Policy is :mod:`..rules` and admission :mod:`..admission`, as in the file backend: the
  transaction object (:mod:`.txn`) offers what they need (an overlay of this
  transaction's changes over the rows, written by :meth:`~.txn._Txn.flush`).
- Commit first, then side effects: inbox files are unlinked and events appended to this
  host's dashboard-events.jsonl after COMMIT; every committing transaction sends
  ``NOTIFY harness_queue`` (delivered at commit), which :meth:`PostgresQueue.wait` and
  :meth:`PostgresQueue.on_change` listen for on a connection of their own.
- Shared besides tasks and history (:mod:`.shared`): the ``events`` table (each
  transaction's queue events, inserted before COMMIT) and the ``control`` row (pauses).
- Per host, in the home: the inbox, the events file and the jq view ``task-queue.json``
  (written by :meth:`PostgresQueue.sync`, in the file backend's format, and kept at most
  1 s stale by :meth:`PostgresQueue.keep_view_fresh`, which the supervisor runs).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from ... import clock
from ...config import load_system
from ...control import paused_types
from ...errors import (
    Backpressure,
    DatabaseUnavailable,
    HarnessError,
    InvalidTransition,
    NotFound,
)
from ...events import Event, append_events
from ...hosts import host_id as this_host_id
from ...paths import Home
from ...redact import redact_url
from ...store import dumps
from ...tasks import (
    Task,
    check_task_id,
    stored_task,
)
from .. import admission, ops, rules
from ..contract import EnqueueResult, QueueFinding, RetentionReport
from ..file.snapshot import parse as parse_view
from ..file.snapshot import publish_temp, render, write_temp
from .connect import connect, database_url
from .listen import listen
from .reads import CLAIM_ORDER, RUNNABLE, PostgresReads
from .schema import require_current
from .shared import CHANNEL, apply_retention, parse_control, record_events
from .txn import _LIVE, Later, Prepared, _Txn
from .view import ViewKeeper

FILE_MODE = 0o600
#: A transaction that lost a race is re-run this many times before the error is raised.
RETRIES = 20
_RACES = (pgerrors.UniqueViolation, pgerrors.SerializationFailure, pgerrors.DeadlockDetected)

_CLAIM = f"""
SELECT t.data FROM tasks t
WHERE {RUNNABLE}
  AND (%(wanted)s::text[] IS NULL OR t.worker_type = ANY(%(wanted)s::text[]))
ORDER BY t.priority_rank, t.created_at, t.task_id
LIMIT 1 FOR UPDATE SKIP LOCKED"""
#: Run before the claim, in its transaction. The claim must walk tasks_claim in order and
#: stop at the first runnable row. Right after a burst of enqueues the statistics are
#: stale (autovacuum has not analysed yet) and a cached generic plan guesses its filters
#: keep ~no rows: either way the planner picks "scan every queued row, then sort", O(the
#: backlog) per claim (measured: 66 ms at 10,000 queued instead of 3 ms). Without sorts it
#: must use the index's order. Only for the claim: other queries (live_tasks' order over
#: queued and running rows) have no index for their ORDER BY and must sort.
#: The same round trip reads the shared control state (the pauses), so a claim sees them
#: as of its own snapshot; a scalar subquery, so the setting applies even without a row.
#: And the claim runs its prepared generic plan (the index walk, whatever the values):
#: under plan_cache_mode auto PostgreSQL re-planned it for most claims (156 custom plans
#: in 200 claims at 20,000 queued), 0.15 ms per claim of planning for the same plan
#: (measured: 0.44 ms -> 0.29 ms per claim round trip, 1 or 100,000 queued).
_CLAIM_SETTINGS = ("SELECT (SELECT state FROM control), "
                   "set_config('enable_sort', 'off', true), "
                   "set_config('plan_cache_mode', 'force_generic_plan', true)")


#: Queued rows, counted up to a bound (``{bound}``: max_queue_depth + 1): the backpressure
#: rule needs no more. The bound is written into the text, not a parameter, so the plan
#: is made for it: a walk of tasks_claim that stops at the bound when it is small (see
#: :data:`_NO_BITMAP`), the planner's own choice, about a full count, when it is large.
_QUEUED_UP_TO = "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE status = 'queued' " \
    "LIMIT {bound}) q"
#: Up to this bound the count walks the index. With stale statistics (right after a
#: burst) the planner otherwise takes a bitmap scan, which reads the whole index before
#: it stops: 3.9 ms at 100,000 queued for a bound of 1,001, against 0.5 ms walking. Past
#: it a walk costs more than the planner's choice (22 ms against 12 ms for 100,000 rows).
_WALK_UP_TO = 10_001
#: For the rest of the transaction (an enqueue's other statements read by key).
_NO_BITMAP = "SELECT set_config('enable_bitmapscan', 'off', true)"


def _refuse_past(limit: int, adding: int, rows: list[tuple[Any, ...]]) -> None:
    """Backpressure when ``adding`` more tasks would leave more than ``limit`` queued
    (``rows``: :data:`_QUEUED_UP_TO` counted up to ``limit`` + 1)."""
    queued = int(rows[0][0])
    if queued + adding > limit:
        counted = f"more than {limit}" if queued > limit else str(queued)
        raise Backpressure(f"backpressure: {counted} tasks queued, max_queue_depth is "
                           f"{limit}; retry later or pass --force")


class _StaleControl(Exception):
    """A claim assumed control state that has changed since: its transaction is re-run."""


class PostgresQueue(PostgresReads, ops.Operations):
    """The postgres backend over one harness home (its system.json names the database).
    One connection per instance, shared by its threads under a lock."""

    backend_name = "postgres"

    def __init__(self, home: Home) -> None:
        self.home = home.require()
        self.url = database_url(home)
        self._mutex = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._owe_view = False
        self._closed = False
        self._open: _Txn | None = None  # the transaction this instance has open
        self._local = threading.local()  # a backpressure check for the next transaction
        # The control state the last claim read: the next claim assumes it still holds
        # (see _claim_in), so its settings and its query go in one round trip.
        self._control_seen: dict[str, Any] | None = None
        conn = self._connection()
        try:
            require_current(conn, self.url)
        except BaseException:
            conn.close()
            raise
        # Close the connection when this object is collected or at exit, whichever is
        # first (the finalizer holds the holder, not self).
        self._holder: list[psycopg.Connection[Any] | None] = [self._conn]
        self._finalizer = weakref.finalize(self, _close_holder, self._holder)
        # A process that changed the queue publishes the jq view as it exits.
        atexit.register(_close_at_exit, weakref.ref(self))

    def __repr__(self) -> str:
        return f"PostgresQueue({self.home.root}, {redact_url(self.url)})"

    # ================================================================== connection
    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            # autocommit: each `conn.transaction()` block is then a real BEGIN ... COMMIT
            conn = self._conn = connect(self.url, autocommit=True)
            # Our statements are prepared by txn.Prepared. psycopg's own (after five uses)
            # would make it send DEALLOCATE ALL after any ROLLBACK, dropping ours too.
            conn.prepare_threshold = None
            self._prepared = Prepared()  # a new session has none
            holder = getattr(self, "_holder", None)
            if holder is not None:
                holder[0] = conn
        return conn

    def _transaction(self, now: float | None, body: Callable[[_Txn], Any], *,
                     drain: bool = True,
                     events_out: list[Event] | None = None,
                     after_write: Callable[[Any], None] | None = None) -> Any:
        """Run ``body(txn)`` in one database transaction, commit, then the side effects
        (``after_write(out)``, inbox unlinks, events). Re-run from the start when it lost
        a race (or a claim assumed stale control state). An enqueue's backpressure count
        (:meth:`_check_backpressure`) leads the first batch, after BEGIN."""
        ts = clock.now() if now is None else now
        backpressure: tuple[int, int] | None = getattr(self._local, "backpressure", None)
        self._local.backpressure = None
        for attempt in range(RETRIES + 1):
            with self._mutex:
                try:
                    conn = self._connection()
                    txn = self._open = _Txn(conn, ts, self._prepared)
                    try:
                        if backpressure is not None:
                            limit, adding = backpressure
                            if limit + 1 <= _WALK_UP_TO:
                                txn.defer(_NO_BITMAP)
                            txn.later(_QUEUED_UP_TO.format(bound=int(limit) + 1),
                                      check=partial(_refuse_past, limit, adding))
                        if drain:
                            admission.drain_inbox(self.home, txn, self._completed_ids)
                        out = body(txn)
                        txn.flush()
                        # With COMMIT, one round trip: the events (shared.py: the events
                        # table), the revision and the wake-up.
                        if txn.changed and txn.notify:
                            final = record_events(txn.events, then="SELECT pg_notify(%s, "
                                                  "nextval('queue_revision')::text)",
                                                  params=(CHANNEL,))
                        elif txn.changed:
                            final = record_events(txn.events,
                                                  then="SELECT nextval('queue_revision')")
                        else:
                            final = record_events(txn.events)
                        # A claim alone commits without waiting for its WAL flush
                        # (module docstring: what a crash can lose).
                        txn.commit(final, synchronous=not txn.only_claims())
                    except BaseException:
                        txn.rollback()
                        raise
                    finally:
                        self._open = None
                except (*_RACES, _StaleControl):
                    if attempt == RETRIES:
                        raise
                    continue
                except pgerrors.InvalidSqlStatementName:
                    # Our prepared statements are gone (a DEALLOCATE or DISCARD by someone
                    # else, a pooler's session swap): prepare them again and re-run.
                    self._prepared = Prepared()
                    if attempt == RETRIES:
                        raise
                    continue
                except psycopg.OperationalError as exc:
                    raise self._unavailable(exc) from None
                if txn.changed:
                    self._owe_view = True
            break
        try:
            if after_write is not None:
                after_write(out)
        finally:
            for path in txn.inbox_done:
                _unlink_quietly(path)
        if events_out is not None:
            events_out.extend(txn.events)
        else:
            self._emit(txn.events)
        return out

    def _unavailable(self, exc: Exception) -> DatabaseUnavailable:
        """The error for a connection lost mid-operation (the next operation reconnects)."""
        detail = str(exc).strip().replace("\n", " ")
        return DatabaseUnavailable(f"PostgreSQL at {redact_url(self.url)}: {detail}")

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[psycopg.Connection[Any]]:
        """This instance's connection in one read-only REPEATABLE READ transaction (every
        statement sees the same snapshot); DatabaseUnavailable when the server is gone."""
        with self._mutex:
            try:
                conn = self._connection()
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    yield conn
            except psycopg.OperationalError as exc:
                raise self._unavailable(exc) from None

    def _read(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Rows of one statement on this instance's connection: on its own (autocommit:
        one statement sees one snapshot, at one round trip), or inside the transaction
        this thread has open (admission's history lookup)."""
        with self._mutex:
            try:
                if self._open is not None:
                    return self._open.query(sql, params)
                return list(self._connection().execute(sql, params))
            except psycopg.OperationalError as exc:
                raise self._unavailable(exc) from None

    def _emit(self, events: list[Event]) -> None:
        """Append events of a committed change; a failure is logged, never raised (the
        change is durable: a retrying producer would enqueue twice). Not fdatasynced, as
        the file backend's: the events table has them, committed with the change."""
        if not events:
            return
        try:
            append_events(self.home, events, durability="none")
        except HarnessError as exc:
            import logging
            logging.getLogger("harness.queue").warning(
                "%d event(s) not recorded: %s", len(events), exc)

    def _control_state(self) -> dict[str, Any]:
        """The shared control state, on this instance's connection (inside the caller's
        transaction when one is open: a claim sees the pauses as of its own snapshot)."""
        rows = self._read("SELECT state FROM control")
        return parse_control(rows[0][0] if rows else {}, f"control table at "
                             f"{redact_url(self.url)}")

    def _completed_ids(self, wanted: set[str]) -> set[str]:
        rows = self._read(  # inside the admitting transaction
            "SELECT DISTINCT task_id FROM history WHERE task_id = ANY(%s::text[]) AND final "
            "AND status = 'completed'", (list(wanted),))
        return {str(r[0]) for r in rows}

    # ================================================================== producers
    def enqueue_batch(self, requests: list[dict[str, Any]], *, force: bool = False,
                      now: float | None = None) -> list[EnqueueResult]:
        """As :meth:`ops.Operations.enqueue_batch`; the backpressure check is made in the
        enqueue's own transaction, in its first round trip (see :meth:`_check_backpressure`):
        requests are validated before it, so a bad request is a UsageError even when the
        queue is full."""
        try:
            return super().enqueue_batch(requests, force=force, now=now)
        finally:
            self._local.backpressure = None

    def _check_backpressure(self, limit: int, adding: int) -> None:
        """Called by enqueue_batch before its transaction: the count is left to that
        transaction (:meth:`_transaction` sends it with BEGIN and the first read, and
        raises Backpressure from its result before anything is committed), which saves a
        round trip. It counts at most ``limit`` + 1 queued rows (:data:`_QUEUED_UP_TO`):
        as exact as a full count for the rule, and, for a small ``max_queue_depth``,
        bounded whatever the backlog."""
        self._local.backpressure = (limit, adding)

    def ingest(self, *, now: float | None = None, timeout: float | None = None) -> int:
        """Admit this host's inbox; returns how many tasks were added (no database work
        when the inbox is empty). ``timeout`` is not used: a transaction here waits only
        for the rows it changes."""
        if not admission.inbox_names(self.home):
            return 0

        def body(txn: _Txn) -> int:
            return sum(1 for e in txn.events if e["type"] == "task_enqueued")
        count: int = self._transaction(now, body)
        return count

    # ================================================================== workers
    def _paused(self, now: float) -> set[str]:
        """Nothing before the transaction: :meth:`_claim_in` reads the pauses inside it,
        in the round trip that sets the claim's planner option (one round trip, not two,
        and the pauses as of the claim's own snapshot)."""
        return set()

    def _claim_in(self, txn: _Txn, worker_id: str, wanted: set[str] | None,
                  paused: set[str], lease: ops.ClaimLease) -> Task | None:
        """The claim reads the pauses in its own transaction, in the statement before the
        claim query. Both go in one round trip, the query excluding the types paused in the
        control state the previous claim read; when the state read now pauses other types
        the transaction is re-run from the start (:class:`_StaleControl`), which an
        operator's pause or resume costs once. The first claim of an instance, knowing no
        state yet, reads it first (one more round trip)."""
        txn.flush()  # the claim query must see this transaction's own changes
        settings = txn.later(_CLAIM_SETTINGS)
        assumed = self._control_seen
        if assumed is None:
            txn.send()
            assumed = self._claim_control(settings)
        guess = paused | paused_types(assumed, txn.now)
        rows = txn.query(_CLAIM, {
            "now": txn.now_iso, "paused": sorted(guess),
            "wanted": None if wanted is None else sorted(wanted)})
        if paused | paused_types(self._claim_control(settings), txn.now) != guess:
            raise _StaleControl
        if not rows:
            return None
        task = stored_task(dict(rows[0][0]))
        txn.rows[task["task_id"]] = task
        txn.stored.add(task["task_id"])
        txn.claimed = True
        return ops.take(txn, task, worker_id, lease)

    def _claim_control(self, settings: Later) -> dict[str, Any]:
        """The control state the claim's settings statement read, remembered for the next
        claim."""
        raw = settings.fetched()[0][0]
        self._control_seen = parse_control(raw if raw is not None else {},
                                           f"control table at {redact_url(self.url)}")
        return self._control_seen

    _keeps_registry = True

    def _register_worker(self, txn: _Txn, worker_id: str) -> None:
        """Upsert the ``workers`` row of ``worker_id`` (this host, this pid, now): the
        registry doctor checks. A heartbeat notifies nobody (it makes nothing claimable)."""
        txn.defer(
            "INSERT INTO workers (worker_id, host_id, pid, heartbeat_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (worker_id) DO UPDATE SET "
            "host_id = EXCLUDED.host_id, pid = EXCLUDED.pid, "
            "heartbeat_at = EXCLUDED.heartbeat_at",
            (worker_id, this_host_id(), os.getpid(), txn.now_iso))
        txn.written = True
        txn.notify = False

    def forget_worker(self, worker_id: str) -> None:
        """Delete the ``workers`` row of ``worker_id`` (see the port)."""
        self._read("DELETE FROM workers WHERE worker_id = %s RETURNING worker_id",
                   (worker_id,))

    def expired_leases(self, now: float | None = None) -> list[Task]:
        """Running tasks whose lease ended before ``now`` (see the port): one query on the
        ``tasks_lease`` index."""
        now_iso = clock.iso(clock.now() if now is None else now)
        return [stored_task(dict(r[0])) for r in self._read(
            "SELECT data FROM tasks WHERE status = 'running' AND lease_until < %s "
            "ORDER BY lease_until, task_id", (now_iso,))]

    # ================================================================== operators
    def requeue_dead(self, task_id: str, *, reset_attempts: bool = True,
                     now: float | None = None) -> Task:
        """Move a dead letter back into the queue as a fresh queued task."""
        check_task_id(task_id)

        def body(txn: _Txn) -> Task:
            rows = txn.query("SELECT data FROM tasks WHERE task_id = %s AND dead FOR UPDATE",
                             (task_id,))
            if not rows:
                raise NotFound(f"no dead letter {task_id}")
            task = stored_task(dict(rows[0][0]))
            if txn.get(task_id) is not None:
                raise InvalidTransition(f"task {task_id} is already live")
            key = task.get("dedup_key")
            holder = txn.dedup_holder(key) if key else None
            if holder is not None:
                raise InvalidTransition(f"dedup_key {key!r} of {task_id} is held by live task "
                                        f"{holder}; cancel or finish it first")
            rules.requeued_from_dead(task, reset_attempts=reset_attempts)
            txn.drop_dead.append(task_id)
            txn.put(task)
            txn.event("task_requeued", "requeued from dead letters", task)
            return task.copy()
        out: Task = self._transaction(now, body)
        return out

    def purge_dead(self, task_ids: Iterable[str] | None = None) -> list[str]:
        """Delete dead letters (all when ``task_ids`` is None); their history stays."""
        ids = None if task_ids is None else [check_task_id(t) for t in task_ids]

        def body(txn: _Txn) -> list[str]:
            rows = txn.query(
                "DELETE FROM tasks WHERE dead AND (%(ids)s::text[] IS NULL "
                "OR task_id = ANY(%(ids)s::text[])) RETURNING task_id", {"ids": ids})
            removed = sorted(str(r[0]) for r in rows)
            txn.written = bool(removed)
            if removed:
                txn.event("dlq_purged", f"purged {len(removed)} dead letter(s)",
                          task_ids=removed[:100], count=len(removed))
            return removed
        out: list[str] = self._transaction(None, body, drain=False)
        return out

    # ================================================================== the jq view
    def sync(self) -> None:
        """Publish task-queue.json (the file backend's format) from the tasks table now."""
        with self._snapshot() as conn:
            rev = self._revision(conn)
            parts = [dumps(r[0]) for r in conn.execute(
                f"SELECT data FROM tasks WHERE {_LIVE} {CLAIM_ORDER}")]
        self._owe_view = False
        cfg = load_system(self.home)
        tmp = write_temp(self.home.queue_file, render(rev, clock.now(), parts),
                         cfg.durability, FILE_MODE)
        try:
            publish_temp(tmp, self.home.queue_file, cfg.durability)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def ensure_published(self, *, now: float | None = None) -> bool:
        """Publish the jq view when there is none; True when it wrote one."""
        if self.home.queue_file.exists():
            return False
        self.sync()
        return True

    def keep_view_fresh(self) -> Callable[[], None]:
        """Republish task-queue.json after every change of the database, by any host, at
        most every :data:`.view.MIN_INTERVAL_S`: the view is at most 1 s stale while this
        runs (the supervisor runs it). Returns the function that stops it."""
        keeper = ViewKeeper(self.sync)
        stop_listening = self.on_change(keeper.changed)
        keeper.start()

        def stop() -> None:
            stop_listening()
            keeper.stop()
        return stop

    # ================================================================== retention
    def apply_retention(self, *, now: float | None = None,
                        dry_run: bool = False) -> RetentionReport:
        """Delete the oldest rows of ``history`` and ``events`` past their limits, in the
        database (see :func:`.shared.apply_retention`); ``now`` is unused (line limits)."""
        with self._mutex:
            try:
                conn = self._connection()
            except DatabaseUnavailable as exc:
                return RetentionReport(errors=[exc])
            return apply_retention(conn, self.home, dry_run=dry_run)

    # ================================================================== wake-ups
    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """LISTEN on a connection of its own (every committing transaction notifies) plus
        inotify on this host's inbox; returns the function that stops both. The listener
        thread sleeps in select(2) on the connection's socket and a pipe that stop()
        writes to: no polling, and stop() returns at once. When the server goes away (a
        restart) it wakes the callback, reconnects with a bounded backoff and wakes it
        again once listening."""
        from ..file.watch import watch_queue

        stop_listening = listen(self.url, callback)
        stop_inbox = watch_queue(self.home, callback)

        def unsubscribe() -> None:
            if unsubscribe not in self._listeners:
                return
            self._listeners.remove(unsubscribe)
            stop_inbox()
            stop_listening()
        self._listeners.append(unsubscribe)
        return unsubscribe

    # ================================================================== check
    def check(self, *, repair: bool = False, now: float | None = None) -> list[QueueFinding]:
        """Schema version, orphaned rows and the jq view (see :mod:`.check`)."""
        from .check import check_queue
        return check_queue(self, repair=repair, now=clock.now() if now is None else now)

    def view_revision(self) -> int | None:
        """The revision task-queue.json shows (None: absent or unreadable)."""
        try:
            snap = parse_view(self.home.queue_file)
        except HarnessError:
            return None
        return None if snap is None else snap.revision

    def close(self) -> None:
        """Publish the jq view when this instance changed the queue, stop listeners and
        close the connection."""
        if self._closed:
            return
        if self._owe_view:
            try:
                self.sync()
            except (HarnessError, OSError, psycopg.Error):
                pass
        with self._mutex:
            self._closed = True
            for stop in list(self._listeners):
                stop()
            conn, self._conn = self._conn, None
            self._holder[0] = None
        if conn is not None:
            conn.close()


def _close_at_exit(ref: weakref.ref[PostgresQueue]) -> None:
    queue = ref()
    if queue is not None:
        queue.close()


def _close_holder(holder: list[psycopg.Connection[Any] | None]) -> None:
    conn = holder[0]
    if conn is not None:
        conn.close()


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
