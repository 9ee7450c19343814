"""The operator's commands on a postgres home (issue 13: "everything else works"): status,
check, dashboard, metrics, timeline and dlq read and act through the queue port, and
``harness up`` runs tasks from the database; no file queue appears in the home."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from click.testing import CliRunner, Result
from helpers import ProcGroup, daemon_env, req, wait_until

from coordination.paths import Home
from coordination.queue import open_queue
from daemons.cli import cli

HARNESS = [sys.executable, "-m", "daemons"]


def run(home: Home, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home.root), *args])


def as_json(home: Home, *args: str) -> Any:
    result = run(home, *args, "--json")
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.output
    return json.loads(result.output)


def test_reporting_and_dead_letters_on_a_postgres_home(
        pg_home_factory: Callable[..., Home]) -> None:
    home = pg_home_factory(retry_backoff_base_s=0)
    queue = open_queue(home)
    done = queue.enqueue(req(description="done")).task["task_id"]
    assert queue.claim("w1") is not None
    queue.complete(done, "w1")
    dead = queue.enqueue(req(description="dead", max_attempts=1)).task["task_id"]
    assert queue.claim("w1") is not None
    queue.fail(dead, "w1", error="boom", exit_code=3)
    waiting = queue.enqueue(req(description="waiting")).task["task_id"]

    status = as_json(home, "status")
    assert status["queue"]["queued"] == 1 and status["queue"]["dead_letters"] == 1
    assert status["queue"]["oldest_queued_at"] == queue.get(waiting)["created_at"]  # type: ignore[index]
    check = as_json(home, "check", "--no-alerts")
    # one of the two finished attempts failed: the error rate (0.5) is critical
    assert check["status"] == "CRITICAL" and check["exit_code"] == 2, check
    assert "queue_depth=1;" in check["summary"] and "error_rate=0.5;" in check["summary"]
    frame = run(home, "dashboard", "--once", "--no-color", "--width", "120")
    assert frame.exit_code == 0 and "queued 1" in frame.output, frame.output
    snap = run(home, "metrics", "snapshot")
    assert snap.exit_code == 0 and "queued=1" in snap.output, snap.output
    prom = run(home, "metrics", "show")
    assert 'harness_queue_tasks{status="queued",priority="medium"} 1' in prom.output
    timeline = as_json(home, "timeline", done)
    kinds = {(e["kind"], e.get("task_id")) for e in timeline["entries"]}
    assert ("task", done) in kinds
    assert [d["task_id"] for d in as_json(home, "dlq", "list")] == [dead]
    assert run(home, "dlq", "requeue", dead).exit_code == 0
    assert as_json(home, "dlq", "list") == []
    assert queue.get(dead)["status"] == "queued"  # type: ignore[index]
    # The jq view is the file backend's format; the file queue itself never appears.
    assert not home.queue_journal.exists()
    queue.close()


def test_up_runs_tasks_from_the_database(pg_home_factory: Callable[..., Home],
                                         procs: ProcGroup) -> None:
    home = pg_home_factory(durability="none", heartbeat_interval_s=0.5, stop_grace_s=1,
                           kill_grace_s=1, retry_backoff_base_s=0)
    queue = open_queue(home)
    ids = [queue.enqueue(req(command=["sh", "-c", "echo ok"], description=f"pg up {i}")
                         ).task["task_id"] for i in range(4)]
    env = daemon_env()
    env.update({k: v for k, v in os.environ.items() if k.startswith("HARNESS_DATABASE")})
    up = procs.spawn("up", [*HARNESS, "--home", str(home.root), "up", "--workers", "1"],
                     env=env)
    try:
        wait_until(lambda: all(any(r["final"] for r in queue.history_of(t)) for t in ids),
                   timeout=60, what="the tasks to complete")
    except AssertionError:
        raise AssertionError("\n".join(up.lines()) + up.stderr()) from None
    assert {r["status"] for t in ids for r in queue.history_of(t) if r["final"]} \
        == {"completed"}
    os.kill(up.pid, signal.SIGINT)
    assert up.wait(60) == 0, up.stderr()
    assert not home.queue_journal.exists()
    queue.close()
