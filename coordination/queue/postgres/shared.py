"""What a postgres home shares in the database besides tasks and history
(docs/multi-host.md, "What lives where"):

- ``events``: the queue events of every host (each committed transaction's
  ``task_*`` / ``dlq_*`` events), inserted in the transaction that made the change, so the
  table holds exactly the committed changes, once each, in commit order (``seq``). Each
  host still appends the same events to its own dashboard-events.jsonl after COMMIT
  (``events tail -f``, emit-event.sh and jq keep working per host); events that are not
  about the queue (a worker's start, janitor_run, config, operator pauses) stay in the
  host's file only.
- ``control``: one row, the control state (pause, drain, circuits) in control.json's
  format (coordination/control.py), read and changed by every host. Every change sends
  ``NOTIFY harness_queue, 'control'``; a process that LISTENs (a worker, a supervisor)
  serves its reads from :data:`CONTROL_CACHE` until such a notification arrives.
- Retention (:func:`apply_retention`): the janitor's ``history_*`` and ``events_*`` line
  limits, applied as row counts.

``host_id`` names the host in ``events``: ``$HARNESS_HOST_ID``, else the hostname.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ... import clock
from ...config import load_system
from ...control import empty_control
from ...errors import CorruptFileError, DatabaseUnavailable, HarnessError
from ...events import Event
from ...hosts import host_id
from ...paths import Home
from ...redact import redact_url
from ..contract import RetentionReport

CHANNEL = "harness_queue"
#: The payload of the notification a control change sends (queue commits send their
#: revision number).
CONTROL_PAYLOAD = "control"
#: A cached control state is read again after this long whatever the notifications say:
#: the bound on staleness should a listener's connection die silently (no FIN: a
#: middlebox dropping an idle connection), where no notification and no error arrives.
CONTROL_CACHE_S = 10.0
#: Held (try-only) while one host applies retention: another host's janitor skips.
RETENTION_LOCK = 0x6861726F


_EVENTS_INSERT = ("INSERT INTO events (timestamp, type, host_id, task_id, event) "
                  "SELECT e->>'timestamp', e->>'type', %s, e->>'task_id', e "
                  "FROM jsonb_array_elements(%s) AS e")


def record_events(events: list[Event], *, then: str | None = None,
                  params: tuple[Any, ...] = ()) -> tuple[str, tuple[Any, ...]] | None:
    """The statement (and its parameters) that inserts ``events`` into the events table,
    to run inside the caller's open transaction (None: nothing to run). With ``then`` (a
    SELECT and its ``params``), in the same statement and round trip: the insert becomes
    a data-modifying WITH, which PostgreSQL runs whether or not the SELECT reads it."""
    if events and then is not None:
        return f"WITH recorded AS ({_EVENTS_INSERT}) {then}", (host_id(), Jsonb(events),
                                                              *params)
    if events:
        return _EVENTS_INSERT, (host_id(), Jsonb(events))
    if then is not None:
        return then, params
    return None


# ---------------------------------------------------------------------------- control
def parse_control(raw: Any, where: str) -> dict[str, Any]:
    """The control state from the stored JSON; CorruptFileError naming ``where``."""
    if not isinstance(raw, dict) or not isinstance(raw.get("paused_types", {}), dict):
        raise CorruptFileError(where, "must be an object with 'paused_types'")
    state = empty_control()
    state.update(raw)
    return state


def read_control_row(conn: psycopg.Connection[Any], where: str) -> dict[str, Any]:
    """The control row (the empty state when it is missing)."""
    row = conn.execute("SELECT state FROM control").fetchone()
    return empty_control() if row is None else parse_control(row[0], where)


class ControlCache:
    """The control state last read in this process, per database URL, served instead of a
    round trip while it is known current: a listener of this process (:mod:`.listen`)
    has been LISTENing since before it was read, has seen no ``control`` notification
    since, and it is younger than :data:`CONTROL_CACHE_S`.

    Why it is current: every control change notifies (:meth:`PostgresControl.update`,
    doctor's repair), and PostgreSQL delivers notifications in commit order, so a
    listener that has not seen one has not missed a change committed before the last
    notification it did see. The listener marks the state stale *before* it wakes its
    owner, so the step a wake-up starts reads anew. A change committed by another process
    moments ago may not have reached the listener yet: the read is then as of a moment
    earlier, as a read made then would have been, and the same notification wakes the
    owner to read again. A change made in this process is seen at once. Each bump of
    the epoch (a listener started or lost, a control notification, a change made here)
    invalidates the cached state. A worker reads the control state at every wake-up
    before it claims (its drain check): this saves that round trip."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, int] = {}  # url -> listeners LISTENing now
        self._epoch: dict[str, int] = {}
        self._state: dict[str, tuple[int, float, dict[str, Any]]] = {}

    def listening(self, url: str) -> None:
        """A listener of ``url`` has started LISTENing."""
        with self._lock:
            self._live[url] = self._live.get(url, 0) + 1
            self._bump(url)

    def lost(self, url: str) -> None:
        """A listener of ``url`` stopped LISTENing (stopped, or its connection failed)."""
        with self._lock:
            self._live[url] = max(0, self._live.get(url, 0) - 1)
            self._bump(url)

    def changed(self, url: str) -> None:
        """The control state of ``url`` changed (a notification, or a change made here)."""
        with self._lock:
            self._bump(url)

    def _bump(self, url: str) -> None:
        self._epoch[url] = self._epoch.get(url, 0) + 1
        self._state.pop(url, None)

    def epoch(self, url: str) -> int | None:
        """The epoch to pass to :meth:`put` for a read starting now (None: no listener,
        nothing may be cached)."""
        with self._lock:
            return self._epoch.get(url, 0) if self._live.get(url) else None

    def get(self, url: str) -> dict[str, Any] | None:
        """A copy of the current cached state, or None."""
        with self._lock:
            entry = self._state.get(url)
            if entry is None or not self._live.get(url) \
                    or entry[0] != self._epoch.get(url, 0) \
                    or time.monotonic() - entry[1] > CONTROL_CACHE_S:
                return None
            return copy.deepcopy(entry[2])

    def put(self, url: str, epoch: int | None, state: dict[str, Any]) -> None:
        """Keep ``state``, read after :meth:`epoch` returned ``epoch``, unless the epoch
        moved meanwhile."""
        with self._lock:
            if epoch is not None and self._live.get(url) \
                    and self._epoch.get(url, 0) == epoch:
                self._state[url] = (epoch, time.monotonic(), copy.deepcopy(state))


#: This process's :class:`ControlCache`.
CONTROL_CACHE = ControlCache()


class PostgresControl:
    """The control state of a postgres home (coordination/control.py's ``ControlStore``):
    one row, changed under its row lock and announced with ``NOTIFY harness_queue`` (a
    lifted pause wakes the workers of every host). One connection per process and URL."""

    _conns: dict[str, psycopg.Connection[Any]] = {}

    def __init__(self, home: Home) -> None:
        from .connect import database_url

        self.url = database_url(home)
        self.where = f"control table at {redact_url(self.url)}"

    def _conn(self) -> psycopg.Connection[Any]:
        from .connect import connect

        conn = self._conns.get(self.url)
        if conn is None or conn.closed or conn.broken:
            conn = self._conns[self.url] = connect(self.url, autocommit=True)
        return conn

    def read(self) -> dict[str, Any]:
        """The control state: from :data:`CONTROL_CACHE` while it is current there, else
        one round trip."""
        cached = CONTROL_CACHE.get(self.url)
        if cached is not None:
            return cached
        epoch = CONTROL_CACHE.epoch(self.url)  # before the read: a change during it wins
        try:
            state = read_control_row(self._conn(), self.where)
        except psycopg.OperationalError as exc:
            raise _unavailable(self.url, exc) from None
        CONTROL_CACHE.put(self.url, epoch, state)
        return state

    def update(self, change: Callable[[dict[str, Any]], None], now: float) -> dict[str, Any]:
        try:
            conn = self._conn()
            with conn.transaction():
                row = conn.execute("SELECT state FROM control FOR UPDATE").fetchone()
                state = empty_control() if row is None else parse_control(row[0], self.where)
                change(state)
                state["updated_at"] = clock.iso(now)
                conn.execute("INSERT INTO control (singleton, state, updated_at) "
                             "VALUES (true, %(s)s, %(at)s) ON CONFLICT (singleton) DO UPDATE "
                             "SET state = %(s)s, updated_at = %(at)s",
                             {"s": Jsonb(state), "at": state["updated_at"]})
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, CONTROL_PAYLOAD))
        except psycopg.OperationalError as exc:
            CONTROL_CACHE.changed(self.url)  # committed or not: read it anew
            raise _unavailable(self.url, exc) from None
        CONTROL_CACHE.changed(self.url)  # seen here at once, not when the NOTIFY arrives
        return state


def _unavailable(url: str, exc: Exception) -> DatabaseUnavailable:
    detail = str(exc).strip().replace("\n", " ")
    return DatabaseUnavailable(f"PostgreSQL at {redact_url(url)}: {detail}")


# ---------------------------------------------------------------------------- retention
#: Final records of completed tasks that a queued task names in depends_on: admission and
#: the cascade read them, so retention keeps them whatever their age.
_NEEDED = ("h.final AND h.status = 'completed' AND EXISTS (SELECT 1 FROM tasks t "
           "WHERE t.status = 'queued' AND t.depends_on @> ARRAY[h.task_id::text])")


def apply_retention(conn: psycopg.Connection[Any], home: Home, *, dry_run: bool,
                    ) -> RetentionReport:
    """Trim ``history`` to its newest ``history_keep_lines`` rows once it holds more than
    ``history_max_lines`` (keeping what :data:`_NEEDED` says), and ``events`` likewise
    with ``events_*``; one transaction, skipped when another host is at it. A dry run
    counts what it would delete."""
    values = load_system(home).values
    report = RetentionReport(summary={"trimmed": [], "skipped": []})
    tables = (("history", "h", _NEEDED), ("events", "e", "false"))
    try:
        with conn.transaction():
            got = conn.execute("SELECT pg_try_advisory_xact_lock(%s)",
                               (RETENTION_LOCK,)).fetchone()
            if not got or not got[0]:
                report.summary["skipped"].append("database retention: another host is "
                                                 "applying it now")
                return report
            for table, alias, keep in tables:
                max_rows = int(values[f"{table}_max_lines"])
                keep_rows = int(values[f"{table}_keep_lines"])
                row = conn.execute(f"SELECT count(*), coalesce(max(seq), 0) FROM {table}"
                                   ).fetchone()
                count, newest = (int(row[0]), int(row[1])) if row else (0, 0)
                if count <= max_rows:
                    continue
                edge = conn.execute(f"SELECT seq FROM {table} ORDER BY seq DESC "
                                    "OFFSET %s LIMIT 1", (max(keep_rows - 1, 0),)).fetchone()
                cut = newest + 1 if keep_rows == 0 or edge is None else int(edge[0])
                where = f"FROM {table} {alias} WHERE {alias}.seq < %s AND NOT ({keep})"
                if dry_run:
                    deleted = int(conn.execute(f"SELECT count(*) {where}", (cut,)
                                               ).fetchone()[0])  # type: ignore[index]
                else:
                    deleted = conn.execute(f"DELETE {where}", (cut,)).rowcount
                report.summary["trimmed"].append({
                    "table": table, "rows_deleted": deleted, "kept_rows": count - deleted,
                    "reason": f"{count} rows > {table}_max_lines {max_rows}"})
    except psycopg.OperationalError as exc:
        report.errors.append(_unavailable(str(conn.info.dsn), exc))
    except psycopg.Error as exc:
        report.errors.append(HarnessError(f"database retention: {exc}".strip()))
    return report
