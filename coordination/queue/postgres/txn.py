"""One transaction of the PostgreSQL backend: the rows it reads, locks and writes.

:class:`_Txn` offers what the shared operations (:mod:`..ops`), policy (:mod:`..rules`)
and admission (:mod:`..admission`) need over one connection in one transaction: reads
that lock the rows they return (``FOR UPDATE`` / ``FOR KEY SHARE``), an overlay of this
transaction's changes (tasks put and removed, history records, dead letters, events),
and :meth:`_Txn.flush`, which writes the overlay before COMMIT. :class:`_Live` is the live
queue as the transaction sees it (:class:`..admission.LiveView`). The backend that runs
transactions (retries, COMMIT, side effects after it) is :mod:`.backend`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ... import clock
from ...events import Event
from ...tasks import PRIORITY_RANK, HistoryRecord, Task, stored_task
from .. import rules
from ..ops import queue_event

_LIVE = "status IN ('queued', 'running')"
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


class _Txn:
    """One transaction: changes are kept in ``puts`` / ``dels`` until :meth:`flush`."""

    def __init__(self, conn: psycopg.Connection[Any], now: float) -> None:
        self.conn = conn
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
        self._state = _Live(self)

    @property
    def state(self) -> _Live:
        return self._state

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
        row = self.conn.execute(
            f"SELECT data FROM tasks WHERE task_id = %s AND {_LIVE} {lock}",
            (task_id,)).fetchone()
        task = stored_task(dict(row[0])) if row else None
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
        for task_id, in self.conn.execute(
                f"SELECT task_id FROM tasks WHERE dedup_key = %s AND {_LIVE}", (key,)):
            if task_id not in self.dels and task_id not in self.puts:
                return str(task_id)
        return None

    def waiters(self, task_id: str) -> list[Task]:
        """Queued tasks that name ``task_id`` in depends_on (locked)."""
        self.flush()
        out: list[Task] = []
        for (data,) in self.conn.execute(
                "SELECT data FROM tasks WHERE status = 'queued' AND depends_on @> %s "
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
        """Write the overlay to the database (still inside the transaction)."""
        if not (self.puts or self.dels or self.history or self.dead_letters
                or self.drop_dead):
            return
        cur = self.conn.cursor()
        if self.dels:
            cur.execute(f"DELETE FROM tasks WHERE task_id = ANY(%s) AND {_LIVE}",
                        (list(self.dels),))
            self.stored.difference_update(self.dels)
            for task_id in self.dels:
                self.rows[task_id] = None
        if self.drop_dead:
            cur.execute("DELETE FROM tasks WHERE task_id = ANY(%s) AND dead",
                        (self.drop_dead,))
        if self.dead_letters:
            ids = [t["task_id"] for t in self.dead_letters]
            cur.execute("DELETE FROM tasks WHERE task_id = ANY(%s) AND dead", (ids,))
            _write(cur, _INSERT, [_row(t) for t in self.dead_letters])
        updates = [t for i, t in self.puts.items() if i in self.stored]
        inserts = [t for i, t in self.puts.items() if i not in self.stored]
        if updates:
            _write(cur, _UPDATE, [_row(t) for t in updates])
        if inserts:
            _write(cur, _INSERT, [_row(t) for t in inserts])
        if self.history:
            _write(
                cur, "INSERT INTO history (task_id, correlation_id, final, status, recorded_at, "
                "record) VALUES (%s, %s, %s, %s, %s, %s)",
                [(r["task_id"], r.get("correlation_id"), bool(r.get("final")), r["status"],
                  r["recorded_at"], Jsonb(r)) for r in self.history])
        for task_id, task in self.puts.items():
            self.rows[task_id] = task
            self.stored.add(task_id)
        self.puts, self.dels = {}, {}
        self.history, self.dead_letters, self.drop_dead = [], [], []
        self.written = True


def _write(cur: psycopg.Cursor[Any], sql: str, rows: list[Any]) -> None:
    """One statement per row; a single row (a claim, an enqueue, most completions) without
    executemany, whose pipeline setup costs more than the one round trip it saves."""
    if len(rows) == 1:
        cur.execute(sql, rows[0])
    else:
        cur.executemany(sql, rows)
