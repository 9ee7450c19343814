"""``harness up`` and ``harness demo`` as real processes: tasks complete, Ctrl-C (SIGINT)
drains the workers (a running task is handed back), and no descendant survives."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from helpers import Child, ProcGroup, daemon_env, events, final_records, make_home, req, wait_until

from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import read_specs
from coordination.store import read_json

HARNESS = [sys.executable, "-m", "daemons"]


class Family:
    """Every process seen below ``root`` while it ran, identified by (pid, start time)."""

    def __init__(self, root: int) -> None:
        self.root = psutil.Process(root)
        self.seen: dict[int, float] = {}

    def sample(self) -> int:
        try:
            for proc in self.root.children(recursive=True):
                try:
                    self.seen.setdefault(proc.pid, proc.create_time())
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        return len(self.seen)

    def survivors(self) -> list[str]:
        out = []
        for pid, started in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - started) < 0.05 and \
                        proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{pid} {' '.join(proc.cmdline())}")
            except psutil.Error:
                continue
        return out


def processes_of_home(home: Home) -> list[str]:
    """Any live process with this home in its command line or environment."""
    needle = str(home.root)
    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if needle in " ".join(proc.info["cmdline"] or []) or \
                    proc.environ().get("HARNESS_HOME") == needle:
                out.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])}")
        except psutil.Error:
            continue
    return out


def start_up(procs: ProcGroup, home: Home, *args: str) -> Child:
    return procs.spawn("up", [*HARNESS, "--home", str(home.root), "up", *args],
                       env=daemon_env())


def test_up_runs_tasks_and_sigint_leaves_nothing_behind(tmp_path: Path,
                                                         procs: ProcGroup) -> None:
    # max_concurrent_workers 2: a burst of tasks must not scale the fleet up and then drain
    # the extra worker (exit_reason drained), which would make the exit reasons timing-bound.
    home = make_home(tmp_path, durability="none", heartbeat_interval_s=0.5,
                     stop_grace_s=1, kill_grace_s=1, retry_backoff_base_s=0,
                     scale_cooldown_s=1, max_concurrent_workers=2)
    up = start_up(procs, home, "--workers", "2")
    family = Family(up.pid)
    wait_until(lambda: family.sample() and len(read_specs(home)) == 2,
               what="two workers to register")
    queue = TaskQueue(home)
    ids = [queue.enqueue(req(command=["sh", "-c", "sleep 0.3; echo ok"],
                             description=f"up {i}")).task["task_id"] for i in range(6)]
    wait_until(lambda: family.sample() and all(
        t in final_records(home) for t in ids), what="the tasks to complete")
    assert {final_records(home)[t][-1]["status"] for t in ids} == {"completed"}
    # A long task is running when Ctrl-C arrives: it is handed back, not lost.
    long_id = queue.enqueue(req(command=["sleep", "300"], description="long")).task["task_id"]
    wait_until(lambda: family.sample() and (queue.get(long_id) or {"status": None})["status"]
               == "running", what="the long task to start")
    wait_until(lambda: family.sample() >= 4, timeout=10, what="the task process")
    os.kill(up.pid, signal.SIGINT)
    assert up.wait(90) == 0, up.stderr()
    assert "stopping" in "\n".join(up.lines())
    assert family.survivors() == []
    assert processes_of_home(home) == []
    task = queue.get(long_id)
    assert task is not None and task["status"] == "queued" and task["attempts"] == 0
    assert [r["outcome"] for r in queue.history_of(long_id)] == ["released"]
    assert read_specs(home) == []
    exits = {s.spec["exit_reason"] for s in read_specs(home, completed=True) if s.spec}
    assert exits == {"signal"}
    assert events(home, "scale_up")


def test_demo_on_a_fresh_home(tmp_path: Path, procs: ProcGroup) -> None:
    home = Home(tmp_path / "harness-home")  # does not exist yet: the demo initialises it
    demo = procs.spawn("demo", [*HARNESS, "--home", str(home.root), "demo"], env=daemon_env(),
                       cwd=tmp_path)
    family = Family(demo.pid)
    deadline = time.monotonic() + 100
    while demo.popen.poll() is None and time.monotonic() < deadline:
        family.sample()
        time.sleep(0.1)
    assert demo.wait(10) == 0, demo.stderr() + "\n".join(demo.lines())
    out = "\n".join(demo.lines())
    assert "demo finished: all 12 tasks completed" in out
    assert "--home ./harness-home status" in out and "events tail -f" in out
    assert "queue:" in out and "workers:" in out  # the status lines
    # The counts on a status line agree: never more busy workers than running tasks, and
    # never more workers than the 3 asked for (it used to scale to max_workers, 4).
    status = [m for m in (re.search(r"queue: (\d+) queued, (\d+) running \| workers: "
                                    r"(\d+) busy, (\d+) idle", x) for x in demo.lines()) if m]
    assert status
    for m in status:
        _, running, busy, idle = (int(g) for g in m.groups())
        assert busy <= running and busy + idle <= 3, m.group(0)
    assert status[-1].group(0) == "queue: 0 queued, 0 running | workers: 0 busy, 3 idle"
    finals = {t: r[-1] for t, r in final_records(home).items()}
    assert len(finals) == 12 and {r["status"] for r in finals.values()} == {"completed"}
    flaky = [r for r in finals.values() if "flaky" in r["description"]]
    assert flaky and flaky[0]["attempts"] == 2
    deploy = next(r for r in finals.values() if "deploy" in r["description"])
    build = next(r for r in finals.values() if "build (" in r["description"])
    assert deploy["started_at"] >= build["completed_at"]
    assert build["result"]["tokens_used"] == 42
    assert family.survivors() == []
    assert read_json(home.system_config)["version"] == 1


def _live_workers(home: Home) -> dict[int, float]:
    """pid -> start time of every registered worker process that still runs."""
    out = {}
    for read in read_specs(home):
        if read.spec is None:
            continue
        pid = int(read.spec["pid"])
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                out[pid] = proc.create_time()
        except psutil.Error:
            continue
    return out


def _running(procs: dict[int, float]) -> list[int]:
    """Those of ``procs`` (pid -> start time) still running as the same process."""
    alive = []
    for pid, started in procs.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


def test_workers_die_with_a_killed_up(tmp_path: Path, procs: ProcGroup) -> None:
    """kill -9 of `harness up`: its workers get SIGTERM from the kernel (parent-death
    signal), hand back their task and exit within seconds instead of running on with
    parent 1. Their task processes go with them."""
    home = make_home(tmp_path, durability="none", heartbeat_interval_s=0.5,
                     stop_grace_s=1, kill_grace_s=0.5, retry_backoff_base_s=0)
    up = start_up(procs, home, "--workers", "2")
    family = Family(up.pid)
    workers = wait_until(lambda: (lambda w: w if len(w) == 2 else None)(_live_workers(home)),
                         what="two workers to register")
    queue = TaskQueue(home)
    long_id = queue.enqueue(req(command=["sleep", "300"], description="long")).task["task_id"]
    wait_until(lambda: family.sample() and (queue.get(long_id) or {"status": None})["status"]
               == "running", what="the long task to start")
    wait_until(lambda: family.sample() >= 3, timeout=10, what="the task process")
    os.kill(up.pid, signal.SIGKILL)
    up.wait(10)
    try:
        wait_until(lambda: not _running(workers), timeout=10,
                   what=f"the workers of the killed up to exit (still running: {workers})")
        wait_until(lambda: family.survivors() == [], timeout=10, what="the task processes")
    finally:  # never leave an orphan behind, even when the assertion failed
        for pid in _running(workers):
            os.kill(pid, signal.SIGKILL)
    task = queue.get(long_id)
    assert task is not None and task["status"] == "queued", task  # handed back, not lost


def test_up_stops_the_workers_it_adopted(tmp_path: Path, procs: ProcGroup) -> None:
    """Workers of this home that are not its children (left by an earlier up, or started
    by hand) count towards `up --workers`; when that up stops, it stops them too."""
    home = make_home(tmp_path, durability="none", heartbeat_interval_s=0.5,
                     stop_grace_s=1, kill_grace_s=0.5, retry_backoff_base_s=0)
    strays = [procs.spawn(f"stray-{i}", [*HARNESS, "worker", "run", "--instance", f"s{i}",
                                          "--home", str(home.root)], env=daemon_env())
              for i in range(2)]
    for stray in strays:
        stray.wait_for_line("started worker-", timeout=30)
    adopted = _live_workers(home)
    assert sorted(adopted) == sorted(s.pid for s in strays)
    up = start_up(procs, home, "--workers", "2")
    up.wait_for_line("supervisor pid", timeout=30)
    time.sleep(1.5)  # a few passes: the two strays are its fleet, it starts none
    assert sorted(_live_workers(home)) == sorted(adopted)
    os.kill(up.pid, signal.SIGINT)
    assert up.wait(60) == 0, up.stderr()
    assert "adopted worker(s)" in "\n".join(up.lines())
    for stray in strays:  # they exit on their own, through the SIGTERM of up
        assert stray.wait(10) == 0, stray.stderr()
    assert _running(adopted) == []
    exits = {s.spec["exit_reason"] for s in read_specs(home, completed=True) if s.spec}
    assert exits == {"signal"}


def test_up_workers_n_means_n_with_progress_and_an_exit_summary(tmp_path: Path,
                                                               procs: ProcGroup) -> None:
    """`up --workers 2` keeps 2 workers even under a queue deep enough for the autoscaler
    to want max_workers (4); --progress prints status lines; the exit summary counts what
    ran and what is left, and says what to run next."""
    home = make_home(tmp_path, durability="none", heartbeat_interval_s=0.5,
                     stop_grace_s=1, kill_grace_s=1, scale_cooldown_s=0,
                     scale_up_threshold=0.5, max_workers=4)
    queue = TaskQueue(home)
    ids = [t.task["task_id"] for t in queue.enqueue_batch(
        [req(command=["sleep", "0.4"], description=f"n {i}") for i in range(16)])]
    blocked = queue.enqueue(req(description="after a missing dependency",
                                not_before="2999-01-01T00:00:00.000Z")).task["task_id"]
    up = start_up(procs, home, "--workers", "2", "--progress")
    family = Family(up.pid)
    most = 0

    def done() -> bool:
        nonlocal most
        family.sample()
        most = max(most, len(read_specs(home)))
        return all(t in final_records(home) for t in ids)

    wait_until(done, what="the tasks to complete", interval=0.05)
    assert most == 2, f"{most} workers ran"
    assert all(e["data"]["to"] <= 2 for e in events(home, "scale_up"))
    line = wait_until(lambda: next((x for x in up.lines() if x.startswith("[")
                                    and "done 16" in x), None), timeout=20,
                      what="a progress line after the work")
    assert re.search(r"\] queued 1, running 0, done 16, failed 0 \| workers 2 "
                     r"\(0 busy, 2 idle\)$", line), line
    os.kill(up.pid, signal.SIGINT)
    assert up.wait(60) == 0, up.stderr()
    out = up.lines()
    (summary,) = [x for x in out if x.startswith("harness up ran ")]
    assert summary.endswith(": 16 task(s) done, 0 failed, 1 still queued"), summary
    nexts = [x for x in out if x.startswith("  next: ")]
    assert any(" up` runs the rest" in x for x in nexts), out
    assert any(" status` for the whole picture" in x for x in nexts), out
    assert (queue.get(blocked) or {"status": None})["status"] == "queued"
    assert family.survivors() == []


def test_up_max_workers_below_workers_is_a_usage_error(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    done = subprocess.run([*HARNESS, "--home", str(home.root), "up", "--workers", "3",
                           "--max-workers", "2"], capture_output=True, text=True,
                          timeout=60, env=daemon_env(), check=False)
    assert done.returncode == 2 and "--max-workers (2) must be >= --workers (3)" \
        in done.stderr, done.stderr


def test_up_demo_creates_a_new_home(tmp_path: Path, procs: ProcGroup) -> None:
    """`harness up --demo` on a directory that does not exist initialises it, as `harness
    demo` does (it used to fail: home not initialised)."""
    home = Home(tmp_path / "new-home")
    up = procs.spawn("up", [*HARNESS, "--home", str(home.root), "up", "--demo",
                            "--workers", "3", "--no-progress"], env=daemon_env(),
                     cwd=tmp_path)
    family = Family(up.pid)
    wait_until(lambda: family.sample() and len(final_records(home)) == 12, timeout=100,
               what="the 12 demo tasks", interval=0.1)
    os.kill(up.pid, signal.SIGINT)
    assert up.wait(60) == 0, up.stderr()
    out = up.lines()
    assert out[0] == f"initialised home {home.root}"
    assert out[1].startswith("enqueued 12 demo tasks")
    assert not any(x.startswith("[") for x in out)  # --no-progress
    assert any(x.startswith("harness up ran ") and ": 12 task(s) done, 0 failed, 0 still "
               "queued" in x for x in out), out
    assert read_json(home.system_config)["version"] == 1
    assert family.survivors() == []
