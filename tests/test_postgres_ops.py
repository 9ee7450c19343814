"""A postgres home's upkeep and shared state (docs/multi-host.md): retention in the
database through the janitor, the shared events table, control state shared by hosts,
and the jq view a running supervisor keeps at most 1 s stale."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from click.testing import CliRunner
from helpers import daemon_env, make_home, req

from coordination.config import load_system
from coordination.control import read_control
from coordination.jsonl import read_jsonl
from coordination.paths import Home
from coordination.queue.file.snapshot import parse
from coordination.queue.postgres import PostgresQueue
from coordination.queue.rules import lease_token
from daemons.cli import cli
from daemons.janitor.run import format_summary, run_janitor


def _url(home: Home) -> str:
    return str(load_system(home).values["database_url"])


def _second_host(tmp_path: Path, home: Home, name: str = "hostB", **overrides: Any) -> Home:
    """Another home (a simulated host) over the same database as ``home``."""
    return make_home(tmp_path, name, queue_backend="postgres", database_url=_url(home),
                     **overrides)


def _count(home: Home, sql: str, *params: Any) -> int:
    with psycopg.connect(_url(home)) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def read_events(home: Home) -> list[dict[str, Any]]:
    return list(read_jsonl(home.events_file).records)


def _run_tasks(queue: PostgresQueue, n: int, **fields: Any) -> list[str]:
    ids = []
    for _ in range(n):
        task = queue.enqueue(req(**fields)).task
        claimed = queue.claim("w1")
        assert claimed is not None and claimed["task_id"] == task["task_id"]
        queue.complete(task["task_id"], "w1")
        ids.append(task["task_id"])
    return ids


def test_janitor_trims_history_and_events_in_the_database(
        pg_home_factory: Callable[..., Home]) -> None:
    """Over ``*_max_lines`` the janitor keeps the newest ``*_keep_lines`` rows of history
    and events, except the completion record a queued task still depends on; a dry run
    deletes nothing; the host's own files are not the queue's."""
    home = pg_home_factory(history_max_lines=10, history_keep_lines=4, events_max_lines=10,
                           events_keep_lines=5)
    queue = PostgresQueue(home)
    (dep,) = _run_tasks(queue, 1)
    waiter = queue.enqueue(req(depends_on=[dep], not_before="2099-01-01T00:00:00.000Z"))
    _run_tasks(queue, 12)
    history = _count(home, "SELECT count(*) FROM history")
    events = _count(home, "SELECT count(*) FROM events")
    assert history == 13 and events >= 3 * 13

    dry = run_janitor(home, time.time(), dry_run=True)
    assert {t["table"]: t["rows_deleted"] for t in dry["trimmed"]} == {
        "history": history - 4 - 1, "events": events - 5}
    assert _count(home, "SELECT count(*) FROM history") == history  # nothing deleted

    summary = run_janitor(home, time.time())
    assert {t["table"]: t["kept_rows"] for t in summary["trimmed"]} == {"history": 5,
                                                                        "events": 5}
    assert any("history (PostgreSQL): deleted 8 row(s)" in line
               for line in format_summary(summary))
    assert _count(home, "SELECT count(*) FROM history") == 5
    assert _count(home, "SELECT count(*) FROM history WHERE task_id = %s", dep) == 1
    assert _count(home, "SELECT count(*) FROM events") == 5
    assert not home.history_file.exists()
    # the waiter's dependency is still known completed: doctor finds no orphan
    assert not [f for f in queue.check() if f.code == "orphaned_waiter"]
    assert queue.get(waiter.task["task_id"])["status"] == "queued"  # type: ignore[index]
    # the janitor_run event records it on this host
    (run,) = [e for e in read_events(home) if e["type"] == "janitor_run"]
    assert run["data"]["trimmed"] == summary["trimmed"]


def test_the_events_table_holds_each_committed_queue_event_once(
        tmp_path: Path, pg_home_factory: Callable[..., Home],
        monkeypatch: Any) -> None:
    """Two simulated hosts: the table holds both hosts' queue events, each once, named by
    HARNESS_HOST_ID; each host's dashboard-events.jsonl holds its own."""
    home_a = pg_home_factory()
    home_b = _second_host(tmp_path, home_a)
    monkeypatch.setenv("HARNESS_HOST_ID", "host-a")
    _run_tasks(PostgresQueue(home_a), 2)
    monkeypatch.setenv("HARNESS_HOST_ID", "host-b")
    _run_tasks(PostgresQueue(home_b), 1)
    with psycopg.connect(_url(home_a)) as conn:
        rows = conn.execute("SELECT host_id, event->>'event_id', type FROM events "
                            "ORDER BY seq").fetchall()
    file_ids = {h: [e["event_id"] for e in read_events(home) if e["type"].startswith("task_")]
                for h, home in (("host-a", home_a), ("host-b", home_b))}
    for host, ids in file_ids.items():
        assert [r[1] for r in rows if r[0] == host] == ids
    assert len({r[1] for r in rows}) == len(rows) == 9
    assert [r[2] for r in rows if r[0] == "host-b"] == ["task_enqueued", "task_claimed",
                                                        "task_completed"]


def test_control_state_is_shared_by_every_host(
        tmp_path: Path, pg_home_factory: Callable[..., Home]) -> None:
    """A pause made with the CLI on one host holds claims on another, in the database (no
    control.json is written); resume lifts it; a drain request is seen everywhere."""
    home_a = pg_home_factory()
    home_b = _second_host(tmp_path, home_a)
    queue_b = PostgresQueue(home_b)
    queue_b.enqueue(req())
    runner = CliRunner()
    out = runner.invoke(cli, ["--home", str(home_a.root), "pause", "default", "--reason",
                              "maintenance"])
    assert out.exit_code == 0, out.output
    assert not home_a.control_file.exists() and not home_b.control_file.exists()
    assert "default" in read_control(home_b)["paused_types"]
    assert queue_b.claim("w1") is None
    assert queue_b.stats()["runnable"] == 0
    out = runner.invoke(cli, ["--home", str(home_b.root), "resume", "default"])
    assert out.exit_code == 0, out.output
    assert queue_b.claim("w1") is not None
    out = runner.invoke(cli, ["--home", str(home_b.root), "drain"])
    assert out.exit_code == 0, out.output
    assert read_control(home_a)["drain"]["all"] is not None


def test_a_running_supervisor_keeps_the_jq_view_within_one_second(
        tmp_path: Path, pg_home_factory: Callable[..., Home], procs: Any) -> None:
    """A real `harness supervisor run` on host A; changes committed from host B appear in
    host A's task-queue.json within 1 s of their commit."""
    home_a = pg_home_factory(supervisor_tick_s=30)
    home_b = _second_host(tmp_path, home_a)
    queue_b = PostgresQueue(home_b)
    sup = procs.spawn("supervisor", [sys.executable, "-m", "daemons", "supervisor", "run",
                                     "--no-scale", "--home", str(home_a.root)],
                      env=daemon_env())
    deadline = time.monotonic() + 30
    while not home_a.health_file.exists():
        assert sup.popen.poll() is None, sup.stderr()
        assert time.monotonic() < deadline, "the supervisor made no first pass"
        time.sleep(0.05)
    lags = []
    for n in range(5):
        task_id = queue_b.enqueue(req(description=f"from host B {n}")).task["task_id"]
        committed = time.monotonic()
        while True:
            snap = parse(home_a.queue_file)
            if snap is not None and task_id.encode() in home_a.queue_file.read_bytes():
                break
            assert time.monotonic() - committed <= 1.0, \
                f"host A's jq view still lacks {task_id} 1 s after its commit"
            time.sleep(0.01)
        lags.append(time.monotonic() - committed)
        time.sleep(0.5 * (n % 2))  # inside and outside the republish interval
    assert sup.popen.poll() is None, sup.stderr()
    view = parse(home_a.queue_file)
    assert view is not None and view.revision == queue_b.stats()["revision"]


def test_doctor_reports_and_repairs_a_live_dead_letter_and_the_control_row(
        pg_home_factory: Callable[..., Home]) -> None:
    home = pg_home_factory()
    queue = PostgresQueue(home)
    task = queue.enqueue(req()).task
    with psycopg.connect(_url(home)) as conn:
        conn.execute("INSERT INTO tasks (task_id, status, priority_rank, created_at, "
                     "worker_type, data) SELECT task_id, 'failed', priority_rank, created_at,"
                     " worker_type, jsonb_set(data, '{status}', '\"failed\"') FROM tasks")
        conn.execute("DELETE FROM control")
    codes = {f.code for f in queue.check()}
    assert {"live_and_dead", "control_row"} <= codes
    repaired = {f.code for f in queue.check(repair=True) if f.repaired}
    assert {"live_and_dead", "control_row"} <= repaired
    assert not {"live_and_dead", "control_row"} & {f.code for f in queue.check()}
    assert queue.get(task["task_id"])["status"] == "queued"  # type: ignore[index]
    assert read_control(home)["paused_types"] == {}


def test_a_role_with_only_the_documented_grants_runs_harness(
        tmp_path: Path, pg_home_factory: Callable[..., Home], pg_cluster: Any) -> None:
    """`harness db grants ROLE` (docs/multi-host.md) is enough for a role that owns nothing:
    enqueue, claim, complete, a dead letter and its requeue, a pause, retention and the jq
    view all work, and DDL is refused."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    owner_home = pg_home_factory()
    owner_url = _url(owner_home)
    dbname = str(conninfo_to_dict(owner_url)["dbname"])
    role = f"harness_app_{dbname}"
    out = CliRunner().invoke(cli, ["--home", str(owner_home.root), "db", "grants", role])
    assert out.exit_code == 0, out.output
    admin = pg_cluster.url(pg_cluster.admin_db)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        with psycopg.connect(owner_url, autocommit=True) as conn:
            conn.execute(f'REVOKE ALL ON DATABASE "{dbname}" FROM PUBLIC')
            conn.execute(out.output)
        app_url = make_conninfo(owner_url, user=role)
        # another host's `init` with that role: the schema is current, no DDL is needed
        init = CliRunner().invoke(cli, ["--home", str(tmp_path / "app"), "init", "--backend",
                                        "postgres", "--database-url", app_url])
        assert init.exit_code == 0, init.output
        home = make_home(tmp_path, "app", queue_backend="postgres", database_url=app_url,
                         history_max_lines=10, history_keep_lines=2)
        queue = PostgresQueue(home)
        _run_tasks(queue, 10)
        failing = queue.enqueue(req(max_attempts=1)).task["task_id"]
        held = queue.claim("w1")
        assert held is not None
        # a heartbeat extends the lease and upserts the workers registry row
        assert set(queue.heartbeat("w1", {failing: lease_token(held)})) == {failing}
        queue.forget_worker("w1")
        queue.fail(failing, "w1", error="boom", retry=False)
        queue.requeue_dead(failing)
        assert CliRunner().invoke(cli, ["--home", str(home.root), "pause", "default"]
                                  ).exit_code == 0
        assert queue.claim("w1") is None
        report = queue.apply_retention()
        assert not report.errors and report.summary["trimmed"]
        queue.sync()
        view = parse(home.queue_file)
        assert view is not None and view.revision == queue.stats()["revision"]
        assert not [f for f in queue.check() if f.level == "error"]
        queue.close()
        with psycopg.connect(app_url) as conn, \
                __import__("pytest").raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE intruder (x int)")
    finally:
        with psycopg.connect(owner_url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP ROLE "{role}"')


def test_the_view_keeper_listens_again_after_a_server_restart(
        pg_home_factory: Callable[..., Home], pg_cluster: Any, tmp_path: Path) -> None:
    """keep_view_fresh survives a restart of PostgreSQL (a failover looks the same to
    it): once the server is back, a change made on another host reaches the view."""
    if pg_cluster.datadir is None:
        import pytest

        pytest.skip("restarts only a cluster the tests started (not HARNESS_TEST_DATABASE_URL)")
    home_a = pg_home_factory()
    home_b = _second_host(tmp_path, home_a)
    keeper_queue = PostgresQueue(home_a)
    stop = keeper_queue.keep_view_fresh()
    try:
        pg_cluster.restart()
        time.sleep(3)  # past the keeper's own retry of its failed publish: only a
        # listener that is back can bring the next change
        queue_b = PostgresQueue(home_b)
        task_id = queue_b.enqueue(req()).task["task_id"]
        deadline = time.monotonic() + 5
        while task_id.encode() not in home_a.queue_file.read_bytes():
            assert time.monotonic() < deadline, "the view never showed the task"
            time.sleep(0.05)
    finally:
        stop()
        keeper_queue.close()
