"""The postgres backend's part of ``harness doctor``: its own invariants.

- ``schema_version``: the database's harness schema is the one this code knows (checked
  when the queue opens; reported here for the record).
- ``running_without_worker``: a running row with no worker id can never be completed;
  repair requeues it through ``fail`` with no owner check (the attempt counts).
- ``orphaned_waiter``: a queued task whose dependency is neither live nor completed (the
  cascade should have cancelled it; a row edited by hand can leave one); repair cancels it.
- ``dead_letter_status``: a dead row whose task does not say ``failed``.
- ``view_missing`` / ``view_stale``: the jq view task-queue.json is absent or shows an
  older revision; repair republishes it.
- ``inbox_pending``: requests wait in this host's inbox; repair ingests them.
- ``lease_expired``: a running task whose lease ended (:mod:`..leases`, shared with the
  file backend).
- ``orphaned_worker_row``: a ``workers`` row whose heartbeat is older than
  ``heartbeat_timeout_s`` and whose worker holds no running task (it exited or died);
  repair deletes it.
- ``live_and_dead``: a task that is both live and a dead letter (two rows: only a hand
  edit makes one); repair deletes the dead letter (the live task is the newer state).
- ``control_row``: the shared control row is missing or unreadable (claims then read
  the empty state: nothing paused); repair writes the empty state in its place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg.types.json import Jsonb

from ... import clock
from ...config import load_system
from ...control import empty_control
from ...errors import CorruptFileError
from .. import admission
from ..contract import Findings, QueueFinding
from ..leases import check_leases
from .schema import SCHEMA_VERSION, current_version
from .shared import CHANNEL, CONTROL_CACHE, CONTROL_PAYLOAD, parse_control

if TYPE_CHECKING:
    from .backend import PostgresQueue


def check_queue(queue: PostgresQueue, *, repair: bool, now: float) -> list[QueueFinding]:
    home = queue.home
    out = Findings()
    add = out.add

    with queue._mutex:
        version = current_version(queue._connection())
    add("info", "schema_version", f"database schema version {version} (this harness knows "
        f"{SCHEMA_VERSION})")
    for (task_id,) in queue._read("SELECT task_id FROM tasks WHERE status = 'running' "
                                  "AND worker_id IS NULL ORDER BY task_id"):
        f = add("error", "running_without_worker", f"task {task_id} is running with no "
                "worker_id: nobody can finish it")
        if repair:
            queue.fail(task_id, None, error="doctor: running without a worker",
                       outcome="reclaimed", now=now)
            f.repaired = True
    orphans = queue._read(
        "SELECT t.task_id, d.dep FROM tasks t, unnest(t.depends_on) AS d(dep) "
        "WHERE t.status = 'queued' "
        "AND NOT EXISTS (SELECT 1 FROM tasks l WHERE l.task_id = d.dep "
        "                AND l.status IN ('queued', 'running')) "
        "AND NOT EXISTS (SELECT 1 FROM history h WHERE h.task_id = d.dep AND h.final "
        "                AND h.status = 'completed') ORDER BY t.task_id")
    for task_id, dep in orphans:
        f = add("error", "orphaned_waiter", f"task {task_id} waits for {dep}, which is "
                "neither live nor completed: it can never run")
        if repair:
            queue.cancel(task_id, reason=f"dependency {dep} is neither live nor completed "
                         "(doctor)", now=now)
            f.repaired = True
    for (task_id,) in queue._read("SELECT task_id FROM tasks WHERE dead "
                                  "AND data->>'status' <> 'failed' ORDER BY task_id"):
        add("error", "dead_letter_status", f"dead letter {task_id} does not say status "
            "failed")
    check_leases(queue, out, repair=repair, now=now)
    cutoff = clock.iso(now - float(load_system(home).values["heartbeat_timeout_s"]))
    for worker_id, host, beat in queue._read(
            "SELECT w.worker_id, w.host_id, w.heartbeat_at FROM workers w "
            "WHERE w.heartbeat_at < %s AND NOT EXISTS (SELECT 1 FROM tasks t "
            "WHERE t.status = 'running' AND t.worker_id = w.worker_id) "
            "ORDER BY w.worker_id", (cutoff,)):
        f = add("info", "orphaned_worker_row", f"worker {worker_id} on host {host} last "
                f"heartbeat at {beat} and holds no task: it is gone")
        if repair:
            queue._read("DELETE FROM workers WHERE worker_id = %s AND heartbeat_at = %s "
                        "RETURNING worker_id", (worker_id, beat))
            f.repaired = True
    revision = queue.stats(now)["revision"]
    shown = queue.view_revision()
    if not home.queue_file.exists() or shown is None:
        f = add("warning", "view_missing", "task-queue.json (the jq view) is missing or "
                "unreadable", home.queue_file)
        if repair:
            queue.sync()
            f.repaired = True
    elif shown < revision:
        f = add("info", "view_stale", f"task-queue.json shows revision {shown}, the database "
                f"is at {revision} (jq recipes read an older queue until it is republished)",
                home.queue_file)
        if repair:
            queue.sync()
            f.repaired = True
    for (task_id,) in queue._read("SELECT l.task_id FROM tasks l JOIN tasks d USING (task_id) "
                                  "WHERE d.dead AND l.status IN ('queued', 'running') "
                                  "ORDER BY l.task_id"):
        f = add("error", "live_and_dead", f"task {task_id} is both live and a dead letter")
        if repair:
            queue.purge_dead([task_id])
            f.repaired = True
    rows = queue._read("SELECT state FROM control")
    problem = "is missing" if not rows else None
    if rows:
        try:
            parse_control(rows[0][0], "control table")
        except CorruptFileError as exc:
            problem = f"is unreadable: {exc}"
    if problem:
        f = add("error", "control_row", f"the shared control state (table control) {problem}; "
                "claims read it as nothing paused or drained")
        if repair:
            with queue._mutex, queue._connection().transaction():
                queue._connection().execute("DELETE FROM control")
                queue._connection().execute("INSERT INTO control (state) VALUES (%s)",
                                            (Jsonb(empty_control()),))
                # Every control change notifies (shared.ControlCache relies on it).
                queue._connection().execute("SELECT pg_notify(%s, %s)",
                                            (CHANNEL, CONTROL_PAYLOAD))
            CONTROL_CACHE.changed(queue.url)
            f.repaired = True
    names = admission.inbox_names(home)
    if names:
        f = add("info", "inbox_pending", f"{len(names)} task request(s) wait in the inbox for "
                "the next queue operation", home.inbox)
        if repair:
            queue.ingest(now=now)
            f.repaired = True
    return out
