"""What only the postgres backend does: migrations, LISTEN/NOTIFY, concurrent claims over
separate connections, fencing across hosts, the jq view, its doctor checks, URL handling.

The contract suite (tests/test_queue_contract.py) and the model test already run on this
backend; each test here gets its own database on the session's throwaway cluster
(tests/pg_cluster.py).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from helpers import T0, make_home, present, req

from coordination.errors import (
    EXIT_TEMPFAIL,
    DatabaseUnavailable,
    InvalidTransition,
    SchemaVersionError,
)
from coordination.paths import Home
from coordination.queue import open_queue
from coordination.queue.file.snapshot import parse
from coordination.queue.postgres import PostgresQueue
from coordination.queue.postgres.connect import ENV_URL
from coordination.queue.postgres.schema import SCHEMA_VERSION, migrate, status
from coordination.queue.rules import lease_token
from coordination.redact import redact_url
from daemons.cli import cli

#: A port nothing listens on (reserved, never bound here): connection refused at once.
REFUSED_URL = "postgresql://harness:hunter2secret@127.0.0.1:9/harness"


def _with_password(url: str, password: str) -> str:
    """``url`` with a password in it (trust authentication ignores it)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@")


# ------------------------------------------------------------------------------ migrations
def test_migrate_and_status_on_an_empty_database(pg_database: Callable[..., str]) -> None:
    url = pg_database(template=None)
    before = status(url)
    assert before["state"] == "empty" and before["version"] == 0
    assert [p["version"] for p in before["pending"]] == list(range(1, SCHEMA_VERSION + 1))
    assert migrate(url) == (0, SCHEMA_VERSION)
    assert migrate(url) == (SCHEMA_VERSION, SCHEMA_VERSION)  # nothing left to do
    after = status(url)
    assert after["state"] == "current" and after["pending"] == []
    assert [a["version"] for a in after["applied"]] == list(range(1, SCHEMA_VERSION + 1))


def test_a_database_without_schema_is_refused_with_the_fix(tmp_path: Path,
                                                           pg_database: Callable[..., str],
                                                           ) -> None:
    home = make_home(tmp_path, queue_backend="postgres",
                     database_url=pg_database(template=None))
    with pytest.raises(SchemaVersionError, match="harness db migrate"):
        PostgresQueue(home)


def test_a_newer_schema_is_refused_and_left_alone(
        pg_home_factory: Callable[..., Home]) -> None:
    home = pg_home_factory()
    queue = PostgresQueue(home)
    queue.enqueue(req(task_id="keep"), now=T0)
    queue.close()
    url = _url_of(home)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version VALUES (%s, 'from the future', 'x')",
                     (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaVersionError, match="newer than this harness knows"):
        PostgresQueue(home)
    with pytest.raises(SchemaVersionError, match="newer"):
        migrate(url)
    assert status(url)["state"] == "newer"
    result = CliRunner().invoke(cli, ["--home", str(home.root), "db", "migrate"])
    assert result.exit_code == 1 and "upgrade harness" in result.output
    result = CliRunner().invoke(cli, ["--home", str(home.root), "task", "list"])
    assert result.exit_code == 1 and "newer than this harness knows" in result.output
    with psycopg.connect(url, autocommit=True) as conn:  # nothing was changed
        row = conn.execute("SELECT count(*) FROM tasks").fetchone()
        assert row is not None and row[0] == 1


def test_cli_init_with_postgres_backend_creates_home_and_schema(
        tmp_path: Path, pg_database: Callable[..., str]) -> None:
    url = pg_database(template=None)
    root = tmp_path / "h"
    result = CliRunner().invoke(cli, ["--home", str(root), "init", "--backend", "postgres",
                                      "--database-url", url, "--json"])
    assert result.exit_code == 0, result.output
    system = json.loads((root / "coordination/config/system.json").read_text())
    assert system["queue_backend"] == "postgres" and system["database_url"] == url
    assert status(url)["state"] == "current"
    result = CliRunner().invoke(cli, ["--home", str(root), "db", "status", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["state"] == "current"
    added = CliRunner().invoke(cli, ["--home", str(root), "task", "add", "--json", "--",
                                     "true"])
    assert added.exit_code == 0, added.output
    task_id = json.loads(added.output)["task_id"]
    assert present(open_queue(Home(root), shared=False).get(task_id))["status"] == "queued"
    # Asking for another backend over the kept config is an error, not a silent no-op.
    again = CliRunner().invoke(cli, ["--home", str(root), "init", "--backend", "file"])
    assert again.exit_code == 2 and "--force" in again.output


# ------------------------------------------------------------------------------ URL handling
def test_env_var_overrides_database_url(tmp_path: Path, pg_database: Callable[..., str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home(tmp_path, queue_backend="postgres", database_url=REFUSED_URL)
    with pytest.raises(DatabaseUnavailable):
        PostgresQueue(home)
    monkeypatch.setenv(ENV_URL, pg_database())
    queue = PostgresQueue(home)
    assert queue.enqueue(req(), now=T0).created


def test_connection_refused_is_exit_75_with_the_password_redacted(tmp_path: Path) -> None:
    home = make_home(tmp_path, queue_backend="postgres", database_url=REFUSED_URL)
    with pytest.raises(DatabaseUnavailable) as info:
        PostgresQueue(home)
    assert info.value.exit_code == EXIT_TEMPFAIL
    assert "hunter2secret" not in str(info.value)
    assert "postgresql://harness:[redacted]@127.0.0.1:9/harness" in str(info.value)
    for args in (["task", "list"], ["status"], ["db", "status"], ["task", "add", "--", "true"]):
        result = CliRunner().invoke(cli, ["--home", str(home.root), *args])
        assert result.exit_code == EXIT_TEMPFAIL, (args, result.output)
        assert "hunter2secret" not in result.output
        assert "cannot connect to PostgreSQL" in result.output


def test_password_is_redacted_wherever_the_url_is_shown(
        tmp_path: Path, pg_database: Callable[..., str]) -> None:
    url = _with_password(pg_database(), "s3cr3t-pw")
    assert "s3cr3t-pw" not in redact_url(url)
    assert redact_url("host=db password=pw user=x") == "host=db password=[redacted] user=x"
    home = make_home(tmp_path, queue_backend="postgres", database_url=url)
    queue = PostgresQueue(home)
    assert "s3cr3t-pw" not in repr(queue)
    for args in (["db", "status"], ["db", "status", "--json"], ["db", "migrate"]):
        result = CliRunner().invoke(cli, ["--home", str(home.root), *args])
        assert result.exit_code == 0, result.output
        assert "s3cr3t-pw" not in result.output and "[redacted]" in result.output


# ------------------------------------------------------------------------------ wake-ups
def test_listen_notify_wakes_a_waiter_on_another_connection(
        pg_home_factory: Callable[..., Home]) -> None:
    home = pg_home_factory()
    waiter, producer = PostgresQueue(home), PostgresQueue(home)
    woke = threading.Event()
    stop = waiter.on_change(woke.set)
    try:
        producer.enqueue(req(), now=T0)
        assert woke.wait(1.0), "no wake-up within 1 s of the commit"
    finally:
        stop()
    # wait() returns True when a commit lands while it blocks.
    timer = threading.Timer(0.2, lambda: producer.enqueue(req(), now=T0))
    timer.start()
    try:
        assert waiter.wait(5.0) is True
    finally:
        timer.join()
    assert waiter.wait(0.05) is False  # nothing committed: it times out


# ------------------------------------------------------------------------------ concurrency
def test_concurrent_claimers_never_get_the_same_task(
        pg_home_factory: Callable[..., Home]) -> None:
    home = pg_home_factory()
    PostgresQueue(home).enqueue_batch([req(task_id=f"t{i:03d}") for i in range(120)], now=T0)
    got: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def claimer(name: str) -> None:
        queue = PostgresQueue(home)  # its own connection, as another process or host
        mine: list[str] = []
        try:
            start.wait()
            while (task := queue.claim(name, now=T0 + 1)) is not None:
                mine.append(task["task_id"])
                if len(mine) % 2:
                    queue.complete(task["task_id"], name, now=T0 + 2)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            got[name] = mine
            queue.close()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    claimed = [t for ids in got.values() for t in ids]
    assert len(claimed) == len(set(claimed)) == 120
    assert sum(1 for ids in got.values() if ids) >= 2, "one claimer took everything"


def test_a_stale_lease_from_another_host_is_fenced(
        pg_home_factory: Callable[..., Home]) -> None:
    """Host A's worker claims, then stalls past its lease (as under SIGSTOP); host B
    reclaims the task and the same worker id claims it again after a restart. A's late
    completion with its old lease is refused; B's attempt is untouched."""
    home = pg_home_factory(retry_backoff_base_s=0)
    host_a, host_b = PostgresQueue(home), PostgresQueue(home)
    first = host_a.enqueue(req(max_attempts=3), now=T0).task
    claimed = host_a.claim("w1", now=T0)
    assert claimed is not None
    stale = lease_token(claimed)
    assert host_b.reclaim(first["task_id"], reason="lease expired", worker_id="w1",
                          now=T0 + 30) is not None
    again = host_b.claim("w1", now=T0 + 31)
    assert again is not None and lease_token(again) != stale
    with pytest.raises(InvalidTransition, match="lease lost"):
        host_a.complete(first["task_id"], "w1", lease=stale, now=T0 + 32)
    with pytest.raises(InvalidTransition, match="lease lost"):
        host_a.fail(first["task_id"], "w1", error="late", lease=stale, now=T0 + 32)
    current = host_b.get(first["task_id"])
    assert current is not None and current["status"] == "running"
    assert current["attempts"] == 2
    assert host_b.complete(first["task_id"], "w1", lease=lease_token(again),
                           now=T0 + 33)["status"] == "completed"


# ------------------------------------------------------------------------------ jq view, doctor
def test_sync_writes_the_jq_view_in_the_file_backends_format(
        pg_home_factory: Callable[..., Home]) -> None:
    home = pg_home_factory()
    queue = PostgresQueue(home)
    queue.enqueue_batch([req(task_id="a", priority="low"), req(task_id="b")], now=T0)
    queue.claim("w1", now=T0 + 1)
    queue.sync()
    snap = parse(home.queue_file)
    assert snap is not None and snap.body_start > 0  # the published layout, line per task
    assert snap.revision == queue.stats()["revision"]
    assert {t["task_id"]: t for t, _ in snap.tasks()} == \
        {t["task_id"]: t for t in queue.live_tasks()}
    raw = json.loads(home.queue_file.read_text())  # plain JSON for jq
    assert sorted(t["status"] for t in raw["tasks"]) == ["queued", "running"]


def test_check_reports_and_repairs_view_and_orphaned_rows(
        pg_home_factory: Callable[..., Home]) -> None:
    home = pg_home_factory()
    queue = PostgresQueue(home)
    queue.enqueue(req(task_id="parent"), now=T0)
    queue.enqueue(req(task_id="child", depends_on=["parent"]), now=T0)
    queue.sync()
    with psycopg.connect(_url_of(home), autocommit=True) as conn:  # a hand-deleted row
        conn.execute("DELETE FROM tasks WHERE task_id = 'parent'")
    queue.enqueue(req(task_id="other"), now=T0)
    codes = {f.code: f for f in queue.check(now=T0)}
    assert codes["schema_version"].level == "info"
    assert codes["orphaned_waiter"].level == "error"
    assert codes["view_stale"].level == "info"
    repaired = {f.code: f for f in queue.check(repair=True, now=T0)}
    assert repaired["orphaned_waiter"].repaired and repaired["view_stale"].repaired
    assert {t["task_id"] for t in queue.live_tasks()} == {"other"}
    remaining = {f.code for f in queue.check(now=T0)}
    assert remaining == {"schema_version"}
    home.queue_file.unlink()
    assert "view_missing" in {f.code for f in queue.check(now=T0)}


def test_heartbeats_keep_the_worker_registry_and_doctor_checks_leases(
        pg_home_factory: Callable[..., Home], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every heartbeat upserts the worker's row (host, pid, time), with or without a task,
    and notifies nobody; doctor reports a running task past its lease (repair reclaims it
    through the fenced reclaim) and a stale row of a worker holding no task (repair deletes
    it); forget_worker drops a row."""
    import os

    monkeypatch.setenv("HARNESS_HOST_ID", "h9")
    home = pg_home_factory(heartbeat_timeout_s=30, retry_backoff_base_s=0)
    queue = PostgresQueue(home)
    task = queue.enqueue(req(max_attempts=3), now=T0).task
    claimed = queue.claim("w1", now=T0)
    assert claimed is not None and claimed["lease_token"] is not None
    revision = queue.stats(T0)["revision"]
    woken = threading.Event()
    stop = queue.on_change(woken.set)
    try:
        queue.heartbeat("w1", {task["task_id"]: claimed["lease_token"]}, now=T0 + 5)
        queue.heartbeat("w2", {}, now=T0 + 6)
        assert not woken.wait(0.3)  # a heartbeat makes nothing claimable
    finally:
        stop()
    assert queue.stats(T0)["revision"] > revision  # but it is a commit (the view's rev)
    rows = queue._read("SELECT worker_id, host_id, pid, heartbeat_at FROM workers "
                       "ORDER BY worker_id")
    assert rows == [("w1", "h9", os.getpid(), "2023-11-14T22:13:25.000Z"),
                    ("w2", "h9", os.getpid(), "2023-11-14T22:13:26.000Z")]
    codes = {f.code: f for f in queue.check(now=T0 + 40)}
    assert codes["lease_expired"].level == "warning"
    assert "orphaned_worker_row" in codes  # w2: stale and holding nothing
    assert {f.code for f in queue.check(now=T0 + 20)} & {"lease_expired",
                                                          "orphaned_worker_row"} == set()
    repaired = {f.code: f for f in queue.check(repair=True, now=T0 + 40)}
    assert repaired["lease_expired"].repaired and repaired["orphaned_worker_row"].repaired
    assert present(queue.get(task["task_id"]))["status"] == "queued"
    # w1 held nothing once its task was reclaimed: its stale row went too.
    assert queue._read("SELECT worker_id FROM workers") == []
    queue.heartbeat("w3", {}, now=T0 + 41)
    queue.forget_worker("w3")
    assert queue._read("SELECT worker_id FROM workers") == []


def _url_of(home: Home) -> str:
    url: Any = json.loads(home.system_config.read_text())["database_url"]
    return str(url)


def test_claim_plan_walks_the_claim_index_even_with_stale_statistics(
        pg_home_factory: Callable[..., Home]) -> None:
    """Right after a burst of enqueues (statistics not yet analysed) the claim must still
    read tasks_claim in order and stop at the first runnable row, never sort the backlog:
    its cost must not grow with the queue. Checked on the plan, not on a timing."""
    from coordination.queue.postgres.backend import _CLAIM, _CLAIM_SETTINGS

    home = pg_home_factory(max_queue_depth=10_000)
    queue = PostgresQueue(home)
    queue.enqueue_batch([req(priority="low") for _ in range(3000)], now=T0)
    conn = queue._connection()
    for generic in (False, True):
        with conn.transaction():
            conn.execute(_CLAIM_SETTINGS)
            conn.execute("SET LOCAL plan_cache_mode = "
                         + ("force_generic_plan" if generic else "force_custom_plan"))
            plan = "\n".join(str(r[0]) for r in conn.execute(
                "EXPLAIN " + _CLAIM, {"now": "2099", "paused": [], "wanted": None},
                prepare=generic))
        assert "tasks_claim" in plan and "Sort" not in plan, plan
    for _ in range(8):  # past the five custom plans plan_cache_mode auto starts with
        assert queue.claim("w1", now=T0) is not None
    # The claim runs its generic plan (checked above), never re-planned per claim.
    (generic_plans, custom_plans), = conn.execute(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE statement LIKE '%SKIP LOCKED%'").fetchall()
    assert (generic_plans, custom_plans) == (8, 0)


def test_backpressure_count_stops_at_the_bound_even_with_stale_statistics(
        pg_home_factory: Callable[..., Home]) -> None:
    """An enqueue counts queued rows only up to max_queue_depth + 1: right after a burst
    (statistics not analysed yet) the planner must not read the whole index before it
    stops (a bitmap scan) when the bound is small. Checked on the plan, not on a timing."""
    from coordination.queue.postgres.backend import _NO_BITMAP, _QUEUED_UP_TO

    home = pg_home_factory(max_queue_depth=10_000)
    queue = PostgresQueue(home)
    queue.enqueue_batch([req(priority="low") for _ in range(3000)], now=T0)
    conn = queue._connection()
    with conn.transaction():
        conn.execute(_NO_BITMAP)
        plan = "\n".join(str(r[0]) for r in conn.execute(
            "EXPLAIN " + _QUEUED_UP_TO.format(bound=1001)))
    assert "Limit" in plan and "Bitmap" not in plan, plan


def test_backpressure_names_the_limit_and_comes_after_validation(
        pg_home_factory: Callable[..., Home]) -> None:
    """The count is made in the enqueue's transaction, after the requests were validated:
    a bad request is a usage error even when the queue is full; past the bound counted,
    the message says so."""
    from coordination.errors import Backpressure, UsageError

    queue = PostgresQueue(pg_home_factory(max_queue_depth=1))
    queue.enqueue_batch([req(), req()], force=True, now=T0)
    with pytest.raises(Backpressure, match="more than 1 tasks queued, max_queue_depth is 1"):
        queue.enqueue(req(), now=T0)
    with pytest.raises(UsageError):
        queue.enqueue({"command": "not a list"}, now=T0)
    assert len(queue.live_tasks()) == 2
    queue.claim("w1", now=T0)
    with pytest.raises(Backpressure, match="backpressure: 1 tasks queued"):
        queue.enqueue(req(), now=T0)
    queue.claim("w1", now=T0)
    assert queue.enqueue(req(), now=T0).created


def _batches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL text of every batch sent from now on (psycopg.Connection.execute)."""
    sent: list[str] = []
    real = psycopg.Connection.execute

    def recording(self: psycopg.Connection[Any], query: Any, *args: Any,
                  **kwargs: Any) -> Any:
        sent.append(str(query))
        return real(self, query, *args, **kwargs)
    monkeypatch.setattr(psycopg.Connection, "execute", recording)
    return sent


def test_an_enqueue_and_a_claim_take_two_round_trips_each(
        pg_home_factory: Callable[..., Home], monkeypatch: pytest.MonkeyPatch) -> None:
    """A transaction batches the statements it needs no answer to (txn.py): an enqueue is
    ``BEGIN; count; check id`` then ``INSERT; events, notify; COMMIT``, a claim (once the
    instance has read the control state) ``BEGIN; settings; claim`` then ``UPDATE;
    events, notify; SET LOCAL synchronous_commit TO off; COMMIT``; statements used
    before on the connection are not prepared again. Counted as batches sent to the
    server, not timed."""
    queue = PostgresQueue(pg_home_factory())
    queue.enqueue(req(), now=T0)
    first = queue.claim("w1", now=T0)
    assert first is not None
    sent = _batches(monkeypatch)
    added = queue.enqueue(req(), now=T0 + 1).task
    assert len(sent) == 2, sent
    assert sent[0].startswith("BEGIN;") and "count(*)" in sent[0]
    assert sent[0].count("EXECUTE") == 1  # the id check
    assert sent[1].endswith("; COMMIT") and sent[1].count("EXECUTE") == 2  # insert, events
    assert not any("PREPARE" in batch for batch in sent)
    sent.clear()
    claimed = queue.claim("w1", now=T0 + 2)
    assert claimed is not None and claimed["task_id"] == added["task_id"]
    assert len(sent) == 2, sent
    sent.clear()
    queue.complete(claimed["task_id"], "w1", lease=lease_token(claimed), now=T0 + 3)
    # The first complete on this connection prepares its lock, then its DELETE and
    # history INSERT, each time in a round trip of PREPAREs alone before the batch
    # (test_prepared_statements_hold_no_values): BEGIN; lock  /  DELETE; history; COMMIT.
    prepares = [batch for batch in sent if batch.startswith("PREPARE")]
    assert [batch.count("PREPARE") for batch in prepares] == [1, 2], sent
    assert not any("EXECUTE" in batch for batch in prepares), prepares
    assert len(sent) - len(prepares) == 2, sent
    sent.clear()
    queue.complete(first["task_id"], "w1", lease=lease_token(first), now=T0 + 4)
    assert len(sent) == 2, sent  # now prepared: no PREPARE round trip
    monkeypatch.undo()
    assert queue.live_tasks() == []


def test_prepared_statements_hold_no_values(
        pg_home_factory: Callable[..., Home], monkeypatch: pytest.MonkeyPatch) -> None:
    """The server keeps, with each prepared statement, the text of the query that prepared
    it and copies it on every EXECUTE for the life of the connection: a statement prepared
    inside a batch would keep that batch's values (megabytes after a big enqueue, copied
    by every later claim and complete). Statements are prepared in a query of their own,
    before the batch that first uses them: their text is SQL only."""
    queue = PostgresQueue(pg_home_factory(max_queue_depth=10_000))
    marker = "VALUE-THAT-MUST-NOT-BE-KEPT"
    sent = _batches(monkeypatch)
    queue.enqueue_batch([req(description=f"{marker} {i}") for i in range(200)], now=T0)
    claimed = queue.claim("w1", now=T0)
    assert claimed is not None
    queue.complete(claimed["task_id"], "w1", lease=lease_token(claimed), now=T0 + 1)
    monkeypatch.undo()
    kept = queue._connection().execute(
        "SELECT name, statement FROM pg_prepared_statements").fetchall()
    assert len(kept) >= 5, kept  # id check, insert, events, claim, update, delete...
    for name, text in kept:
        assert marker not in text and "EXECUTE" not in text, (name, text[:300])
    prepares = [batch for batch in sent if "PREPARE" in batch]
    assert prepares and all(
        all(part.startswith("PREPARE ") for part in batch.split("; ")) for batch in prepares
    ), prepares


#: How long a test waits for a thread or a server state it expects (never a figure
#: asserted: only the bound on a wait that would otherwise hang).
T_WAIT = 10.0
_ASYNC = "SET LOCAL synchronous_commit TO off; COMMIT"


def test_only_a_pure_claim_commits_asynchronously(
        pg_home_factory: Callable[..., Home], monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim alone sends ``SET LOCAL synchronous_commit TO off`` with its COMMIT (no
    round trip more); a transaction that accepts a task (an enqueue, a claim that admits
    an inbox request) or records an outcome (complete, complete_and_claim, fail) commits
    as the server is set up to. The server side is tested in
    test_a_claim_does_not_wait_for_a_synchronous_standby_an_outcome_does."""
    home = pg_home_factory()
    queue = PostgresQueue(home)
    queue.enqueue(req(), now=T0)
    assert queue.claim("w0", now=T0) is not None  # reads the control state once
    sent = _batches(monkeypatch)
    for _ in range(3):
        queue.enqueue(req(), now=T0 + 1)
    assert sent and not any("synchronous_commit" in batch for batch in sent), sent
    sent.clear()
    claimed = queue.claim("w1", now=T0 + 2)
    assert claimed is not None
    assert len(sent) == 2 and sent[1].endswith(_ASYNC), sent
    sent.clear()
    done, nxt = queue.complete_and_claim(claimed["task_id"], "w1", lease=lease_token(claimed),
                                         now=T0 + 3)
    assert nxt is not None and done["status"] == "completed"
    assert not any("synchronous_commit" in batch for batch in sent), sent
    sent.clear()
    queue.fail(nxt["task_id"], "w1", error="boom", retry=False, lease=lease_token(nxt),
               now=T0 + 4)
    assert not any("synchronous_commit" in batch for batch in sent), sent
    sent.clear()
    queue.submit(req(task_id="from-inbox"), now=T0 + 5)
    admitted = queue.claim("w1", now=T0 + 5)  # admits the request, claims an older task
    assert admitted is not None and admitted["task_id"] != "from-inbox"
    assert queue.get("from-inbox") is not None
    assert not any("synchronous_commit" in batch for batch in sent), sent
    sent.clear()
    assert queue.claim("w2", now=T0 + 6) is not None  # the request, now queued
    assert sent[-1].endswith(_ASYNC), sent


def test_a_claim_does_not_wait_for_a_synchronous_standby_an_outcome_does(
        pg_cluster: Any, pg_home_factory: Callable[..., Home]) -> None:
    """On the server: with ``synchronous_commit`` on and ``synchronous_standby_names``
    naming a standby that never connects, every synchronous commit waits (wait event
    SyncRep) until the setting is reset. A claim returns all the same (it commits with
    synchronous_commit off); an enqueue, then a complete, wait. No timing is asserted: a
    synchronous claim would wait for ever (the join below would time out). One waiter at
    a time: a transaction waiting for the standby still holds the lock that serialises
    NOTIFYing commits, behind which the next would wait on that lock instead."""
    if pg_cluster.datadir is None:
        pytest.skip("HARNESS_TEST_DATABASE_URL names a server these tests did not start")
    home = pg_home_factory()
    url = _url_of(home)
    dbname = url.rsplit("/", 1)[1]
    # The tests' cluster runs with synchronous_commit off: on for this database.
    pg_cluster.admin(f"ALTER DATABASE {dbname} SET synchronous_commit = on")
    queue = PostgresQueue(home)
    for _ in range(2):
        queue.enqueue(req(), now=T0)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE probe (x int)")
    outcomes: dict[str, Any] = {}
    threads: list[threading.Thread] = []

    def run(name: str, call: Callable[[], Any]) -> threading.Thread:
        def body() -> None:
            try:
                outcomes[name] = call()
            except BaseException as exc:  # reported by the assertions below
                outcomes[name] = exc
        thread = threading.Thread(target=body, name=name)
        thread.start()
        threads.append(thread)
        return thread

    def probe() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO probe VALUES (1)")

    def wait_until_waiting(name: str) -> None:
        """Until ``name``'s commit waits for the standby: each running thread's session
        (the probe's, ``name``'s) waits in SyncRep, none on anything else."""
        deadline = time.monotonic() + T_WAIT
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                rows = conn.execute("SELECT wait_event FROM pg_stat_activity WHERE "
                                    "datname = %s AND pid <> pg_backend_pid() AND state = "
                                    "'active'", (dbname,)).fetchall()
                if rows == [("SyncRep",)] * len(threads):
                    return
                assert time.monotonic() < deadline, f"{name}: {rows} {outcomes}"
                time.sleep(0.02)

    @contextlib.contextmanager
    def absent_standby() -> Iterator[None]:
        pg_cluster.admin("ALTER SYSTEM SET synchronous_standby_names = 'harness_absent'")
        pg_cluster.admin("SELECT pg_reload_conf()")
        try:
            run("probe", probe)
            wait_until_waiting("probe")  # in force: a synchronous commit waits
            yield
        finally:
            pg_cluster.admin("ALTER SYSTEM RESET synchronous_standby_names")
            pg_cluster.admin("SELECT pg_reload_conf()")  # wakes every waiter
            for thread in threads:
                thread.join(T_WAIT)
            assert not any(thread.is_alive() for thread in threads), outcomes
            threads.clear()

    with absent_standby():
        run("claim", lambda: queue.claim("w1", now=T0 + 1)).join(T_WAIT)
        assert "claim" in outcomes, "the claim waited for the standby"
    claimed = outcomes["claim"]
    assert isinstance(claimed, dict) and claimed["status"] == "running", claimed
    with absent_standby():
        run("enqueue", lambda: queue.enqueue(req(), now=T0 + 2))
        wait_until_waiting("enqueue")
        assert "enqueue" not in outcomes
    assert outcomes["enqueue"].created, outcomes
    with absent_standby():
        run("complete", lambda: queue.complete(claimed["task_id"], "w1",
                                               lease=lease_token(claimed), now=T0 + 3))
        wait_until_waiting("complete")
        assert "complete" not in outcomes
    assert outcomes["complete"]["status"] == "completed", outcomes
    queue.close()


def test_control_reads_are_cached_while_listening_until_a_change_anywhere(
        pg_home_factory: Callable[..., Home], monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that LISTENs (a worker) reads the control state once, then from its
    cache (shared.ControlCache): no round trip at each wake-up. A queue commit's
    notification keeps the cache; a change made here, or elsewhere (its NOTIFY), ends it
    before the wake-up it causes; without a listener every read is a round trip."""
    from coordination.queue.postgres.shared import (
        CHANNEL,
        CONTROL_CACHE,
        CONTROL_PAYLOAD,
        PostgresControl,
    )

    home = pg_home_factory()
    url = _url_of(home)
    queue = PostgresQueue(home)
    control = PostgresControl(home)
    sent = _batches(monkeypatch)

    def reads(expected_trips: int) -> dict[str, Any]:
        sent.clear()
        state = control.read()
        trips = [q for q in sent if "FROM control" in q]
        assert len(trips) == expected_trips, sent
        return state

    reads(1)
    reads(1)  # nobody listens: no cache
    woke = threading.Event()
    woke_uncached = threading.Event()  # a wake-up that found the cache dropped already

    def on_change() -> None:
        if CONTROL_CACHE.get(url) is None:
            woke_uncached.set()
        woke.set()
    stop = queue.on_change(on_change)
    try:
        reads(1)
        assert reads(0)["paused_types"] == {}
        woke_uncached.clear()
        control.update(lambda state: state["paused_types"].update(
            {"default": {"reason": "here", "until": None}}), now=T0)
        assert reads(1)["paused_types"]["default"]["reason"] == "here"  # at once
        assert woke_uncached.wait(T_WAIT)  # its own NOTIFY came too (and dropped it)
        control.read()
        assert reads(0)["paused_types"]["default"]["reason"] == "here"
        woke.clear()
        queue.enqueue(req(), now=T0)  # a queue commit: the control state is unchanged
        assert woke.wait(T_WAIT)
        reads(0)
        woke_uncached.clear()
        with psycopg.connect(url, autocommit=True) as other, other.transaction():
            other.execute("UPDATE control SET state = state || "  # another host's change
                          "'{\"paused_types\": {}}'::jsonb")
            other.execute("SELECT pg_notify(%s, %s)", (CHANNEL, CONTROL_PAYLOAD))
        assert woke_uncached.wait(T_WAIT)  # its wake-up comes after the cache was dropped
        assert reads(1)["paused_types"] == {}
        reads(0)
    finally:
        stop()
    reads(1)  # the listener is gone
    reads(1)
    queue.close()


def test_prepared_statements_survive_a_rollback_and_are_remade_when_dropped(
        pg_home_factory: Callable[..., Home]) -> None:
    """A failed operation ends in ROLLBACK, after which the connection's prepared
    statements must still be there (psycopg's own preparing, off on the queue's
    connection, would DEALLOCATE ALL then); statements dropped behind the queue's back
    are prepared again and the operation re-run."""
    from coordination.errors import NotFound

    queue = PostgresQueue(pg_home_factory())
    for _ in range(6):  # past psycopg's threshold of five uses
        task = queue.enqueue(req(), now=T0).task
        queue.cancel(task["task_id"], now=T0)
        with pytest.raises(NotFound):
            queue.cancel(task["task_id"], now=T0)  # rolled back
        assert queue.get(task["task_id"])["status"] == "cancelled"  # type: ignore[index]
    queue._connection().execute("DEALLOCATE ALL")
    again = queue.enqueue(req(), now=T0).task
    assert queue.cancel(again["task_id"], now=T0)["status"] == "cancelled"


def test_a_claim_honours_a_pause_made_elsewhere_since_its_last_claim(
        pg_home_factory: Callable[..., Home]) -> None:
    """A claim assumes the control state the previous one read and checks it in the same
    round trip: a pause or resume by another process in between re-runs the claim, so the
    pause holds from the next claim on, as when the state was read first."""
    from coordination import clock
    from coordination.control import update_control

    home = pg_home_factory()
    queue = PostgresQueue(home)
    queue.enqueue({"task_id": "s1", "worker_type": "shell", "description": "echo",
                   "priority": "critical"}, now=T0)
    queue.enqueue(req(task_id="d1"), now=T0)
    queue.enqueue(req(task_id="d2"), now=T0)
    def claimed_id(now: float, types: list[str] | None = None) -> str | None:
        task = queue.claim("w1", types=types, now=now)
        return None if task is None else task["task_id"]

    assert claimed_id(T0, ["default"]) == "d1"
    update_control(home, lambda s: s["paused_types"].update(
        {"shell": {"since": clock.iso(T0), "until": None, "reason": "x"}}), now=T0)
    assert claimed_id(T0 + 1) == "d2"  # not the critical s1
    assert claimed_id(T0 + 1) is None
    update_control(home, lambda s: s["paused_types"].pop("shell"), now=T0 + 2)
    assert claimed_id(T0 + 2) == "s1"


def test_concurrent_enqueues_of_one_dedup_key_create_one_task(
        pg_home_factory: Callable[..., Home]) -> None:
    """Four connections enqueue the same dedup_key at once: the partial unique index lets
    one commit; the others' transactions are re-run and return that holder."""
    home = pg_home_factory()
    results: list[tuple[bool, str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def producer() -> None:
        queue = PostgresQueue(home)
        try:
            start.wait()
            res = queue.enqueue(req(dedup_key="nightly"), now=T0)
            results.append((res.created, res.task["task_id"]))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            queue.close()

    threads = [threading.Thread(target=producer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sorted(created for created, _ in results) == [False, False, False, True]
    assert len({task_id for _, task_id in results}) == 1
    assert len(PostgresQueue(home).live_tasks()) == 1


def test_a_server_restart_is_exit_75_once_then_reconnects(
        pg_cluster: Any, pg_home_factory: Callable[..., Home]) -> None:
    """The server restarts under an open queue: the next operation fails with
    DatabaseUnavailable (exit 75, nothing half-done), the one after reconnects; every
    committed task is still there."""
    if pg_cluster.datadir is None:
        pytest.skip("HARNESS_TEST_DATABASE_URL names a server these tests did not start")
    home = pg_home_factory()
    queue = PostgresQueue(home)
    task_id = queue.enqueue(req(), now=T0).task["task_id"]
    pg_cluster.restart()
    with pytest.raises(DatabaseUnavailable) as info:
        queue.claim("w1", now=T0 + 1)
    assert info.value.exit_code == EXIT_TEMPFAIL
    claimed = queue.claim("w1", now=T0 + 2)
    assert claimed is not None and claimed["task_id"] == task_id and claimed["attempts"] == 1


def test_a_waiter_admitted_while_its_dependency_fails_is_rejected(
        pg_home_factory: Callable[..., Home]) -> None:
    """Another host is failing the parent (its transaction holds the row, deleted, with a
    final failed record, not yet committed) while we enqueue a child naming it. The
    child's admission waits for that row; once the failure commits it sees the parent
    failed and refuses the child, which must never run behind a failed dependency."""
    from coordination.errors import UsageError
    from coordination.queue.rules import history_record, with_status

    home = pg_home_factory()
    queue = PostgresQueue(home)
    parent = queue.enqueue(req(task_id="parent"), now=T0).task
    outcome: list[BaseException | str] = []
    with psycopg.connect(_url_of(home)) as other:  # the other host's transaction
        other.execute("SELECT 1 FROM tasks WHERE task_id = 'parent' FOR UPDATE")
        other.execute("DELETE FROM tasks WHERE task_id = 'parent' AND NOT dead")
        record = history_record(with_status(parent, "failed"), final=True,
                                outcome="failed", recorded_at="2023-11-14T22:13:21.000Z")
        other.execute("INSERT INTO history (task_id, final, status, recorded_at, record) "
                      "VALUES ('parent', true, 'failed', %s, %s)",
                      (record["recorded_at"], psycopg.types.json.Jsonb(record)))

        def enqueue_child() -> None:
            try:
                queue.enqueue(req(task_id="child", depends_on=["parent"]), now=T0 + 1)
                outcome.append("admitted")
            except BaseException as exc:  # checked below, in the test's thread
                outcome.append(exc)

        child = threading.Thread(target=enqueue_child)
        child.start()
        child.join(0.5)  # it waits for the parent's row (or, if late, finds it gone)
        other.commit()
    child.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], UsageError), outcome
    assert "depends_on" in str(outcome[0])
    assert PostgresQueue(home).live_tasks() == []


def test_a_worker_runs_tasks_from_the_database_end_to_end(
        pg_home_factory: Callable[..., Home], procs: Any) -> None:
    """A real `harness worker run` on a postgres home: it waits on LISTEN/NOTIFY, claims a
    task enqueued after it started (and one from the inbox, create-task.sh's path), runs
    both and records them; doctor then finds the home clean, jq view included."""
    import sys

    from helpers import daemon_env

    home = pg_home_factory()
    worker = procs.spawn("worker", [sys.executable, "-m", "daemons", "worker", "run",
                                    "--home", str(home.root), "--max-tasks", "2"],
                         env=daemon_env())
    worker.wait_for_line("started worker-", timeout=30)
    queue = PostgresQueue(home)
    first = queue.enqueue(req(), now=None).task["task_id"]
    second = queue.submit(req(command=["sh", "-c", "exit 0"]))
    queue.ingest()
    assert worker.wait(60) == 0, worker.stderr()
    for task_id in (first, second):
        record = queue.get(task_id)
        assert record is not None and record["status"] == "completed", record
    doctor = CliRunner().invoke(cli, ["--home", str(home.root), "doctor", "--json"])
    assert doctor.exit_code == 0, doctor.output


def test_history_since_pages_by_sequence_and_starts_over_on_an_unknown_cursor(
        pg_home_factory: Callable[..., Home]) -> None:
    home = pg_home_factory()
    queue = PostgresQueue(home)
    ids = []
    for i in range(3):
        task = queue.enqueue(req(), now=T0 + i).task
        queue.claim("w1", now=T0 + i)
        queue.complete(task["task_id"], "w1", now=T0 + 10 * i)
        ids.append(task["task_id"])
    everything, end = queue.history_since(None)
    assert [r["task_id"] for r in everything] == ids
    assert queue.history_since(end) == ([], end)  # nothing new: the same cursor
    first, cursor = queue.history_since(None, limit=1)
    rest, cursor2 = queue.history_since(cursor)
    assert [r["task_id"] for r in first + rest] == ids and cursor2 == end
    recent, _ = queue.history_since(None, start_at=T0 + 10)  # recorded since then
    assert [r["task_id"] for r in recent] == ids[1:]
    stream = end.rpartition(":")[0]
    assert stream and first and cursor.rpartition(":")[0] == stream  # one stream throughout
    # A cursor from elsewhere (a recreated database, a file backend's, one past the newest
    # record): from the start.
    for foreign in ("999999", "123:456", f"{stream}:999999", "garbage"):
        again, _ = queue.history_since(foreign)
        assert [r["task_id"] for r in again] == ids
    other = PostgresQueue(home)  # the cursor means the same to every process
    later = other.enqueue(req(), now=T0 + 40).task
    other.claim("w2", now=T0 + 40)
    other.complete(later["task_id"], "w2", now=T0 + 41)
    new, _ = queue.history_since(end)
    assert [r["task_id"] for r in new] == [later["task_id"]]
