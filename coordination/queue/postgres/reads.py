"""The read side of the PostgreSQL backend: the port's queries that change nothing
(``get``, ``live_tasks``, ``dead_letters``, ``history_of``, ``history_since``,
``next_due``, ``stats``), mixed into :class:`~.backend.PostgresQueue`, whose connection
they use. Each is one statement, or one REPEATABLE READ snapshot (``stats``), so it sees
one consistent state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import psycopg

from ... import clock
from ...control import paused_types
from ...paths import Home
from ...tasks import PRIORITIES, PRIORITY_RANK, HistoryRecord, Task, stored_record, stored_task
from .. import admission
from .txn import _LIVE

RANK_NAME = {rank: name for name, rank in PRIORITY_RANK.items()}
#: The runnable condition of rules.is_runnable over rows: queued, due, no live
#: dependency, type not paused (and wanted, when given).
RUNNABLE = f"""
    t.status = 'queued'
    AND (t.not_before IS NULL OR t.not_before <= %(now)s)
    AND NOT (t.worker_type = ANY(%(paused)s::text[]))
    AND NOT EXISTS (SELECT 1 FROM tasks d
                    WHERE d.task_id = ANY(t.depends_on) AND d.{_LIVE})"""
#: The claim order of rules.claim_key, over rows.
CLAIM_ORDER = "ORDER BY priority_rank, created_at, task_id"


class PostgresReads:
    """The port's read methods over the backend's connection (the backend provides
    :meth:`_read`, :meth:`_snapshot` and :meth:`_control_state`)."""

    home: Home

    def _read(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _snapshot(self) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        raise NotImplementedError

    def _control_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def get(self, task_id: str) -> Task | None:
        """The live task, else its dead letter, else its newest final history record."""
        rows = self._read("SELECT data FROM tasks WHERE task_id = %s ORDER BY dead LIMIT 1",
                          (task_id,))
        if rows:
            return stored_task(dict(rows[0][0]))
        rows = self._read("SELECT record FROM history WHERE task_id = %s AND final "
                          "ORDER BY seq DESC LIMIT 1", (task_id,))
        return stored_record(dict(rows[0][0])) if rows else None

    def live_tasks(self, status: str | None = None) -> list[Task]:
        """Queued and running tasks (only ``status`` ones when given), in claim order; one
        statement, so a consistent view."""
        rows = self._read(f"SELECT data FROM tasks WHERE {_LIVE} AND (%(s)s::text IS NULL "
                          f"OR status = %(s)s::text) {CLAIM_ORDER}", {"s": status})
        return [stored_task(dict(r[0])) for r in rows]

    def dead_letters(self) -> list[Task]:
        """Every dead letter, oldest task id first."""
        return [stored_task(dict(r[0])) for r in self._read(
            "SELECT data FROM tasks WHERE dead ORDER BY task_id")]

    def history_of(self, task_id: str | None, *, correlation_id: str | None = None,
                   archives: bool = False) -> list[HistoryRecord]:
        """Every history record of ``task_id`` (or of ``correlation_id``), oldest first.
        The database keeps all history (no rotation yet), so ``archives`` adds nothing."""
        if (task_id is None) == (correlation_id is None):
            raise ValueError("give exactly one of task_id and correlation_id")
        column = "task_id" if task_id is not None else "correlation_id"
        rows = self._read(f"SELECT record FROM history WHERE {column} = %s ORDER BY seq",
                          (task_id if task_id is not None else correlation_id,))
        return [stored_record(dict(r[0])) for r in rows]

    def history_since(self, cursor: str | None, *, start_at: float | None = None,
                      limit: int | None = None) -> tuple[list[HistoryRecord], str]:
        """History records after ``cursor`` and the next cursor, ``"STREAM:SEQ"``: STREAM
        names this database (its oid: a recreated database is another stream, as a
        rotated file is for the file backend, and the supervisor, which compares streams,
        starts its window over), SEQ the last record returned. No cursor: from ``start_at`` (records
        recorded since) or the beginning. A cursor of another stream, or past the newest
        record, starts over from the beginning."""
        stream = self._history_stream()
        after = 0
        since: str | None = None
        if cursor:
            theirs, _, seq = cursor.rpartition(":")
            try:
                after = int(seq) if theirs == stream else 0
            except ValueError:
                after = 0
            if after and after > int(self._read(
                    "SELECT coalesce(max(seq), 0) FROM history")[0][0]):
                after = 0
        elif start_at is not None:
            since = clock.iso(start_at)
        rows = self._read(
            "SELECT seq, record FROM history WHERE seq > %(after)s AND (%(since)s::text IS "
            "NULL OR recorded_at >= %(since)s::text) ORDER BY seq LIMIT %(limit)s",
            {"after": after, "since": since, "limit": limit})
        last = int(rows[-1][0]) if rows else after
        return [stored_record(dict(r[1])) for r in rows], f"{stream}:{last}"

    _stream: str | None = None

    def _history_stream(self) -> str:
        if self._stream is None:
            # The database's oid: any role may read it (pg_control_system() needs more).
            row = self._read("SELECT oid FROM pg_database WHERE datname = current_database()")
            self._stream = f"pg.{row[0][0]}"
        return self._stream

    def next_due(self, *, types: Iterable[str] | None = None,
                 now: float | None = None) -> str | None:
        """The earliest future ``not_before`` of a queued task (see the port): one query."""
        now_iso = clock.iso(clock.now() if now is None else now)
        sql = ("SELECT min(not_before) FROM tasks WHERE status = 'queued' "
               "AND not_before IS NOT NULL AND not_before > %(now)s")
        params: dict[str, Any] = {"now": now_iso}
        if types is not None:
            sql += " AND worker_type = ANY(%(types)s)"
            params["types"] = sorted(set(types))
        rows = self._read(sql, params)  # one statement: one snapshot, one round trip
        return None if not rows or rows[0][0] is None else str(rows[0][0])

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """Counts by status and priority, runnable per type, oldest queued age, inbox and
        dead-letter sizes, revision (see the port); one snapshot of the database."""
        ts = clock.now() if now is None else now
        paused = sorted(paused_types(self._control_state(), ts))
        by_status = {"queued": 0, "running": 0}
        by_priority = {p: {"queued": 0, "running": 0} for p in PRIORITIES}
        with self._snapshot() as conn:
            dead = 0
            for status, rank, n in conn.execute(
                    "SELECT status, priority_rank, count(*) FROM tasks "
                    "GROUP BY status, priority_rank"):
                if status == "failed":
                    dead += int(n)
                    continue
                by_status[status] += int(n)
                by_priority[RANK_NAME[rank]][status] += int(n)
            runnable = {str(w): int(n) for w, n in conn.execute(
                f"SELECT t.worker_type, count(*) FROM tasks t WHERE {RUNNABLE} "
                "GROUP BY t.worker_type ORDER BY t.worker_type",
                {"now": clock.iso(ts), "paused": paused})}
            row = conn.execute("SELECT min(created_at) FROM tasks "
                               "WHERE status = 'queued'").fetchone()
            oldest = row[0] if row else None
            revision = self._revision(conn)
        return {
            "live": sum(by_status.values()), "by_status": by_status,
            "by_priority": by_priority, "runnable": sum(runnable.values()),
            "runnable_by_type": runnable,
            "inbox_pending": len(admission.inbox_names(self.home)), "dead_letters": dead,
            "oldest_queued_at": oldest,
            "oldest_queued_age_s": round(ts - clock.parse_iso(oldest), 3) if oldest else None,
            "revision": revision,
        }

    @staticmethod
    def _revision(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                           "FROM queue_revision").fetchone()
        return int(row[0]) if row else 0
