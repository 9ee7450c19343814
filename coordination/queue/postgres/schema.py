"""The postgres backend's schema, as versioned migrations (docs/multi-host.md, "Schema").

``schema_version`` holds one row per applied migration. :func:`migrate` applies the missing
ones in one transaction under an advisory lock (two hosts migrating at once: one does the
work, the other finds nothing to do). Code meets a database through :func:`require_current`:
no schema, an older one (run ``harness db migrate``) and a newer one than :data:`MIGRATIONS`
knows (upgrade harness) are each a SchemaVersionError, and nothing is written.

Text columns that order or compare (task ids, timestamps) use the "C" collation: byte order,
as the file backend's Python string comparison (rules.claim_key, rules.is_runnable).
"""

from __future__ import annotations

from typing import Any

import psycopg

from ... import clock
from ...errors import SchemaVersionError
from ...redact import redact_url
from .connect import connect

#: Held while migrating (any constant: it names harness's migration in pg_locks).
MIGRATE_LOCK = 0x6861726E  # "harn"

_V1 = """
CREATE TABLE tasks (
    task_id       text COLLATE "C" NOT NULL,
    status        text NOT NULL CHECK (status IN ('queued', 'running', 'failed')),
    dead          boolean GENERATED ALWAYS AS (status = 'failed') STORED,
    priority_rank smallint NOT NULL,
    created_at    text COLLATE "C" NOT NULL,
    not_before    text COLLATE "C",
    worker_type   text NOT NULL,
    worker_id     text,
    dedup_key     text,
    depends_on    text[] NOT NULL DEFAULT '{}',
    data          jsonb NOT NULL,
    PRIMARY KEY (task_id, dead)
);
COMMENT ON TABLE tasks IS 'harness: live tasks (queued, running) and dead letters (failed)';
CREATE INDEX tasks_claim ON tasks (priority_rank, created_at, task_id)
    WHERE status = 'queued';
CREATE UNIQUE INDEX tasks_dedup ON tasks (dedup_key)
    WHERE dedup_key IS NOT NULL AND status IN ('queued', 'running');
CREATE INDEX tasks_waiting ON tasks USING gin (depends_on) WHERE status = 'queued';
CREATE INDEX tasks_running ON tasks (worker_id) WHERE status = 'running';
CREATE TABLE history (
    seq            bigserial PRIMARY KEY,
    task_id        text COLLATE "C" NOT NULL,
    correlation_id text,
    final          boolean NOT NULL,
    status         text NOT NULL,
    recorded_at    text COLLATE "C" NOT NULL,
    record         jsonb NOT NULL
);
COMMENT ON TABLE history IS 'harness: one record per attempt outcome, append-only';
CREATE INDEX history_task ON history (task_id, seq);
CREATE INDEX history_correlation ON history (correlation_id, seq)
    WHERE correlation_id IS NOT NULL;
CREATE INDEX history_recorded ON history (recorded_at);
CREATE SEQUENCE queue_revision;
COMMENT ON SEQUENCE queue_revision IS 'harness: one value per committed queue change';
"""

#: Leases and hosts (docs/coordination.md, "Leases and hosts"): the claim's host and lease
#: end as columns (the supervisor of every host looks up expired leases by index), and
#: the worker registry, written by every heartbeat.
_V2 = """
ALTER TABLE tasks ADD COLUMN host_id text, ADD COLUMN lease_until text COLLATE "C";
UPDATE tasks SET host_id = data->>'host_id', lease_until = data->>'lease_until'
    WHERE status = 'running';
CREATE INDEX tasks_lease ON tasks (lease_until) WHERE status = 'running';
CREATE TABLE workers (
    worker_id    text COLLATE "C" PRIMARY KEY,
    host_id      text NOT NULL,
    pid          integer,
    heartbeat_at text COLLATE "C" NOT NULL
);
COMMENT ON TABLE workers IS 'harness: worker registry, one row per worker, written by heartbeats';
"""

#: The shared events table and control state (docs/multi-host.md).
_V3 = """
CREATE TABLE events (
    seq       bigserial PRIMARY KEY,
    timestamp text COLLATE "C" NOT NULL,
    type      text NOT NULL,
    host_id   text NOT NULL,
    task_id   text COLLATE "C",
    event     jsonb NOT NULL
);
COMMENT ON TABLE events IS 'harness: the queue events of every host, in commit order';
CREATE INDEX events_task ON events (task_id, seq) WHERE task_id IS NOT NULL;
CREATE TABLE control (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    state      jsonb NOT NULL,
    updated_at text
);
COMMENT ON TABLE control IS 'harness: control state shared by every host (pause, drain, circuits)';
INSERT INTO control (state) VALUES
    ('{"version": 1, "updated_at": null, "paused_types": {},
       "drain": {"all": null, "instances": {}}}');
"""

#: (description, SQL) in order; version N is MIGRATIONS[N - 1]. Append, never edit.
MIGRATIONS: tuple[tuple[str, str], ...] = (
    ("tasks, history and the revision sequence", _V1),
    ("leases: tasks.host_id, tasks.lease_until (indexed), the workers registry", _V2),
    ("the shared events table and control state", _V3),
)
SCHEMA_VERSION = len(MIGRATIONS)

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  text NOT NULL
)"""


def current_version(conn: psycopg.Connection[Any]) -> int | None:
    """The newest applied migration; None when the database has no harness schema."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    got = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(got[0]) if got and got[0] is not None else None


def require_current(conn: psycopg.Connection[Any], url: str) -> int:
    """The schema version, when it is the one this code knows; SchemaVersionError else."""
    version = current_version(conn)
    where = redact_url(url)
    if version is None:
        raise SchemaVersionError(f"{where} has no harness schema: run `harness db migrate` "
                                 "(or `harness init --backend postgres`)")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has harness schema version {version}, newer than this harness knows "
            f"({SCHEMA_VERSION}): upgrade harness on this host; nothing was changed")
    if version < SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has harness schema version {version}, this harness needs "
            f"{SCHEMA_VERSION}: run `harness db migrate`")
    return version


def status(url: str) -> dict[str, Any]:
    """What ``harness db status`` reports: the applied migrations and the pending ones."""
    with connect(url) as conn:
        version = current_version(conn)
        applied: list[dict[str, Any]] = []
        if version is not None:
            applied = [{"version": v, "description": d, "applied_at": a}
                       for v, d, a in conn.execute(
                           "SELECT version, description, applied_at FROM schema_version "
                           "ORDER BY version")]
    known = SCHEMA_VERSION
    current = version or 0
    return {
        "database_url": redact_url(url), "version": current, "known": known,
        "applied": applied,
        "pending": [{"version": n, "description": MIGRATIONS[n - 1][0]}
                    for n in range(current + 1, known + 1)],
        "state": "newer" if current > known else "current" if current == known
        else "empty" if version is None else "behind",
    }


def migrate(url: str) -> tuple[int, int]:
    """Apply every missing migration in one transaction; returns (version before, after).
    SchemaVersionError, with nothing changed, when the database is newer than this code."""
    with connect(url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        before = current_version(conn) or 0
        if before > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{redact_url(url)} has harness schema version {before}, newer than this "
                f"harness knows ({SCHEMA_VERSION}): upgrade harness; nothing was changed")
        if before == SCHEMA_VERSION:
            return before, before  # no DDL: a least-privilege role may "migrate" a current one
        try:
            conn.execute(_VERSION_TABLE)
            for number in range(before + 1, SCHEMA_VERSION + 1):
                description, sql = MIGRATIONS[number - 1]
                conn.execute(sql)
                conn.execute("INSERT INTO schema_version (version, description, applied_at) "
                             "VALUES (%s, %s, %s)",
                             (number, description, clock.iso(clock.now())))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SchemaVersionError(
                f"{redact_url(url)}: this role may not change the schema ({exc}); run "
                "`harness db migrate` as the database's owner; nothing was changed") from None
    return before, SCHEMA_VERSION


#: What a role that runs harness (daemons, CLI, janitor) needs on a migrated database, and
#: nothing more: no DDL, no ownership (migrations run as the schema's owner). ``{role}``
#: and ``{database}`` are quoted identifiers. Sequences: USAGE for nextval (new history
#: and event rows, the revision), SELECT for reading queue_revision.
APP_GRANTS = """\
GRANT CONNECT ON DATABASE {database} TO {role};
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT ON schema_version TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON tasks, control, workers TO {role};
GRANT SELECT, INSERT, DELETE ON history, events TO {role};
GRANT USAGE, SELECT ON SEQUENCE queue_revision, history_seq_seq, events_seq_seq TO {role};
"""


def grants_sql(role: str, database: str) -> str:
    """:data:`APP_GRANTS` for ``role`` on ``database``, identifiers quoted."""
    from psycopg import sql

    def ident(name: str) -> str:
        return sql.Identifier(name).as_string(None)
    return APP_GRANTS.format(role=ident(role), database=ident(database))
