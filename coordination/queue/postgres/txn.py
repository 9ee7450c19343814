"""One transaction of the PostgreSQL backend: the rows it reads, locks and writes.

:class:`_Txn` offers what the shared operations (:mod:`..ops`), policy (:mod:`..rules`)
and admission (:mod:`..admission`) need over one connection in one transaction: reads
that lock the rows they return (``FOR UPDATE`` / ``FOR KEY SHARE``), an overlay of this
transaction's changes (tasks put and removed, history records, dead letters, events),
and :meth:`_Txn.flush`, which writes the overlay before COMMIT. :class:`_Live` is the live
queue as the transaction sees it (:class:`..admission.LiveView`). The backend that runs
transactions (retries, COMMIT, side effects after it) is :mod:`.backend`.

Round trips: on loopback a round trip costs more than the statement it carries, and a
dispatch is two transactions (the enqueue, the claim), so a transaction sends its
statements in as few round trips as it can. Statements whose results it does not need yet
(BEGIN, the writes of :meth:`_Txn.flush`, reads it wants later) wait in a batch, and go
with the next statement whose rows it needs, or with COMMIT, as one simple-protocol query;
a statement with parameters goes as ``EXECUTE`` of its server-side prepared form
(:class:`Prepared`), its values bound on the client by psycopg. An enqueue is then two round trips
(``BEGIN; count for backpressure; check ids`` and ``INSERT; events; COMMIT``), a claim
two (``BEGIN; settings; claim`` and ``UPDATE; events; SET LOCAL synchronous_commit TO
off; COMMIT``: a claim alone need not wait for its WAL flush, see :mod:`.backend`), a
complete two; the first batch to use a statement on a connection is preceded by one
round trip of PREPAREs alone (:class:`Prepared` says why). When a
statement of a batch fails, the rest of it is skipped and the error is raised as for that
statement alone; the backend then rolls the transaction back. Every statement of a
transaction goes through it (:meth:`_Txn.query`, :meth:`_Txn.later`, :meth:`_Txn.defer`):
one sent on the connection directly would run outside it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import ClientCursor, pq
from psycopg.types.json import Jsonb

from ... import clock
from ...events import Event
from ...tasks import PRIORITY_RANK, HistoryRecord, Task, stored_task
from .. import rules
from ..ops import queue_event

_LIVE = "status IN ('queued', 'running')"
#: Sent before the COMMIT of a transaction that only claims (:meth:`_Txn.commit`).
ASYNC_COMMIT = "SET LOCAL synchronous_commit TO off"
_FOR_UPDATE = "FOR UPDATE"
_KEY_SHARE = "FOR KEY SHARE"


def _row(task: Task) -> dict[str, Any]:
    """The columns of ``task`` (the task itself is ``data``)."""
    return {"task_id": task["task_id"], "status": task["status"],
            "priority_rank": PRIORITY_RANK[task["priority"]],
            "created_at": task.get("created_at") or "", "not_before": task.get("not_before"),
            "worker_type": rules.worker_type_of(task), "worker_id": task.get("worker_id"),
            "dedup_key": task.get("dedup_key"),
            "depends_on": list(task.get("depends_on") or ()), "host_id": task.get("host_id"),
            "lease_until": task.get("lease_until"), "data": Jsonb(task)}


_COLUMNS = ("task_id", "status", "priority_rank", "created_at", "not_before", "worker_type",
            "worker_id", "dedup_key", "depends_on", "host_id", "lease_until", "data")
_INSERT = (f"INSERT INTO tasks ({', '.join(_COLUMNS)}) VALUES "
           f"({', '.join(f'%({c})s' for c in _COLUMNS)})")
_UPDATE = (f"UPDATE tasks SET {', '.join(f'{c} = %({c})s' for c in _COLUMNS[1:])} "
           f"WHERE task_id = %(task_id)s AND {_LIVE}")


class _Live:
    """The live queue as one transaction sees it (:class:`..admission.LiveView`)."""

    finished: dict[str, str] = {}  # nothing remembered: history answers (completed_ids)

    def __init__(self, txn: _Txn) -> None:
        self._txn = txn
        self.by_dedup = self

    def __contains__(self, task_id: object) -> bool:
        """Whether ``task_id`` is live, holding that row (FOR KEY SHARE) until the
        transaction ends: admission asks this of each dependency, and a dependency that
        is finishing meanwhile either ends first (we then see it gone) or waits for our
        commit (its cascade then sees our new waiter). Either way no task is admitted
        behind a dependency that failed."""
        return isinstance(task_id, str) and self._txn.get(task_id, lock=_KEY_SHARE) \
            is not None

    def deps_of(self, task_id: str) -> tuple[str, ...] | None:
        task = self._txn.get(task_id)
        return None if task is None else tuple(task.get("depends_on") or ())

    def get(self, key: str) -> str | None:  # by_dedup.get: the live holder of a dedup_key
        return self._txn.dedup_holder(key)

    def remove(self, task_id: str, final_status: str | None) -> None:
        """Nothing to do: the overlay (``puts``) is the transaction's only copy."""


class Prepared:
    """The statements prepared on one connection (``PREPARE``, server side), so a batch
    runs them with ``EXECUTE name(values)``: parsed and planned once per connection, not
    per use (a statement parsed and planned per use cost more server time than the round
    trips the batches save). The statements a batch uses for the first time are prepared
    just before it, in a query of PREPAREs alone (one round trip more, once per statement
    per connection), and known once that query succeeded (PREPARE is not transactional:
    a rollback keeps them). Never in the batch itself: the server keeps with a prepared
    statement the text of the whole query that prepared it and copies that text on every
    EXECUTE, for the life of the connection. Prepared in a batch, the text would hold the
    batch's values: 5.3 MB after an enqueue of 5,000 tasks, copied by each later claim
    and complete (about 1 ms each; that, not the backlog, made claim + complete 1.8x
    slower after the 100,000-task bench's fill). A name is never reused."""

    def __init__(self) -> None:
        self.names: dict[str, tuple[str, tuple[str | None, ...]]] = {}
        self._count = 0

    def prepare(self, sql: str) -> tuple[str, tuple[str | None, ...], str]:
        """A new name for ``sql``, the order its parameters go in (a name for each
        ``%(name)s``, None for each ``%s``) and the PREPARE statement."""
        self._count += 1
        name = f"harness_{self._count}"
        order: list[str | None] = []
        numbers: dict[str, int] = {}

        def number(match: re.Match[str]) -> str:
            key = match.group(1)
            if key is None:
                order.append(None)
                return f"${len(order)}"
            if key not in numbers:
                order.append(key)
                numbers[key] = len(order)
            return f"${numbers[key]}"
        text = _PLACEHOLDER.sub(number, sql)  # fills ``order``
        return name, tuple(order), f"PREPARE {name} AS {text}"


#: A psycopg placeholder: ``%(name)s`` or ``%s`` (the statements here have no other %).
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s")


class Later:
    """The rows of a statement sent with a later batch (:meth:`_Txn.later`); ``rows`` is
    None until that batch was sent. ``check``, when given, is called with the rows as they
    arrive and may raise: the transaction then ends there, rolled back (a statement with a
    check is never sent with COMMIT)."""

    __slots__ = ("check", "rows")

    def __init__(self, check: Callable[[list[tuple[Any, ...]]], None] | None = None) -> None:
        self.rows: list[tuple[Any, ...]] | None = None
        self.check = check

    def fetched(self) -> list[tuple[Any, ...]]:
        assert self.rows is not None, "read before its batch was sent"
        return self.rows


class _Txn:
    """One transaction: changes are kept in ``puts`` / ``dels`` until :meth:`flush`; the
    statements wait in a batch until a result is needed (see the module docstring).
    Started by its first batch (BEGIN leads it), ended by :meth:`commit` or
    :meth:`rollback`."""

    def __init__(self, conn: psycopg.Connection[Any], now: float,
                 prepared: Prepared | None = None) -> None:
        self._conn = conn
        self._binder = ClientCursor(conn)
        self._prepared = Prepared() if prepared is None else prepared
        self._preparing: dict[str, tuple[str, tuple[str | None, ...]]] = {}
        self._prepare_sql: list[str] = []  # PREPAREs sent just before the next batch
        self._batch: list[tuple[str, Later | None]] = [("BEGIN", None)]
        self.begun = False  # BEGIN sent: the transaction is open on the server
        self.now = now
        self.now_iso = clock.iso(now)
        self.puts: dict[str, Task] = {}
        self.dels: dict[str, str | None] = {}
        self.history: list[HistoryRecord] = []
        self.dead_letters: list[Task] = []
        self.drop_dead: list[str] = []
        self.inbox_done: list[Path] = []
        self.events: list[Event] = []
        self.dedup: dict[str, str] = {}
        self.rows: dict[str, Task | None] = {}  # live rows read (None: not live)
        self.stored: set[str] = set()  # ids with a live row in the database
        self.locked: dict[str, set[str]] = {}  # row-lock clause -> ids read with it
        self.written = False
        self.notify = True  # False: a heartbeat (a lease extended wakes no claimer)
        self.claimed = False  # a claim took a task (see :meth:`only_claims`)
        self.wrote_other = False  # flushed an insert or a delete (admission, an outcome)
        self._state = _Live(self)

    @property
    def state(self) -> _Live:
        return self._state

    # ---------------------------------------------------------------- round trips
    def later(self, sql: str, params: Any = None, *,
              check: Callable[[list[tuple[Any, ...]]], None] | None = None) -> Later:
        """Queue a statement; its rows are in the returned :class:`Later` once the batch
        it is in was sent (by :meth:`query`, :meth:`send` or :meth:`commit`)."""
        result = Later(check)
        self._batch.append((self._bind(sql, params), result))
        return result

    def defer(self, sql: str, params: Any = None) -> None:
        """Queue a statement whose result is not needed (a write)."""
        self._batch.append((self._bind(sql, params), None))

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """The rows of ``sql``, sent with the waiting batch: one round trip."""
        result = self.later(sql, params)
        self.send()
        return result.fetched()

    def send(self) -> None:
        """Send the waiting batch (one round trip) and hand each statement that wanted
        its rows its rows; nothing when no statement waits (BEGIN alone waits for one)."""
        if not self._batch or (not self.begun and len(self._batch) == 1):
            return
        batch, self._batch = self._batch, []
        prepares, self._prepare_sql = self._prepare_sql, []
        preparing, self._preparing = self._preparing, {}
        self.begun = True
        # No parameters: the simple protocol, which takes several statements (psycopg
        # prepares nothing: the bound values make each text new; ours are PREPAREd).
        if prepares:  # alone, so that their text holds no values (see Prepared)
            self._conn.execute("; ".join(prepares), prepare=False)
            self._prepared.names.update(preparing)
        cur = self._conn.execute("; ".join(sql for sql, _ in batch), prepare=False)
        for index, (_, result) in enumerate(batch):
            if index and not cur.nextset():  # pragma: no cover - one result per statement
                raise psycopg.InterfaceError("a batch returned fewer results than statements")
            if result is not None:
                result.rows = cur.fetchall() if cur.description is not None else []
        for _, result in batch:
            if result is not None and result.check is not None:
                result.check(result.fetched())

    def only_claims(self) -> bool:
        """Whether all this transaction changes is claims: a task taken (queued ->
        running), no task accepted (no inbox file done, no insert), no outcome recorded
        (no history, no delete), and ``task_claimed`` its only events."""
        return (self.claimed and not self.wrote_other and not self.inbox_done
                and not (self.history or self.dead_letters or self.drop_dead or self.dels)
                and all(event["type"] == "task_claimed" for event in self.events))

    def commit(self, final: tuple[str, Any] | None = None, *,
               synchronous: bool = True) -> None:
        """Send the waiting batch, ``final`` (a statement and its parameters) and COMMIT
        as one round trip; nothing at all for a transaction that never started. Not
        ``synchronous``: ``SET LOCAL synchronous_commit TO off`` goes in the same round
        trip, before COMMIT, so the commit returns without waiting for its WAL flush (or
        a synchronous standby); the setting is read at COMMIT and ends with it."""
        if any(result is not None and result.check is not None for _, result in self._batch):
            self.send()  # its checks decide whether to commit
        if final is not None:
            self.defer(*final)
        if not self.begun and len(self._batch) == 1:
            self._batch = []
            return
        if not synchronous:
            self.defer(ASYNC_COMMIT)
        self.defer("COMMIT")
        self.send()

    def rollback(self) -> None:
        """End the transaction on the server if it is open (after an error); nothing when
        the connection is gone (the server rolls back) or the transaction never started."""
        self._batch = []
        if self._conn.closed or self._conn.broken:
            return
        if self._conn.info.transaction_status != pq.TransactionStatus.IDLE:
            self._conn.execute("ROLLBACK")

    def _bind(self, sql: str, params: Any) -> str:
        """``sql`` with ``params`` as the text of one statement: ``EXECUTE`` of its
        prepared form (prepared just before this batch the first time)."""
        if params is None:
            return sql
        known = self._prepared.names.get(sql) or self._preparing.get(sql)
        if known is None:
            name, order, prepare = self._prepared.prepare(sql)
            known = self._preparing[sql] = (name, order)
            self._prepare_sql.append(prepare)
        name, order = known
        values = [params[key] for key in order] if isinstance(params, dict) else list(params)
        if not values:
            return f"EXECUTE {name}"
        return self._binder.mogrify(
            f"EXECUTE {name}({', '.join(['%s'] * len(values))})", values)

    # ---------------------------------------------------------------- reads
    def get(self, task_id: str, *, lock: str = "") -> Task | None:
        """The live task as this transaction sees it; ``lock`` (a row-lock clause) holds
        its row until the transaction ends."""
        if task_id in self.puts:
            return self.puts[task_id]
        if task_id in self.dels:
            return None
        if task_id in self.rows and (not lock or task_id in self.locked.get(lock, ())):
            return self.rows[task_id]
        rows = self.query(f"SELECT data FROM tasks WHERE task_id = %s AND {_LIVE} {lock}",
                          (task_id,))
        task = stored_task(dict(rows[0][0])) if rows else None
        self.rows[task_id] = task
        if lock:
            self.locked.setdefault(lock, set()).add(task_id)
        if task is not None:
            self.stored.add(task_id)
        return task

    def lock(self, task_id: str) -> Task | None:
        """The live task with its row locked (FOR UPDATE) until the transaction ends."""
        return self.get(task_id, lock=_FOR_UPDATE)

    def dedup_holder(self, key: str) -> str | None:
        for task_id, task in self.puts.items():
            if task.get("dedup_key") == key:
                return task_id
        for task_id, in self.query(
                f"SELECT task_id FROM tasks WHERE dedup_key = %s AND {_LIVE}", (key,)):
            if task_id not in self.dels and task_id not in self.puts:
                return str(task_id)
        return None

    def waiters(self, task_id: str) -> list[Task]:
        """Queued tasks that name ``task_id`` in depends_on (locked)."""
        self.flush()
        out: list[Task] = []
        for (data,) in self.query(
                "SELECT data FROM tasks WHERE status = 'queued' AND depends_on @> %s::text[] "
                "ORDER BY task_id FOR UPDATE", ([task_id],)):
            self.rows[data["task_id"]] = stored_task(dict(data))
            self.stored.add(data["task_id"])
            self.locked.setdefault(_FOR_UPDATE, set()).add(data["task_id"])
            task = self.get(data["task_id"])
            if task:
                out.append(task)
        return out

    # ---------------------------------------------------------------- changes
    def put(self, task: Task, *, touch: bool = True) -> None:
        if touch:
            task["updated_at"] = self.now_iso
        self.dels.pop(task["task_id"], None)
        self.puts[task["task_id"]] = task

    def remove(self, task_id: str, status: str | None) -> None:
        self.puts.pop(task_id, None)
        self.dels[task_id] = status

    @property
    def changed(self) -> bool:
        return bool(self.written or self.puts or self.dels or self.history
                    or self.dead_letters or self.drop_dead)

    def event(self, event_type: str, message: str, task: Task | None = None,
              severity: str = "info", **data: Any) -> None:
        self.events.append(queue_event(event_type, message, task, severity=severity,
                                       now=self.now, data=data))

    def flush(self) -> None:
        """Write the overlay to the database (still inside the transaction): the writes
        join the batch, so they reach the server with the next statement that reads."""
        if not (self.puts or self.dels or self.history or self.dead_letters
                or self.drop_dead):
            return
        if self.dels:
            self.defer(f"DELETE FROM tasks WHERE task_id = ANY(%s::text[]) AND {_LIVE}",
                       (list(self.dels),))
            self.stored.difference_update(self.dels)
            for task_id in self.dels:
                self.rows[task_id] = None
        if self.drop_dead:
            self.defer("DELETE FROM tasks WHERE task_id = ANY(%s::text[]) AND dead",
                       (self.drop_dead,))
        if self.dead_letters:
            ids = [t["task_id"] for t in self.dead_letters]
            self.defer("DELETE FROM tasks WHERE task_id = ANY(%s::text[]) AND dead", (ids,))
            self._write(_INSERT, [_row(t) for t in self.dead_letters])
        updates = [t for i, t in self.puts.items() if i in self.stored]
        inserts = [t for i, t in self.puts.items() if i not in self.stored]
        if self.dels or self.drop_dead or self.dead_letters or inserts or self.history:
            self.wrote_other = True
        if updates:
            self._write(_UPDATE, [_row(t) for t in updates])
        if inserts:
            self._write(_INSERT, [_row(t) for t in inserts])
        if self.history:
            self._write(
                "INSERT INTO history (task_id, correlation_id, final, status, recorded_at, "
                "record) VALUES (%s, %s, %s, %s, %s, %s)",
                [(r["task_id"], r.get("correlation_id"), bool(r.get("final")), r["status"],
                  r["recorded_at"], Jsonb(r)) for r in self.history])
        for task_id, task in self.puts.items():
            self.rows[task_id] = task
            self.stored.add(task_id)
        self.puts, self.dels = {}, {}
        self.history, self.dead_letters, self.drop_dead = [], [], []
        self.written = True

    def _write(self, sql: str, rows: list[Any]) -> None:
        """One statement per row, into the batch (one round trip for them all)."""
        for row in rows:
            self.defer(sql, row)
