"""`harness worker run` as a real process: signals, exit reasons, drain, pause/resume,
cancellation and dispatch through inotify. Every worker is a child of the ``procs`` fixture
(killed and reaped at teardown); every task writes its pid so teardown can kill it too."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    Child,
    ProcGroup,
    daemon_env,
    events,
    final_records,
    pid_alive,
    set_system,
    wait_until,
)

from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import WorkerSpec, read_specs
from daemons.worker.loop import Worker


def harness_argv() -> list[str]:
    return [sys.executable, "-m", "daemons"]





def _environ(pid: int) -> dict[bytes, bytes] | None:
    """The environment of process ``pid`` from /proc/PID/environ; None when it is gone or
    not ours to read (another user's process, or it vanished while we looked)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            data = fh.read()
    except OSError:  # FileNotFoundError, PermissionError, ProcessLookupError (ESRCH)
        return None
    env: dict[bytes, bytes] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key] = value
    return env


def task_processes(home_root: Path | None = None) -> list[int]:
    """Pids of live task processes: only processes whose /proc/PID/environ carries
    HARNESS_TASK_ID (set by a worker for every task it runs), and with ``home_root`` only
    those of that home (HARNESS_HOME), so other test runs' tasks and unrelated processes on
    the machine are never counted or killed."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    want = None if home_root is None else os.fsencode(str(home_root))
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        env = _environ(int(name))
        if env is None or b"HARNESS_TASK_ID" not in env:
            continue
        if want is not None and env.get(b"HARNESS_HOME") != want:
            continue
        found.append(int(name))
    return found


@pytest.fixture
def task_pids(tmp_path: Path) -> Iterator[Path]:
    """Tasks write their pids here. At teardown every task process still running under this
    test's directory is killed: found by its environment (HARNESS_TASK_ID, and HARNESS_HOME
    under ``tmp_path``), never by a recorded pid alone, which may have been reused by an
    unrelated process meanwhile."""
    folder = tmp_path / "pids"
    folder.mkdir()
    yield folder
    root = os.fsencode(str(tmp_path)) + b"/"
    for pid in task_processes():
        env = _environ(pid)
        if env is None or not (env.get(b"HARNESS_HOME", b"") + b"/").startswith(root):
            continue
        with contextlib.suppress(OSError):  # ProcessLookupError: gone; PermissionError
            os.kill(pid, signal.SIGKILL)


def start_worker(procs: ProcGroup, home: Home, *args: str, name: str = "worker") -> Child:
    child = procs.spawn(name, [*harness_argv(), "worker", "run", "--home", str(home.root),
                               *args], env=daemon_env())
    child.wait_for_line("started worker-", timeout=30)
    return child


def cli(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*harness_argv(), "--home", str(home.root), *args],
                          capture_output=True, text=True, timeout=60, env=daemon_env(),
                          check=False)


def completed_spec(home: Home, pid: int) -> WorkerSpec:
    for s in read_specs(home, completed=True):
        if s.spec and s.spec.get("pid") == pid:
            return s.spec
    raise AssertionError(f"no completed spec for pid {pid}")


def active_spec(home: Home, pid: int) -> WorkerSpec | None:
    for s in read_specs(home):
        if s.spec and s.spec.get("pid") == pid:
            return s.spec
    return None


def sleeper(pidfile: Path, seconds: float = 60) -> list[str]:
    return ["bash", "-c", f"echo $$ > {pidfile}; exec sleep {seconds}"]


# ---------------------------------------------------------------------------- signals
def test_sigterm_hands_running_task_back(home: Home, procs: ProcGroup, task_pids: Path) -> None:
    set_system(home, stop_grace_s=0.3, kill_grace_s=0.5)
    pidfile = task_pids / "long.pid"
    q = TaskQueue(home)
    task = q.enqueue({"command": sleeper(pidfile)}).task
    worker = start_worker(procs, home)
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the task")
    running = q.get(task["task_id"])
    assert running is not None and running["status"] == "running" and running["attempts"] == 1
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(15) == 0
    back = q.get(task["task_id"])
    assert back is not None
    assert back["status"] == "queued" and back["attempts"] == 0 and back["worker_id"] is None
    spec = completed_spec(home, worker.pid)
    assert spec["exit_reason"] == "signal" and spec["state"] == "stopped"
    assert not list(home.specs_active.glob("*.json"))
    assert not pid_alive(int(pidfile.read_text()))
    outcomes = [r["outcome"] for r in q.history_of(task["task_id"])]
    assert outcomes == ["released"]
    stopped = events(home, "worker_stopped")
    assert stopped and stopped[-1]["data"]["exit_reason"] == "signal"


def test_sigterm_lets_a_short_task_finish(home: Home, procs: ProcGroup) -> None:
    set_system(home, stop_grace_s=10)
    q = TaskQueue(home)
    task = q.enqueue({"command": ["sleep", "0.6"]}).task
    worker = start_worker(procs, home)
    wait_until(lambda: (q.get(task["task_id"]) or {"status": None})["status"] == "running",
               10, "start")
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(15) == 0
    assert final_records(home)[task["task_id"]][-1]["status"] == "completed"
    assert completed_spec(home, worker.pid)["exit_reason"] == "signal"


def test_sighup_reloads_config(home: Home, procs: ProcGroup) -> None:
    worker = start_worker(procs, home)
    set_system(home, idle_exit_s=1)
    os.kill(worker.pid, signal.SIGHUP)
    assert worker.wait(10) == 0
    assert events(home, "worker_reloaded")
    assert completed_spec(home, worker.pid)["exit_reason"] == "idle"


# ---------------------------------------------------------------------------- exit reasons
def test_idle_exit(home: Home, procs: ProcGroup) -> None:
    worker = start_worker(procs, home, "--idle-exit", "0.3")
    assert worker.wait(10) == 0
    spec = completed_spec(home, worker.pid)
    assert spec["exit_reason"] == "idle" and spec["completed_at"]
    assert "exit_reason idle" in worker.lines()[-1]
    # The fields operators' scripts read with jq: created_at, completed_at, worker_type.
    assert spec["created_at"] == spec["started_at"] <= spec["completed_at"]
    assert spec["worker_type"] == "any" and spec["types"] is None


def test_spec_names_the_single_type_served(home: Home, procs: ProcGroup) -> None:
    worker = start_worker(procs, home, "--types", "shell", "--idle-exit", "0.3")
    assert worker.wait(10) == 0
    spec = completed_spec(home, worker.pid)
    assert spec["worker_type"] == "shell" and spec["types"] == ["shell"]


def test_max_tasks_exit(home: Home, procs: ProcGroup) -> None:
    q = TaskQueue(home)
    ids = [q.enqueue({"command": ["true"]}).task["task_id"] for _ in range(3)]
    worker = start_worker(procs, home, "--max-tasks", "2")
    assert worker.wait(15) == 0
    spec = completed_spec(home, worker.pid)
    assert spec["exit_reason"] == "max_tasks" and spec["tasks_done"] == 2
    finals = final_records(home)
    assert sum(1 for t in ids if t in finals) == 2


def test_once_and_max_uptime(home: Home, procs: ProcGroup) -> None:
    q = TaskQueue(home)
    q.enqueue({"command": ["true"]})
    q.enqueue({"command": ["true"]})
    once = start_worker(procs, home, "--once", name="once")
    assert once.wait(15) == 0
    assert completed_spec(home, once.pid)["exit_reason"] == "once"
    assert len(q.live_tasks()) == 1
    up = start_worker(procs, home, "--max-uptime", "0.5", name="uptime")
    assert up.wait(15) == 0
    assert completed_spec(home, up.pid)["exit_reason"] == "max_uptime"


def test_unknown_type_is_a_usage_error(home: Home) -> None:
    proc = subprocess.run([*harness_argv(), "worker", "run", "--home", str(home.root),
                           "--types", "nope"], capture_output=True, text=True, timeout=60,
                          env=daemon_env(), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "unknown worker type 'nope'" in proc.stderr


# ---------------------------------------------------------------------------- control
def test_drain_finishes_current_task_and_spares_newer_workers(home: Home,
                                                              procs: ProcGroup) -> None:
    q = TaskQueue(home)
    task = q.enqueue({"command": ["sleep", "0.5"]}).task
    worker = start_worker(procs, home)
    wait_until(lambda: (q.get(task["task_id"]) or {"status": None})["status"] == "running",
               10, "start")
    out = cli(home, "drain")
    assert out.returncode == 0, out.stderr
    assert worker.wait(15) == 0
    assert final_records(home)[task["task_id"]][-1]["status"] == "completed"
    assert completed_spec(home, worker.pid)["exit_reason"] == "drained"
    control = json.loads(home.control_file.read_text())
    assert control["drain"]["all"]
    assert events(home, "drain_requested")
    # A worker started after the request is not drained by it.
    later = start_worker(procs, home, "--idle-exit", "0.5", name="later")
    assert later.wait(15) == 0
    assert completed_spec(home, later.pid)["exit_reason"] == "idle"


def test_drain_one_instance(home: Home, procs: ProcGroup) -> None:
    a = start_worker(procs, home, "--instance", "a", name="a")
    b = start_worker(procs, home, "--instance", "b", name="b")
    out = cli(home, "drain", "--instance", "a")
    assert out.returncode == 0, out.stderr
    assert a.wait(15) == 0
    assert completed_spec(home, a.pid)["exit_reason"] == "drained"
    assert b.popen.poll() is None and active_spec(home, b.pid) is not None
    os.kill(b.pid, signal.SIGTERM)
    assert b.wait(15) == 0


def test_pause_and_resume(home: Home, procs: ProcGroup) -> None:
    worker = start_worker(procs, home)
    out = cli(home, "pause", "--type", "default", "--reason", "maintenance")
    assert out.returncode == 0, out.stderr
    control = json.loads(home.control_file.read_text())
    assert control["paused_types"]["default"]["reason"] == "maintenance"
    q = TaskQueue(home)
    task = q.enqueue({"command": ["true"]}).task
    time.sleep(0.7)
    assert (q.get(task["task_id"]) or {"status": None})["status"] == "queued"
    out = cli(home, "resume", "--type", "default")
    assert out.returncode == 0, out.stderr
    wait_until(lambda: task["task_id"] in final_records(home), 5, "the resumed task")
    assert "default" not in json.loads(home.control_file.read_text())["paused_types"]
    assert events(home, "worker_type_paused") and events(home, "worker_type_resumed")
    # A timed pause ends by itself: the idle worker wakes when it expires.
    out = cli(home, "pause", "--type", "default", "--for", "0.8")
    assert out.returncode == 0, out.stderr
    t0 = time.monotonic()
    timed = q.enqueue({"command": ["true"]}).task
    wait_until(lambda: timed["task_id"] in final_records(home), 10, "the timed pause to end")
    assert time.monotonic() - t0 >= 0.5
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(15) == 0


def test_pause_unknown_type_and_resume_unpaused(home: Home) -> None:
    out = cli(home, "pause", "--type", "nope")
    assert out.returncode == 2 and "unknown worker type" in out.stderr
    out = cli(home, "resume", "--type", "default")
    assert out.returncode == 0 and "was not paused" in out.stdout


def test_pause_and_resume_take_the_type_as_an_argument(home: Home) -> None:
    """The README's form, `harness pause TYPE` / `harness resume TYPE`, beside --type."""
    out = cli(home, "pause", "shell", "--reason", "deploy")
    assert out.returncode == 0, out.stderr
    assert json.loads(home.control_file.read_text())["paused_types"]["shell"]["reason"] \
        == "deploy"
    out = cli(home, "resume", "shell")
    assert out.returncode == 0 and out.stdout.strip() == "resumed shell", out.stderr
    out = cli(home, "pause", "shell", "--type", "default")
    assert out.returncode == 2 and "not both" in out.stderr
    out = cli(home, "pause")
    assert out.returncode == 2 and "give the worker type" in out.stderr


# ---------------------------------------------------------------------------- dispatch
def test_idle_worker_picks_up_new_task_quickly(home: Home, procs: ProcGroup) -> None:
    """Sanity only (the figures are in daemons/devtools/worker_bench.py): an idle worker, woken by
    inotify rather than its 30 s safety re-check, runs a new task within a few seconds."""
    worker = start_worker(procs, home)
    wait_until(lambda: (active_spec(home, worker.pid) or {"state": None})["state"] == "idle",
               10, "idle")
    time.sleep(0.2)
    q = TaskQueue(home)
    t0 = time.monotonic()
    task = q.enqueue({"command": ["date", "+%s.%N"]}).task
    wait_until(lambda: task["task_id"] in final_records(home), 3, "the task")
    elapsed = time.monotonic() - t0
    print(f"enqueue -> completed on an idle worker: {elapsed * 1000:.1f} ms")
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(15) == 0


def test_cancel_running_task_via_cli(home: Home, procs: ProcGroup, task_pids: Path) -> None:
    pidfile = task_pids / "c.pid"
    q = TaskQueue(home)
    task = q.enqueue({"command": sleeper(pidfile)}).task
    worker = start_worker(procs, home)
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the task")
    out = cli(home, "task", "cancel", task["task_id"])
    assert out.returncode == 0, out.stderr
    t0 = time.monotonic()
    wait_until(lambda: task["task_id"] in final_records(home), 3, "the cancellation")
    print(f"cancel -> recorded: {(time.monotonic() - t0) * 1000:.0f} ms")
    assert final_records(home)[task["task_id"]][-1]["status"] == "cancelled"
    assert not pid_alive(int(pidfile.read_text()))
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(15) == 0


def test_timeout_in_worker_process_leaves_no_grandchild(home: Home, procs: ProcGroup,
                                                        task_pids: Path) -> None:
    set_system(home, kill_grace_s=0.5)
    gc = task_pids / "gc.pid"
    leader = task_pids / "leader.pid"
    q = TaskQueue(home)
    task = q.enqueue({"command": ["bash", "-c", f"echo $$ > {leader}; sleep 300 & "
                                                f"echo $! > {gc}; sleep 300"],
                      "timeout_s": 0.5, "max_attempts": 1}).task
    worker = start_worker(procs, home)
    wait_until(lambda: task["task_id"] in final_records(home), 10, "the timeout")
    assert final_records(home)[task["task_id"]][-1]["last_error"].startswith("timeout")
    # The worker is a child subreaper: the grandchild is killed and reaped, not a zombie.
    assert not os.path.exists(f"/proc/{int(gc.read_text())}")
    assert not pid_alive(int(leader.read_text()))
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(15) == 0


def test_two_workers_run_each_task_once(home: Home, procs: ProcGroup) -> None:
    q = TaskQueue(home)
    w1 = start_worker(procs, home, "--instance", "1", name="w1")
    w2 = start_worker(procs, home, "--instance", "2", name="w2")
    ids = [r.task["task_id"] for r in q.enqueue_batch([{"command": ["true"]}
                                                        for _ in range(40)])]
    wait_until(lambda: set(ids) <= set(final_records(home)), 30, "all tasks")
    finals = final_records(home)
    assert all(len(finals[t]) == 1 and finals[t][0]["attempts"] == 1 for t in ids)
    for w in (w1, w2):
        os.kill(w.pid, signal.SIGTERM)
    assert w1.wait(15) == 0 and w2.wait(15) == 0
    done = sum(completed_spec(home, w.pid)["tasks_done"] for w in (w1, w2))
    assert done == 40


def test_next_task_keeps_its_exit_status(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a success the worker claims and starts the next task in the same commit, then
    reaps the orphans of the finished one (as a child subreaper): that sweep must leave the
    next task's process alone, or it takes its exit status and a failure reads as exit 0.
    Here the next task (``false``) has always exited before the sweep runs."""
    from coordination import clock
    from daemons.worker.loop import Worker
    from daemons.worker.options import WorkerOptions

    q = TaskQueue(home)
    ok, bad = (r.task["task_id"] for r in q.enqueue_batch([
        {"command": ["true"], "priority": "high"},
        {"command": ["false"], "max_attempts": 1}]))
    worker = Worker(home, WorkerOptions(instance="reap"))
    worker.subreaper = True  # as run_worker sets it
    worker.start(clock.now())
    real = worker.queue.complete_and_claim

    def complete_and_claim(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        launched = worker.launched
        if launched is None or launched.run.pid is None:
            return out  # nothing left to claim
        # Until the next task has exited (a zombie of ours, not reaped: WNOWAIT).
        while os.waitid(os.P_PID, launched.run.pid,
                        os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            time.sleep(0.005)
        return out

    monkeypatch.setattr(worker.queue, "complete_and_claim", complete_and_claim)
    step_until(worker, lambda: {ok, bad} <= set(final_records(home)), 15)
    stop_in_process(worker)
    finals = final_records(home)
    assert (finals[ok][-1]["status"], finals[ok][-1]["exit_code"]) == ("completed", 0)
    assert (finals[bad][-1]["status"], finals[bad][-1]["exit_code"]) == ("failed", 1)


def test_worker_reaps_orphans_that_escaped_their_group(home: Home, procs: ProcGroup,
                                                       task_pids: Path) -> None:
    """A task child that setsid()s leaves the task's process group, so the group kill cannot
    reach it; when it exits later, the worker (a child subreaper) reaps it: no zombie."""
    escaped = task_pids / "escaped.pid"
    q = TaskQueue(home)
    first = q.enqueue({"command": ["bash", "-c", f"setsid sleep 0.3 & echo $! > {escaped}"]})
    worker = start_worker(procs, home)
    wait_until(lambda: first.task["task_id"] in final_records(home), 10, "the first task")
    pid = int(escaped.read_text())
    wait_until(lambda: not pid_alive(pid), 10, "the escaped process to exit")
    second = q.enqueue({"command": ["true"]}).task
    wait_until(lambda: second["task_id"] in final_records(home), 10, "the second task")
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 5, "the orphan to be reaped")
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(15) == 0


# ---------------------------------------------------------------------------- wake-ups
def test_wakeup_fires_on_queue_inbox_control_and_config_only(home: Home) -> None:
    from coordination.queue import FileQueue, open_queue
    from coordination.store import append_line, replace_bytes, replace_json
    from daemons.wakeup import Wakeup

    def commit_elsewhere() -> None:  # another process's queue commit (a journal write)
        other = FileQueue(home)
        other.enqueue({"command": ["true"]})
        other.close()  # publishes its jq view now, not from a timer later

    wakeup = Wakeup(home).start(signals=False)
    wakeup.follow_queue(open_queue(home))
    try:
        publishes: list[Callable[[], object]] = [
            commit_elsewhere,
            lambda: replace_bytes(home.queue_file, b'{"tasks": []}\n', "none"),  # by hand
            lambda: replace_bytes(home.inbox / "t-1.json", b"{}\n", "none"),
            lambda: replace_json(home.control_file, {"paused_types": {}}, "none"),
            lambda: replace_json(home.system_config, json.loads(
                home.system_config.read_text()), "none"),
        ]
        for publish in publishes:
            wakeup.clear()
            t0 = time.monotonic()
            publish()
            assert wakeup.wait(2), "no wake-up"
            assert time.monotonic() - t0 < 0.5
        # Writes that are not work (event log appends, specs, results) do not wake anyone.
        # First consume what the publishes above left queued in the kernel.
        while wakeup.wait(0.05):
            wakeup.clear()
        append_line(home.events_file, {"type": "x"}, "none")
        replace_json(home.specs_active / "w.json", {"worker_id": "w"}, "none")
        (home.results / "r").mkdir()
        assert not wakeup.wait(0.3)
    finally:
        wakeup.stop()


def test_wakeup_copies_io_without_waking_until_the_handler_says_so() -> None:
    """watch_io: a ready descriptor runs its handler inside wait(); only a handler that
    returns True ends the wait (a task's output is copied without a loop step, its exit
    or EOF wakes the loop). set() from another thread wakes it too."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    seen: list[bytes] = []

    def on_ready(fd: int) -> bool:
        data = os.read(fd, 4096)
        seen.append(data)
        return b"eof" in data

    from daemons.wakeup import Wakeup

    wakeup = Wakeup(None).start(signals=False)
    try:
        wakeup.watch_io("task", (r,), on_ready)
        os.write(w, b"output")
        assert not wakeup.wait(0.2)  # copied, not woken
        assert seen == [b"output"]
        os.write(w, b"eof")
        assert wakeup.wait(2)
        assert seen[-1] == b"eof"
        wakeup.watch_io(None, ())
        os.write(w, b"eof")
        assert not wakeup.wait(0.1)  # no longer watched
        threading.Timer(0.05, wakeup.set).start()
        assert wakeup.wait(2)
    finally:
        wakeup.stop()
        os.close(r)
        os.close(w)


def test_idle_worker_sleeps_without_polling(home: Home, procs: ProcGroup) -> None:
    """Over a quiet second an idle worker process uses (next to) no CPU."""
    import psutil

    worker = start_worker(procs, home)
    wait_until(lambda: (active_spec(home, worker.pid) or {"state": None})["state"] == "idle",
               10, "idle")
    proc = psutil.Process(worker.pid)
    time.sleep(0.3)
    before = proc.cpu_times()
    time.sleep(1.5)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    assert used < 0.05, f"idle worker used {used:.3f}s CPU in 1.5s"
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(15) == 0


# ---------------------------------------------------------------------------- declared dead
def test_worker_declared_dead_claims_nothing_and_writes_no_spec(home: Home) -> None:
    """The supervisor proved the worker dead and moved its spec to completed/ (crashed).
    The worker notices before its next claim: it exits (error) without claiming, without
    re-creating or updating a spec in active/, and leaves the completed spec as it is."""
    from coordination import clock
    from coordination.specs import complete_spec
    from daemons.worker.loop import Worker
    from daemons.worker.options import WorkerOptions

    worker = Worker(home, WorkerOptions(instance="dead"))
    now = clock.now()
    worker.start(now)
    assert (home.specs_active / f"{worker.worker_id}.json").exists()
    complete_spec(home, worker.worker_id, "crashed", now + 1, extra={"crash_proof": "test"})
    q = TaskQueue(home)
    task = q.enqueue({"command": ["true"]}).task
    assert worker.step(now + 2) is None
    assert worker.exit_reason == "error" and worker.dead
    worker.shutdown(now + 3)
    live = q.get(task["task_id"])
    assert live is not None and live["status"] == "queued" and live["attempts"] == 0
    assert not list(home.specs_active.glob("*.json"))
    spec = completed_spec(home, os.getpid())
    assert spec["exit_reason"] == "crashed" and spec["crash_proof"] == "test"
    assert not events(home, "task_claimed")


def test_task_processes_sees_only_harness_tasks(tmp_path: Path) -> None:
    """The teardown scan counts a process only when its environment carries HARNESS_TASK_ID
    (and, when asked, this home's HARNESS_HOME); it survives processes vanishing."""
    env = dict(os.environ, HARNESS_TASK_ID="t-scan", HARNESS_HOME=str(tmp_path / "h"))
    plain = dict(os.environ)
    plain.pop("HARNESS_TASK_ID", None)
    with subprocess.Popen(["sleep", "30"], env=env) as tagged, \
            subprocess.Popen(["sleep", "30"], env=plain) as other:
        try:
            wait_until(lambda: tagged.pid in task_processes(tmp_path / "h"), 5, "the scan")
            assert other.pid not in task_processes()
            assert tagged.pid not in task_processes(tmp_path / "elsewhere")
        finally:
            tagged.kill()
            other.kill()
    assert _environ(tagged.pid) is None  # reaped: gone, and no error


def step_until(worker: Worker, done: Callable[[], bool], timeout: float) -> None:
    """Step an in-process worker until ``done()``, sleeping its waits (at most 10 ms)."""
    from coordination import clock

    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the worker did not get there in time"
        wait = worker.step(clock.now())
        assert wait is not None
        time.sleep(min(wait, 0.01))


def stop_in_process(worker: Worker) -> None:
    """Stop an in-process worker as a signal would, and deregister it."""
    from coordination import clock

    worker.request_stop()
    while worker.step(clock.now()) is not None:
        time.sleep(0.01)
    worker.shutdown(clock.now())


def test_task_claimed_with_a_completion_is_handed_back_on_stop(home: Home) -> None:
    """After a task completes, the worker claims the next one in the same transaction
    (complete_and_claim). A stop that arrives before it starts hands it back (released,
    the attempt does not count), and the events of both commits are recorded in order."""
    from coordination import clock
    from daemons.worker.loop import Worker
    from daemons.worker.options import WorkerOptions

    q = TaskQueue(home)
    ids = {r.task["task_id"] for r in q.enqueue_batch([{"command": ["true"]},
                                                         {"command": ["true"]}])}
    worker = Worker(home, WorkerOptions(instance="ahead"))
    worker.start(clock.now())
    step_until(worker, lambda: worker.claimed is not None, 10)
    assert worker.claimed is not None and worker.claimed["task_id"] in ids
    second = worker.claimed
    (first_id,) = ids - {second["task_id"]}
    first = {"task_id": first_id}
    assert final_records(home)[first["task_id"]][-1]["status"] == "completed"
    running = q.get(second["task_id"])
    assert running is not None and running["status"] == "running"
    # The claim's hook started it already; the stop stops it before handing it back.
    launched = worker.launched
    assert launched is not None and launched.run.pid is not None
    assert launched.key[0] == second["task_id"]
    worker.request_stop()
    assert worker.step(clock.now()) is None and worker.exit_reason == "signal"
    assert worker.launched is None and launched.run.finished
    worker.shutdown(clock.now())
    back = q.get(second["task_id"])
    assert back is not None and back["status"] == "queued" and back["attempts"] == 0
    assert [r["outcome"] for r in q.history_of(second["task_id"])] == ["released"]
    types = [e["type"] for e in events(home) if e["task_id"] in (first["task_id"],
                                                                 second["task_id"])]
    assert types == ["task_enqueued", "task_enqueued", "task_claimed", "task_started",
                     "task_completed", "task_claimed", "task_released"]
    assert completed_spec(home, os.getpid())["tasks_done"] == 1


def test_claimed_task_is_spawned_inside_the_claim(home: Home,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle worker spawns the task in the claim's ``prepare`` hook, so the claim call
    returns with the task's process already running (the file queue's fdatasync overlaps
    the spawn); the worker then adopts that very process: its task_started event names it
    and the attempt completes."""
    from coordination import clock
    from daemons.worker.loop import Worker
    from daemons.worker.options import WorkerOptions

    q = TaskQueue(home)
    task = q.enqueue({"command": ["sleep", "0.3"]}).task
    worker = Worker(home, WorkerOptions(instance="hook"))
    worker.start(clock.now())
    alive_at_return: list[int] = []
    real_claim = worker.queue.claim

    def claim(*args: object, **kwargs: object) -> object:
        claimed = real_claim(*args, **kwargs)  # type: ignore[arg-type]
        launched = worker.launched
        assert launched is not None and launched.run.pid is not None
        os.kill(launched.run.pid, 0)  # running already
        alive_at_return.append(launched.run.pid)
        return claimed

    monkeypatch.setattr(worker.queue, "claim", claim)
    wait = worker.step(clock.now())
    assert wait is not None and alive_at_return and worker.run is not None
    assert worker.run.pid == alive_at_return[0] and worker.launched is None
    step_until(worker, lambda: worker.run is None, 10)
    stop_in_process(worker)
    (started,) = events(home, "task_started")
    assert started["task_id"] == task["task_id"]
    assert started["data"]["pid"] == alive_at_return[0]
    assert final_records(home)[task["task_id"]][-1]["status"] == "completed"


# ---------------------------------------------------------------------------- escapees
ESCAPING_TASK = Path(__file__).parent / "procs" / "escaping_task.py"


def _escapees(pidfile: Path) -> dict[str, tuple[int, float]]:
    """The escaping task's children: name -> (pid, start time), read while they run."""
    import psutil

    pids = wait_until(lambda: pidfile.exists() and json.loads(pidfile.read_text()), 30,
                      "the escaping task to start its children")
    return {name: (pid, psutil.Process(pid).create_time()) for name, pid in pids.items()}


def _still_running(escapees: dict[str, tuple[int, float]]) -> list[str]:
    """Those escapees whose pid still runs the same process (same start time)."""
    import psutil

    out = []
    for name, (pid, started) in escapees.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{name} (pid {pid})")
        except psutil.Error:
            continue
    return out


@pytest.mark.parametrize("stop", ["timeout", "cancel"])
def test_stopped_task_leaves_no_descendant(home: Home, procs: ProcGroup, task_pids: Path,
                                           stop: str) -> None:
    """Children that leave the task's process group (setsid, double-fork daemon,
    start_new_session, setpgid) are stopped with it, after a timeout and after a cancel,
    before the outcome is recorded; the worker reaps them (no zombie is left either)."""
    import psutil

    set_system(home, kill_grace_s=0.5)
    q = TaskQueue(home)
    pidfile = task_pids / "escapees.json"
    task = q.enqueue({"command": [sys.executable, str(ESCAPING_TASK), str(pidfile)],
                      "max_attempts": 1,
                      **({"timeout_s": 3} if stop == "timeout" else {})}).task
    worker = start_worker(procs, home)
    escapees = _escapees(pidfile)
    assert len(escapees) == 4 and not _still_running({}) and len(_still_running(escapees)) == 4
    if stop == "cancel":
        q.cancel(task["task_id"])
    wait_until(lambda: task["task_id"] in final_records(home), 30, "the task to be stopped")
    record = final_records(home)[task["task_id"]][-1]
    assert record["status"] in ("failed", "cancelled"), record
    assert ("timeout" if stop == "timeout" else "cancel") in record["last_error"], record
    # Gone by the time the outcome was recorded: the worker waits for them.
    assert _still_running(escapees) == [], worker.stderr()
    # The daemon was re-parented to the worker (its subreaper), which reaped it.
    zombies = wait_until(lambda: not [c for c in psutil.Process(worker.pid).children()
                                      if c.status() == psutil.STATUS_ZOMBIE], 5,
                         "the worker to reap its adopted zombies")
    assert zombies


def test_each_task_folder_is_the_workers_spare_renamed(
        home_factory: Callable[..., Home]) -> None:
    """A worker keeps an empty ``results/.spare-<worker_id>/`` and renames it to the task's
    folder at the spawn (no mkdir between claim and spawn), then makes the next spare; a
    retry's folder is kept as it was, and the worker removes its spare as it exits."""
    from coordination import clock
    from daemons.worker.options import WorkerOptions

    home = home_factory(retry_backoff_base_s=0)
    q = TaskQueue(home)
    first = q.enqueue({"command": ["sh", "-c", "echo kept >> notes.txt; sleep 0.3; exit 3"],
                       "max_attempts": 2}).task["task_id"]
    worker = Worker(home, WorkerOptions(instance="spare"))
    worker.start(clock.now())
    spare = home.spare_result_dir(worker.worker_id)
    inode = spare.stat().st_ino
    step_until(worker, lambda: worker.run is not None, 15)
    assert home.result_dir(first).stat().st_ino == inode
    assert spare.is_dir() and spare.stat().st_ino != inode  # the next one is ready
    # The retry runs in the same folder, with what the first attempt left there.
    step_until(worker, lambda: first in final_records(home), 15)
    assert (home.result_dir(first) / "notes.txt").read_text() == "kept\nkept\n"
    assert final_records(home)[first][-1]["attempts"] == 2
    assert spare.is_dir()
    stop_in_process(worker)
    assert not spare.exists()
    assert sorted(os.listdir(home.results)) == [first]
