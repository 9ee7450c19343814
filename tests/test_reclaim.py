"""Orphan reclaim: a worker dies (SIGKILL), its pid is reused, or it freezes (SIGSTOP) in
the middle of a task; the supervisor proves it dead, the task runs again and completes, the
history shows both attempts, and ``harness doctor`` finds the home clean afterwards.

Real workers (``harness worker run``) are children of the ``procs`` fixture; every task
writes its pid to ``tmp_path/pids`` so teardown can kill task process groups that a killed
worker left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    REPO_ROOT,
    Child,
    ProcGroup,
    daemon_env,
    dead_pid,
    events,
    make_home,
    req,
    skip_reason,
    wait_until,
)

from coordination import clock
from coordination.doctor import check
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import new_spec, read_specs, write_spec
from coordination.store import read_json
from daemons.supervisor.reclaim import reclaim_pass
from daemons.supervisor.reconcile import Supervisor

HARNESS = [sys.executable, "-m", "daemons"]




@pytest.fixture
def pid_dir(tmp_path: Path) -> Iterator[Path]:
    """Tasks write ``<task_id>.<attempt>.pid`` here. At teardown every process still
    carrying one of those task ids in its environment is killed: found by identity, not by
    the recorded pid, which may have been reused by someone else's process meanwhile."""
    folder = tmp_path / "pids"
    folder.mkdir()
    yield folder
    task_ids = {p.name.split(".")[0] for p in folder.glob("*.pid")}
    if not task_ids:
        return
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get("HARNESS_TASK_ID") in task_ids:
                proc.kill()




def start_worker(procs: ProcGroup, home: Home, instance: str) -> Child:
    child = procs.spawn(f"worker-{instance}", [*HARNESS, "worker", "run", "--instance",
                                               instance, "--home", str(home.root)],
                        env=daemon_env())
    child.wait_for_line("started worker-", timeout=60)
    return child


def slow_then_fast(pid_dir: Path) -> list[str]:
    """Attempt 1 sleeps (long enough to be killed mid-task); later attempts finish at once."""
    return ["sh", "-c", f'echo $$ > {pid_dir}/$HARNESS_TASK_ID.$HARNESS_ATTEMPT.pid; '
            'if [ "$HARNESS_ATTEMPT" = 1 ]; then sleep 120; fi; echo done']


def running_under(home: Home, task_id: str) -> str | None:
    task = TaskQueue(home).get(task_id)
    if task is not None and task.get("status") == "running":
        return str(task["worker_id"])
    return None


def outcomes(home: Home, task_id: str) -> list[tuple[bool, str]]:
    return [(r["final"], r["outcome"]) for r in TaskQueue(home).history_of(task_id)]


def reclaim_until(sup: Supervisor, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Reconcile until the task was reclaimed; returns that reclaim record."""
    deadline = time.monotonic() + timeout
    while True:
        report = sup.reconcile(clock.now())
        for item in report["reclaimed"]:
            if item["task_id"] == task_id:
                return dict(item)
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} was not reclaimed within {timeout}s; "
                                 f"last report {report}")
        time.sleep(0.1)


def finish_and_check(home: Home, procs: ProcGroup, task_id: str, worker: Child) -> None:
    """The retry runs on ``worker`` and completes; then the home is clean."""
    wait_until(lambda: ("completed" in {o for f, o in outcomes(home, task_id) if f}),
               timeout=60, what="the retry to complete")
    assert outcomes(home, task_id) == [(False, "reclaimed"), (True, "completed")]
    final = TaskQueue(home).get(task_id)
    assert final is not None and final["attempts"] == 2
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(60) == 0, worker.stderr()
    report = check(home)
    assert report.clean, report.as_dict()


@pytest.fixture
def rhome(tmp_path: Path) -> Home:
    return make_home(tmp_path, retry_backoff_base_s=0, heartbeat_interval_s=0.5,
                     durability="none", stop_grace_s=1, kill_grace_s=1)


def test_kill_9_worker_mid_task(rhome: Home, adopt_orphans: None, procs: ProcGroup,
                                pid_dir: Path) -> None:
    home = rhome
    task_id = TaskQueue(home).enqueue({"command": slow_then_fast(pid_dir)}).task["task_id"]
    victim = start_worker(procs, home, "1")
    owner = wait_until(lambda: running_under(home, task_id), what="the first attempt")
    wait_until(lambda: (pid_dir / f"{task_id}.1.pid").exists(), what="the task to start")
    task_pgid = int((pid_dir / f"{task_id}.1.pid").read_text())
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(30)
    sup = Supervisor(home)
    item = reclaim_until(sup, task_id)
    assert item["worker_id"] == owner and "is gone" in item["proof"]
    assert item["status"] == "queued" and item["attempt"] == 1
    [ev] = events(home, "task_reclaimed")
    assert ev["task_id"] == task_id and ev["worker_id"] == owner
    assert "is gone" in ev["data"]["proof"] and ev["data"]["requeued"] is True
    # The supervisor also killed the task the dead worker left running.
    wait_until(lambda: not _group_alive(task_pgid), what="the orphaned task to be killed")
    spec = read_json(home.specs_completed / f"{owner}.json")
    assert spec["exit_reason"] == "crashed" and "is gone" in spec["crash_proof"]
    finish_and_check(home, procs, task_id, start_worker(procs, home, "2"))


def test_reused_pid_is_proof_of_death(rhome: Home, adopt_orphans: None, procs: ProcGroup,
                                      pid_dir: Path) -> None:
    """The worker died and its pid now belongs to another live process (with another start
    time): simulated by pointing the dead worker's spec at a live unrelated process."""
    home = rhome
    task_id = TaskQueue(home).enqueue({"command": slow_then_fast(pid_dir)}).task["task_id"]
    victim = start_worker(procs, home, "1")
    owner = wait_until(lambda: running_under(home, task_id), what="the first attempt")
    wait_until(lambda: read_json(home.specs_active / f"{owner}.json")["state"] == "busy",
               what="the worker to publish busy")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(30)
    stranger = procs.spawn("stranger", ["sleep", "120"])
    spec = read_json(home.specs_active / f"{owner}.json")
    spec["pid"] = stranger.pid  # same host, live process, different start time
    assert write_spec(home, spec)
    item = reclaim_until(Supervisor(home), task_id)
    assert item["worker_id"] == owner and "reused" in item["proof"]
    assert stranger.popen.poll() is None  # the unrelated process is left alone
    assert read_json(home.specs_completed / f"{owner}.json")["exit_reason"] == "crashed"
    finish_and_check(home, procs, task_id, start_worker(procs, home, "2"))


def test_frozen_worker_stale_heartbeat(tmp_path: Path, adopt_orphans: None,
                                       procs: ProcGroup, pid_dir: Path) -> None:
    home = make_home(tmp_path, retry_backoff_base_s=0, heartbeat_interval_s=0.25,
                     heartbeat_timeout_s=2, durability="none", stop_grace_s=1, kill_grace_s=1)
    task_id = TaskQueue(home).enqueue({"command": slow_then_fast(pid_dir)}).task["task_id"]
    frozen = start_worker(procs, home, "1")
    owner = wait_until(lambda: running_under(home, task_id), what="the first attempt")
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        sup = Supervisor(home)
        item = reclaim_until(sup, task_id, timeout=60)
        assert item["worker_id"] == owner and "heartbeat" in item["proof"]
        # Fenced: a stopped worker may hold a lock; SIGKILL releases it and guarantees it
        # cannot run the task beside its retry.
        assert frozen.wait(30) == -signal.SIGKILL
        assert read_json(home.specs_completed / f"{owner}.json")["exit_reason"] == "crashed"
        helper = start_worker(procs, home, "2")
        wait_until(lambda: ("completed" in {o for f, o in outcomes(home, task_id) if f}),
                   timeout=60, what="the retry to complete")
    finally:
        frozen.kill(signal.SIGKILL)  # a stopped process dies of SIGKILL too
        frozen.wait(30)
    assert outcomes(home, task_id) == [(False, "reclaimed"), (True, "completed")]
    os.kill(helper.pid, signal.SIGTERM)
    assert helper.wait(60) == 0, helper.stderr()
    report = check(home)
    assert report.clean, report.as_dict()


def _group_alive(pgid: int) -> bool:
    from daemons.process_groups import group_alive

    return group_alive(pgid)


# ---------------------------------------------------------------------------- fast cases
def dead_worker_with_task(home: Home, **task: Any) -> tuple[str, str]:
    """A spec of a worker whose pid is gone, holding a claimed task."""
    queue = TaskQueue(home)
    task_id = queue.enqueue(req(**task)).task["task_id"]
    now = clock.now()
    worker_id = clock.new_worker_id("9", now)
    spec = new_spec(worker_id, "9", now, pid=dead_pid())
    write_spec(home, spec, create=True)
    claimed = queue.claim(worker_id)
    assert claimed is not None and claimed["task_id"] == task_id
    return worker_id, task_id


def test_spent_attempts_go_to_dead_letters(home: Home) -> None:
    _, task_id = dead_worker_with_task(home, max_attempts=1)
    out = reclaim_pass(home, clock.now())
    assert [i["task_id"] for i in out["reclaimed"]] == [task_id]
    assert out["reclaimed"][0]["status"] == "failed"
    assert (home.dead_letters / f"{task_id}.json").exists()
    assert outcomes(home, task_id) == [(True, "reclaimed")]
    assert events(home, "task_reclaimed")[0]["data"]["requeued"] is False
    assert [e["task_id"] for e in events(home, "task_dead_lettered")] == [task_id]
    assert read_specs(home) == []
    assert check(home).clean


def test_dry_run_changes_nothing_and_cli(home: Home) -> None:
    _, task_id = dead_worker_with_task(home)
    before = home.queue_file.read_bytes()
    out = reclaim_pass(home, clock.now(), dry_run=True)
    assert out["reclaimed"][0]["status"] == "would reclaim"
    assert home.queue_file.read_bytes() == before and len(read_specs(home)) == 1
    cli = subprocess.run([*HARNESS, "supervisor", "reclaim", "--json", "--home",
                          str(home.root)], capture_output=True, text=True, timeout=60,
                         env=daemon_env(), check=False)
    assert cli.returncode == 0, cli.stderr
    data = __import__("json").loads(cli.stdout)
    assert data["reclaimed"][0]["task_id"] == task_id and data["dry_run"] is False
    assert TaskQueue(home).get(task_id)["status"] == "queued"  # type: ignore[index]


def test_reclaim_checks_the_owner_under_the_lock(home: Home) -> None:
    """A task that moved on (completed and re-claimed) is not reclaimed from its new owner."""
    worker_id, task_id = dead_worker_with_task(home)
    queue = TaskQueue(home)
    stale = queue.get(task_id)
    assert stale is not None
    queue.release(task_id, worker_id, reason="test")
    queue.claim("worker-other")
    from daemons.supervisor.reclaim import reclaim_task

    assert reclaim_task(home, queue, stale, "test proof", clock.now()) is None
    assert queue.get(task_id)["worker_id"] == "worker-other"  # type: ignore[index]


def test_task_of_a_worker_without_spec(home: Home) -> None:
    """Running under a worker with no spec at all: reclaimed once heartbeat_timeout_s
    passed since it started (a spec may be about to appear before that)."""
    queue = TaskQueue(home)
    task_id = queue.enqueue(req()).task["task_id"]
    queue.claim("worker-ghost")
    now = clock.now()
    assert reclaim_pass(home, now)["reclaimed"] == []
    out = reclaim_pass(home, now + 61)
    assert out["reclaimed"][0]["task_id"] == task_id
    assert "no active spec" in out["reclaimed"][0]["proof"]


# ---------------------------------------------------------------------------- the script
SCRIPT = REPO_ROOT / "scripts" / "cleanup-zombie-workers.sh"


def script_env(tmp_path: Path) -> dict[str, str]:
    env = daemon_env()
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "harness"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m daemons \"$@\"\n")
    shim.chmod(0o755)
    env["PATH"] = f"{bindir}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def test_cleanup_script(home: Home, tmp_path: Path) -> None:
    env = script_env(tmp_path)
    helptext = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True,
                              env=env, timeout=60, check=False)
    assert helptext.returncode == 0 and "--dry-run" in helptext.stdout
    bad = subprocess.run([str(SCRIPT), "--bogus"], capture_output=True, text=True, env=env,
                         timeout=60, check=False)
    assert bad.returncode == 2
    worker_id, task_id = dead_worker_with_task(home)
    dry = subprocess.run([str(SCRIPT), "--dry-run", "--home", str(home.root)],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert dry.returncode == 0, dry.stderr
    assert f"would reclaim {task_id}" in dry.stdout
    assert TaskQueue(home).get(task_id)["status"] == "running"  # type: ignore[index]
    env["HARNESS_HOME"] = str(home.root)  # resolved like the CLI: $HARNESS_HOME
    real = subprocess.run([str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert real.returncode == 0, real.stderr
    assert f"reclaimed {task_id}" in real.stdout and worker_id in real.stdout
    assert TaskQueue(home).get(task_id)["status"] == "queued"  # type: ignore[index]


def test_cleanup_script_is_shellcheck_clean() -> None:
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip(skip_reason("shellcheck"))
    out = subprocess.run([exe, "-x", str(SCRIPT)], capture_output=True, text=True,
                         timeout=60, check=False, cwd=REPO_ROOT / "scripts")
    assert out.returncode == 0, out.stdout + out.stderr
