"""The task runner and the worker step, driven in-process (no worker subprocess).

A :class:`Worker` is stepped with the real clock by :func:`drive`; tasks are real processes.
Everything a test starts is killed at teardown (the ``task_pids`` fixture collects the pid
files the tasks write).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import events, final_records, pid_alive, present, set_system, wait_until

from coordination.config import scope_properties, validate_worker_types
from coordination.config_keys import DEFAULT_WORKER_TYPES
from coordination.errors import ConfigError
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import WorkerSpec, read_specs
from coordination.store import replace_json
from daemons.notify import Notifier
from daemons.process_groups import group_alive
from daemons.wakeup import Wakeup
from daemons.worker.loop import Worker, wait_after_step
from daemons.worker.options import WorkerOptions
from daemons.worker.process_setup import build_env, rlimits
from daemons.worker.scopes import (
    Scope,
    ScopeManager,
    find_scope_manager,
    scope_command,
    scope_unit_name,
)
from daemons.worker.task_run import (
    TRUNCATION_MARKER,
    RunSpec,
    TaskRun,
    describe_exit,
)

PY = sys.executable




@pytest.fixture
def task_pids(tmp_path: Path) -> Iterator[Path]:
    """A directory where tasks write ``*.pid``; every such process group is killed after."""
    folder = tmp_path / "pids"
    folder.mkdir()
    yield folder
    for path in folder.glob("*.pid"):
        try:
            pid = int(path.read_text().split()[0])
        except (ValueError, OSError):
            continue
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # tasks lead their own process group
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class Driver:
    """Steps a worker with the real clock, waiting on an in-process wake-up event."""

    def __init__(self, worker: Worker, wakeup: Wakeup) -> None:
        self.worker = worker
        self.wakeup = wakeup

    def until(self, cond: Callable[[], Any], timeout: float = 15.0, what: str = "it") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self.wakeup.clear()
            delay = self.worker.step(time.time())
            if delay is None:
                value = cond()
                if value:
                    return value
                raise AssertionError(f"worker exited ({self.worker.exit_reason}) before {what}")
            wait_after_step(self.worker, self.wakeup, min(delay, 0.1))

    def run_to_exit(self, timeout: float = 15.0) -> str:
        """Step until the worker exits, then shut it down; returns the exit reason."""
        deadline = time.monotonic() + timeout
        while True:
            self.wakeup.clear()
            delay = self.worker.step(time.time())
            if delay is None:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"worker still running after {timeout}s")
            wait_after_step(self.worker, self.wakeup, min(delay, 0.1))
        self.worker.shutdown(time.time())
        assert self.worker.exit_reason is not None
        return self.worker.exit_reason


@pytest.fixture
def make_worker(home: Home) -> Iterator[Callable[..., Driver]]:
    made: list[tuple[Worker, Wakeup]] = []

    def make(environ: dict[str, str] | None = None, inotify: bool = False,
             **opts: Any) -> Driver:
        wakeup = Wakeup(home if inotify else None).start(signals=False)
        env = dict(os.environ) if environ is None else environ
        worker = Worker(home, WorkerOptions(**opts), environ=env,
                        notifier=Notifier({}))
        worker.start(time.time())
        made.append((worker, wakeup))
        return Driver(worker, wakeup)

    yield make
    for worker, wakeup in made:
        if worker.run is not None:
            worker.run.close()
        wakeup.stop()


def add_types(home: Home, **types: dict[str, Any]) -> None:
    cfg = json.loads(json.dumps(DEFAULT_WORKER_TYPES))
    cfg["worker_types"].update(types)
    replace_json(home.worker_types_config, cfg, pretty=True)


def final(home: Home, task_id: str) -> dict[str, Any]:
    records = final_records(home).get(task_id)
    assert records, f"no final record for {task_id}"
    return records[-1]


# ---------------------------------------------------------------------------- unit level
def test_build_env_is_an_allowlist() -> None:
    env = build_env({"PATH": "/bin", "SECRET": "x", "LANG": "C"}, ["PATH", "LANG", "NOPE"],
                    {"HARNESS_TASK_ID": "t1"})
    assert env == {"PATH": "/bin", "LANG": "C", "HARNESS_TASK_ID": "t1"}


def test_rlimits_and_exit_description() -> None:
    import resource

    triples = rlimits({"memory_mb": 64, "cpu_seconds": 3, "processes": None})
    assert (resource.RLIMIT_AS, 64 * 2**20, 64 * 2**20) in triples
    assert (resource.RLIMIT_CPU, 3, 4) in triples
    assert describe_exit(0) == (0, "exit code 0")
    assert describe_exit(-9) == (137, "killed by SIGKILL")


def test_task_run_kills_grandchild_left_behind_by_leader(tmp_path: Path, task_pids: Path) -> None:
    pidfile = task_pids / "gc.pid"
    run = TaskRun(RunSpec(task_id="t-x", attempt=1, cwd=tmp_path, env={"PATH": os.defpath},
                          argv=["bash", "-c", f"sleep 300 & echo $! > {pidfile}; exit 0"],
                          log_path=tmp_path / "t.log", log_max_bytes=4096, kill_grace_s=1))
    run.start()
    wait_until(run.poll, 10, "the attempt to end")
    grandchild = int(pidfile.read_text())
    assert run.returncode == 0
    assert not pid_alive(grandchild)
    assert not group_alive(run.pid or 0)


def test_task_run_output_cap(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    run = TaskRun(RunSpec(task_id="t-x", attempt=1, cwd=tmp_path, env={"PATH": os.defpath},
                          argv=[PY, "-c", "import sys; sys.stdout.write('x' * 200000)"],
                          log_path=log, log_max_bytes=2048, header="=== header ==="))
    run.start()
    wait_until(run.poll, 10, "the attempt to end")
    data = log.read_text()
    marker = TRUNCATION_MARKER.format(cap=2048)
    assert data.count(marker) == 1
    assert data.startswith("=== header ===\n")
    assert len(data.encode()) <= 2048 + len(marker) + 2
    assert run.truncated and run.output_bytes == 200000


# What a worker does with its task, run as a script: the task tries to open /dev/tty.
_TTY_PROBE = """
import os, sys, time
from pathlib import Path
from daemons.process_groups import new_session_needed
from daemons.worker.task_run import RunSpec, TaskRun
tmp = Path(sys.argv[1])
probe = ("import os\\ntry:\\n    os.close(os.open('/dev/tty', os.O_RDONLY))\\n"
         "    print('tty')\\nexcept OSError:\\n    print('no tty')")
run = TaskRun(RunSpec(task_id="t-tty", attempt=1, cwd=tmp, env={"PATH": os.defpath},
                      argv=[sys.executable, "-c", probe], log_path=tmp / "t.log",
                      log_max_bytes=4096))
run.start()
while not run.poll():
    time.sleep(0.01)
print("worker", "has" if new_session_needed() else "lacks", "a terminal")
print("task:", (tmp / "t.log").read_text().strip())
"""


def test_a_task_never_gets_the_workers_terminal(tmp_path: Path) -> None:
    """A worker run by hand has a controlling terminal: its tasks start in a new session,
    so a task cannot open /dev/tty (nor get the terminal's signals). Under systemd, or
    started detached, there is no terminal and a new process group is all a task gets (a
    new session would cost a scheduler autogroup per spawn); the task has none either."""
    import pty
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with_tty = tmp_path / "tty"
    with_tty.mkdir()
    pid, master = pty.fork()  # the child leads a session whose terminal is the pty
    if pid == 0:  # pragma: no cover - the child
        os.execve(PY, [PY, "-c", _TTY_PROBE, str(with_tty)], env)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child is gone
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert "worker has a terminal" in out and "task: no tty" in out

    detached = tmp_path / "detached"
    detached.mkdir()
    proc = subprocess.run([PY, "-c", _TTY_PROBE, str(detached)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          start_new_session=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "worker lacks a terminal" in proc.stdout and "task: no tty" in proc.stdout


# ---------------------------------------------------------------------------- worker level
def test_runs_task_records_result_and_history(home: Home, make_worker: Callable[..., Driver]) \
        -> None:
    q = TaskQueue(home)
    script = ("import json, os; print('working'); json.dump({'tokens_used': 1234, "
              "'summary': 'done'}, open(os.environ['HARNESS_RESULT_FILE'], 'w'))")
    task = q.enqueue({"command": [PY, "-c", script]}).task
    d = make_worker()
    d.until(lambda: task["task_id"] in final_records(home), what="completion")
    rec = final(home, task["task_id"])
    assert rec["status"] == "completed" and rec["exit_code"] == 0
    assert rec["result"] == {"tokens_used": 1234, "summary": "done"}
    stored = json.loads((home.result_dir(task["task_id"]) / "result.json").read_text())
    assert stored["summary"] == "done"
    log = home.task_log(task["task_id"]).read_text()
    assert "working" in log and log.startswith("=== harness:")
    d.until(lambda: d.worker.spec.get("tokens_used") == 1234, what="token accounting")
    assert d.worker.spec["tasks_done"] == 1
    assert [e["type"] for e in events(home, "task_started")] == ["task_started"]


def test_env_allowlist(home: Home, make_worker: Callable[..., Driver]) -> None:
    add_types(home, agent={"command_template": None, "env_allowlist": ["ALLOWED_KEY"]})
    q = TaskQueue(home)
    dump = ("import json, os; "
            "json.dump(dict(os.environ), open(os.environ['HARNESS_RESULT_FILE'], 'w'))")
    t1 = q.enqueue({"command": [PY, "-c", dump], "worker_type": "agent"}).task
    t2 = q.enqueue({"command": [PY, "-c", dump]}).task
    environ = {"PATH": os.environ["PATH"], "HOME": "/nonexistent-home", "LANG": "C.UTF-8",
               "OPENAI_API_KEY": "sk-secret", "ALLOWED_KEY": "yes", "NOTIFY_SOCKET": "/x"}
    d = make_worker(environ=environ)
    d.until(lambda: {t1["task_id"], t2["task_id"]} <= set(final_records(home)), what="both")
    env1 = final(home, t1["task_id"])["result"]
    env2 = final(home, t2["task_id"])["result"]
    assert "OPENAI_API_KEY" not in env1 and "NOTIFY_SOCKET" not in env1
    assert env1["ALLOWED_KEY"] == "yes"
    assert "ALLOWED_KEY" not in env2  # the default type does not allow it
    assert env1["HOME"] == "/nonexistent-home" and env1["LANG"] == "C.UTF-8"
    assert env1["HARNESS_TASK_ID"] == t1["task_id"]
    assert env1["HARNESS_HOME"] == str(home.root)
    assert env1["HARNESS_ATTEMPT"] == "1"
    assert env1["HARNESS_WORKER_ID"] == d.worker.worker_id
    assert env1["HARNESS_RESULT_FILE"] == str(home.result_dir(t1["task_id"]) / "result.json")
    extra = set(env1) - {"PATH", "HOME", "LANG", "ALLOWED_KEY", "HARNESS_TASK_ID",
                         "HARNESS_HOME", "HARNESS_ATTEMPT", "HARNESS_RESULT_FILE",
                         "HARNESS_WORKER_ID", "PWD", "LC_CTYPE"}
    assert not extra, extra


def test_timeout_kills_process_group_with_grandchild(
        home: Home, make_worker: Callable[..., Driver], task_pids: Path) -> None:
    set_system(home, kill_grace_s=0.5, retry_backoff_base_s=0)
    pidfile = task_pids / "grandchild.pid"
    leader = task_pids / "leader.pid"
    script = f"echo $$ > {leader}; sleep 300 & echo $! > {pidfile}; sleep 300"
    q = TaskQueue(home)
    task = q.enqueue({"command": ["bash", "-c", script], "timeout_s": 0.5,
                      "max_attempts": 1}).task
    d = make_worker()
    started = time.monotonic()
    d.until(lambda: task["task_id"] in final_records(home), what="the timeout")
    assert time.monotonic() - started < 8
    rec = final(home, task["task_id"])
    assert rec["status"] == "failed" and rec["last_error"].startswith("timeout after 0.5s")
    grandchild = int(pidfile.read_text())
    assert not pid_alive(grandchild), "the grandchild survived the timeout"
    assert not pid_alive(int(leader.read_text()))
    assert events(home, "task_timeout")


def test_timeout_escalates_to_sigkill(home: Home, make_worker: Callable[..., Driver],
                                      task_pids: Path) -> None:
    set_system(home, kill_grace_s=0.3)
    pidfile = task_pids / "stubborn.pid"
    script = f"trap '' TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done"
    task = TaskQueue(home).enqueue({"command": ["bash", "-c", script], "timeout_s": 0.3,
                                    "max_attempts": 1}).task
    d = make_worker()
    d.until(lambda: task["task_id"] in final_records(home), what="the kill")
    rec = final(home, task["task_id"])
    assert rec["exit_code"] == 128 + signal.SIGKILL
    assert "SIGKILL" in rec["last_error"]
    assert not pid_alive(int(pidfile.read_text()))


def test_cancel_running_task(home: Home, make_worker: Callable[..., Driver],
                             task_pids: Path) -> None:
    pidfile = task_pids / "cancel.pid"
    q = TaskQueue(home)
    task = q.enqueue({"command": ["bash", "-c", f"echo $$ > {pidfile}; exec sleep 300"]}).task
    d = make_worker(inotify=True)
    d.until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the task")
    q.cancel(task["task_id"])
    t0 = time.monotonic()
    d.until(lambda: task["task_id"] in final_records(home), what="the cancellation")
    assert time.monotonic() - t0 < 2.5
    rec = final(home, task["task_id"])
    assert rec["status"] == "cancelled" and rec["outcome"] == "cancelled"
    assert not pid_alive(int(pidfile.read_text()))
    assert not (home.dead_letter(task["task_id"])).exists()


def test_output_cap_emits_event(home: Home, make_worker: Callable[..., Driver]) -> None:
    set_system(home, task_log_max_bytes=1024)
    q = TaskQueue(home)
    task = q.enqueue({"command": [PY, "-c", "print('y' * 100000)"]}).task
    d = make_worker()
    d.until(lambda: task["task_id"] in final_records(home), what="completion")
    log = home.task_log(task["task_id"]).read_text()
    assert log.count("[harness: output truncated at 1024 bytes]") == 1
    # header + at most 1024 bytes of output + marker + footer
    assert len(log.encode()) < 1024 + 400
    assert final(home, task["task_id"])["status"] == "completed"
    assert [e["task_id"] for e in events(home, "task_output_truncated")] == [task["task_id"]]


def test_budget_exceeded_fails_without_retry(home: Home,
                                             make_worker: Callable[..., Driver]) -> None:
    add_types(home, metered={"command_template": None, "default_budget": 50})
    q = TaskQueue(home)
    writer = ("import json, os; json.dump({'tokens_used': %d}, "
              "open(os.environ['HARNESS_RESULT_FILE'], 'w'))")
    over = q.enqueue({"command": [PY, "-c", writer % 100], "budget": 10,
                      "max_attempts": 3}).task
    typed = q.enqueue({"command": [PY, "-c", writer % 60], "worker_type": "metered"}).task
    under = q.enqueue({"command": [PY, "-c", writer % 40], "worker_type": "metered"}).task
    d = make_worker()
    ids = {over["task_id"], typed["task_id"], under["task_id"]}
    d.until(lambda: ids <= set(final_records(home)), what="all three")
    for t in (over, typed):
        rec = final(home, t["task_id"])
        assert rec["status"] == "failed" and rec["last_error"] == "budget_exceeded"
        assert rec["attempts"] == 1
        assert home.dead_letter(t["task_id"]).exists()
    assert final(home, under["task_id"])["status"] == "completed"
    d.until(lambda: d.worker.spec.get("tokens_used") == 200, what="token accounting")
    assert len(events(home, "task_budget_exceeded")) == 2


def test_nonzero_exit_retries_then_dead_letters(home: Home,
                                                make_worker: Callable[..., Driver]) -> None:
    set_system(home, retry_backoff_base_s=0)
    q = TaskQueue(home)
    task = q.enqueue({"command": ["bash", "-c", "echo boom >&2; exit 3"],
                      "max_attempts": 2}).task
    d = make_worker()
    d.until(lambda: task["task_id"] in final_records(home), what="the dead letter")
    rec = final(home, task["task_id"])
    assert rec["status"] == "failed" and rec["exit_code"] == 3 and rec["attempts"] == 2
    assert rec["last_error"] == "exit code 3: boom"
    log = home.task_log(task["task_id"]).read_text()
    assert log.count("=== harness: t-") == 2  # one header per attempt
    assert d.worker.spec["tasks_failed"] == 2


def test_command_not_found(home: Home, make_worker: Callable[..., Driver]) -> None:
    task = TaskQueue(home).enqueue({"command": ["/nonexistent/binary"]}).task
    d = make_worker()
    d.until(lambda: task["task_id"] in final_records(home), what="the failure")
    rec = final(home, task["task_id"])
    assert rec["status"] == "failed" and rec["exit_code"] == 127 and rec["attempts"] == 1


def test_memory_limit(home: Home, make_worker: Callable[..., Driver]) -> None:
    add_types(home, small={"command_template": None, "limits": {"memory_mb": 200}})
    q = TaskQueue(home)
    grab = "b = bytearray(400 * 1024 * 1024)"
    task = q.enqueue({"command": [PY, "-c", grab], "worker_type": "small",
                      "max_attempts": 1}).task
    ok = q.enqueue({"command": [PY, "-c", "b = bytearray(400 * 1024 * 1024)"],
                    "max_attempts": 1}).task
    d = make_worker()
    d.until(lambda: {task["task_id"], ok["task_id"]} <= set(final_records(home)), what="both")
    assert final(home, task["task_id"])["status"] == "failed"
    assert "MemoryError" in home.task_log(task["task_id"]).read_text()
    assert final(home, ok["task_id"])["status"] == "completed"


def test_cwd_is_result_dir_or_type_cwd(home: Home, make_worker: Callable[..., Driver],
                                       tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    workdir.mkdir()
    add_types(home, placed={"command_template": None, "cwd": str(workdir)})
    q = TaskQueue(home)
    pwd = "import os; print('CWD=' + os.getcwd())"
    t1 = q.enqueue({"command": [PY, "-c", pwd]}).task
    t2 = q.enqueue({"command": [PY, "-c", pwd], "worker_type": "placed"}).task
    d = make_worker()
    d.until(lambda: {t1["task_id"], t2["task_id"]} <= set(final_records(home)), what="both")
    assert f"CWD={home.result_dir(t1['task_id'])}\n" in home.task_log(t1["task_id"]).read_text()
    assert f"CWD={workdir}\n" in home.task_log(t2["task_id"]).read_text()


def test_max_tasks_and_idle_exit_in_process(home: Home,
                                            make_worker: Callable[..., Driver]) -> None:
    q = TaskQueue(home)
    for _ in range(3):
        q.enqueue({"command": ["true"]})
    d = make_worker(max_tasks=2)
    assert d.run_to_exit() == "max_tasks"
    assert sum(1 for t in q.live_tasks() if t["status"] == "queued") == 1
    done = read_specs(home, completed=True)
    assert [s.spec["exit_reason"] for s in done if s.spec] == ["max_tasks"]
    d2 = make_worker(idle_exit_s=0.2)
    t0 = time.monotonic()
    assert d2.run_to_exit() == "idle"
    assert 0.15 < time.monotonic() - t0 < 3


def test_idle_exit_by_injected_clock(home: Home) -> None:
    """step(now) decides from the time it is given: no sleeping needed."""
    worker = Worker(home, WorkerOptions(idle_exit_s=30), notifier=Notifier({}))
    t0 = time.time()
    worker.start(t0)
    delay = worker.step(t0 + 1)
    assert delay is not None and 0 < delay <= 29.5
    assert worker.step(t0 + 31) is None and worker.exit_reason == "idle"
    spec = worker.shutdown(t0 + 31)
    assert spec is not None and spec["exit_reason"] == "idle"
    assert not list(home.specs_active.glob("*.json"))


def test_idle_wait_wakes_for_not_before(home: Home) -> None:
    q = TaskQueue(home)
    t0 = time.time()
    from coordination import clock

    q.enqueue({"command": ["true"], "not_before": clock.iso(t0 + 7)})
    worker = Worker(home, WorkerOptions(), notifier=Notifier({}))
    worker.start(t0)
    delay = worker.step(t0)
    assert delay is not None and 6.5 < delay < 7.5
    worker.exit_reason = "signal"
    worker.shutdown(t0)


def test_heartbeat_refreshes_spec_while_busy(home: Home, make_worker: Callable[..., Driver],
                                             task_pids: Path) -> None:
    set_system(home, heartbeat_interval_s=0.1)
    pidfile = task_pids / "hb.pid"
    q = TaskQueue(home)
    q.enqueue({"command": ["bash", "-c", f"echo $$ > {pidfile}; for i in 1 2 3 4 5 6; do "
                                         "echo tick; sleep 0.1; done"]})
    d = make_worker()

    def spec() -> WorkerSpec | dict[str, Any]:
        found = [s.spec for s in read_specs(home) if s.spec]
        return found[0] if found else {}

    d.until(lambda: spec().get("state") == "busy" and spec().get("progress", 0) > 0,
            what="a busy heartbeat with progress")
    busy = spec()
    assert busy["current_task_id"] and busy["task_started_at"]
    d.until(lambda: spec().get("state") == "idle" and spec().get("tasks_done") == 1,
            what="idle again")


@pytest.mark.parametrize("silence_stalls", [False, True])
def test_progress_of_a_silent_task(home: Home, make_worker: Callable[..., Driver],
                                   task_pids: Path, silence_stalls: bool) -> None:
    """A silent task advances its progress by heartbeats, unless its type sets
    stall_on_silence: then only output counts, so the supervisor can call it stalled."""
    set_system(home, heartbeat_interval_s=0.05)
    add_types(home, quiet={"command_template": None, "stall_on_silence": silence_stalls})
    pidfile = task_pids / "quiet.pid"
    q = TaskQueue(home)
    task = q.enqueue({"command": ["bash", "-c", f"echo $$ > {pidfile}; sleep 0.6"],
                      "worker_type": "quiet"}).task
    d = make_worker()

    def spec() -> WorkerSpec | dict[str, Any]:
        found = [s.spec for s in read_specs(home) if s.spec]
        return found[0] if found else {}

    beats: set[str] = set()

    def three_busy_heartbeats() -> bool:
        current = spec()
        if current.get("current_task_id") == task["task_id"]:
            beats.add(current["heartbeat_at"])
        return len(beats) >= 3

    d.until(three_busy_heartbeats, what="three heartbeats while the task runs")
    progress = spec()["progress"]
    assert (progress == 0) if silence_stalls else (progress > 0)
    d.until(lambda: task["task_id"] in final_records(home), what="completion")


def test_stall_on_silence_must_be_a_boolean(home: Home) -> None:
    from coordination.config import load_worker_types
    from coordination.errors import ConfigError

    add_types(home, quiet={"stall_on_silence": "yes"})
    with pytest.raises(ConfigError, match="stall_on_silence"):
        load_worker_types(home)


def test_supervisor_declared_us_dead(home: Home, make_worker: Callable[..., Driver],
                                     task_pids: Path) -> None:
    """If the spec was moved away (presumed dead), the worker stops its task and exits."""
    from coordination.specs import complete_spec

    set_system(home, heartbeat_interval_s=0.1, kill_grace_s=0.2)
    pidfile = task_pids / "dead.pid"
    q = TaskQueue(home)
    task = q.enqueue({"command": ["bash", "-c", f"echo $$ > {pidfile}; exec sleep 300"]}).task
    d = make_worker()
    d.until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the task")
    complete_spec(home, d.worker.worker_id, "crashed", time.time())
    q.reclaim(task["task_id"], reason="test")
    assert d.run_to_exit() == "error"
    assert not pid_alive(int(pidfile.read_text()))
    spec = next(s.spec for s in read_specs(home, completed=True) if s.spec)
    assert spec["exit_reason"] == "crashed"  # the supervisor's verdict is not overwritten


def test_drain_finishes_current_task(home: Home, make_worker: Callable[..., Driver]) -> None:
    from coordination import clock
    from coordination.control import update_control

    q = TaskQueue(home)
    first = q.enqueue({"command": ["sleep", "0.3"]}).task
    second = q.enqueue({"command": ["true"]}).task
    d = make_worker()
    d.until(lambda: d.worker.run is not None, what="the first task")
    time.sleep(0.01)
    update_control(home, lambda s: s["drain"].update(all=clock.iso(time.time())))
    assert d.run_to_exit() == "drained"
    assert final(home, first["task_id"])["status"] == "completed"
    assert present(q.get(second["task_id"]))["status"] == "queued"


def test_notifier_messages(home: Home) -> None:
    notifier = Notifier({})
    q = TaskQueue(home)
    q.enqueue({"command": ["sleep", "0.2"]})
    worker = Worker(home, WorkerOptions(once=True), notifier=notifier)
    wakeup = Wakeup(None).start(signals=False)
    try:
        worker.start(time.time())
        d = Driver(worker, wakeup)
        assert d.run_to_exit() == "once"
    finally:
        wakeup.stop()
    sent = notifier.sent
    assert sent[0] == "READY=1\nSTATUS=idle"
    assert any(m.startswith("STATUS=busy t-") and m.endswith("(0s)") for m in sent)
    assert sent[-1].startswith("STOPPING=1")
    assert not notifier.enabled


# ---------------------------------------------------------------------------- cgroup_limits
def test_cgroup_limits_validation(tmp_path: Path) -> None:
    path = tmp_path / "worker-types.json"

    def check(limits: Any) -> dict[str, Any]:
        return validate_worker_types(path, {"types": {"t": {"cgroup_limits": limits}}})["t"]

    good = {"MemoryMax": "64M", "MemoryHigh": "1.5G", "CPUQuota": "150%", "TasksMax": "20",
            "IOWeight": "10000"}
    assert scope_properties(check(good)) == good
    assert scope_properties(check({"MemoryMax": "infinity", "TasksMax": "10%",
                                   "CPUQuota": "0.5%", "MemoryHigh": None})) == \
        {"MemoryMax": "infinity", "TasksMax": "10%", "CPUQuota": "0.5%"}
    assert scope_properties(check(None)) == {} and scope_properties(check({})) == {}
    assert check(None)["cgroup_limits"] is None
    assert validate_worker_types(path, {"types": {"t": {}}})["t"]["cgroup_limits"] is None
    with pytest.raises(ConfigError, match=r"worker-types\.json: types\.t\.cgroup_limits: "
                       r"unknown property 'MemoryLimit' \(allowed: MemoryMax, MemoryHigh, "
                       r"CPUQuota, TasksMax, IOWeight\)"):
        check({"MemoryLimit": "64M"})
    with pytest.raises(ConfigError, match=r"types\.t\.cgroup_limits must be null or object"):
        check(["MemoryMax=64M"])
    bad = [("MemoryMax", "64 MB"), ("MemoryMax", 67108864), ("MemoryMax", "64M\n"),
           ("MemoryHigh", "-1"), ("CPUQuota", "50"), ("CPUQuota", "0%"), ("TasksMax", "0"),
           ("TasksMax", 20), ("IOWeight", "0"), ("IOWeight", "10001"), ("IOWeight", True)]
    for prop, value in bad:
        with pytest.raises(ConfigError, match=rf"{path}: types\.t\.cgroup_limits\.{prop} "
                           rf"must be null or a string: "):
            check({prop: value})


def test_scope_command_argv_and_env() -> None:
    user = ScopeManager(True, "/usr/bin/systemd-run", "/usr/bin/env",
                        {"XDG_RUNTIME_DIR": "/run/user/1000"})
    unit = scope_unit_name("t-20260101T000000000-ab/c d", 2)
    assert unit == "harness-task-t-20260101T000000000-ab_c_d-2.scope"
    scope = Scope(user, unit, {"MemoryMax": "64M", "TasksMax": "20"})
    task_env = {"PATH": "/bin", "HARNESS_TASK_ID": "t-1"}
    argv, env = scope_command(scope, ["python3", "-c", "pass"], task_env)
    assert argv == ["/usr/bin/systemd-run", "--user", "--scope", "--quiet", "--collect",
                    f"--unit={unit}", "-p", "MemoryMax=64M", "-p", "TasksMax=20", "--",
                    "/usr/bin/env", "-u", "INVOCATION_ID", "-u", "XDG_RUNTIME_DIR", "--",
                    "python3", "-c", "pass"]
    assert env == {**task_env, "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert task_env == {"PATH": "/bin", "HARNESS_TASK_ID": "t-1"}  # not modified
    # System manager: no --user, nothing to reach it with; an allowlisted variable stays.
    system = ScopeManager(False, "/bin/systemd-run", "/bin/env")
    allowed = {"PATH": "/bin", "INVOCATION_ID": "abc"}
    argv, env = scope_command(Scope(system, "u.scope", {"CPUQuota": "50%"}), ["true"], allowed)
    assert argv == ["/bin/systemd-run", "--scope", "--quiet", "--collect", "--unit=u.scope",
                    "-p", "CPUQuota=50%", "--", "/bin/env", "--", "true"]
    assert env == allowed


def _fake_tools(folder: Path, systemd_run: str | None) -> str:
    folder.mkdir(exist_ok=True)
    for name, body in (("systemd-run", systemd_run), ("env", "exec /usr/bin/env \"$@\"")):
        if body is not None:
            (folder / name).write_text(f"#!/bin/sh\n{body}\n")
            (folder / name).chmod(0o755)
    return str(folder)


def test_find_scope_manager(tmp_path: Path) -> None:
    tools = _fake_tools(tmp_path / "bin", "exit 0")
    manager, why = find_scope_manager({"PATH": tools})
    assert manager is None and why == "the worker does not run under systemd (no INVOCATION_ID)"
    manager, why = find_scope_manager({"PATH": str(tmp_path), "INVOCATION_ID": "x"})
    assert manager is None and why == f"systemd-run is not on PATH ({tmp_path})"
    manager, why = find_scope_manager({"PATH": tools, "INVOCATION_ID": "x"})
    assert manager == ScopeManager(False, f"{tools}/systemd-run", f"{tools}/env", {})
    manager, why = find_scope_manager({"PATH": tools, "INVOCATION_ID": "x", "MANAGERPID": "7"})
    assert manager is None and "XDG_RUNTIME_DIR is not set" in why
    manager, why = find_scope_manager({"PATH": tools, "INVOCATION_ID": "x", "MANAGERPID": "7",
                                       "XDG_RUNTIME_DIR": "/run/user/5"})
    assert manager == ScopeManager(True, f"{tools}/systemd-run", f"{tools}/env",
                                   {"XDG_RUNTIME_DIR": "/run/user/5"})


def test_cgroup_limits_without_manager_runs_tasks_and_warns_once(
        home: Home, make_worker: Callable[..., Driver]) -> None:
    add_types(home, scoped={"command_template": None,
                            "cgroup_limits": {"MemoryMax": "64M", "TasksMax": "20"}})
    q = TaskQueue(home)
    ids = [q.enqueue({"command": [PY, "-c", "print('ran')"], "worker_type": "scoped"})
           .task["task_id"] for _ in range(3)]
    environ = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "MANAGERPID")}
    d = make_worker(environ=environ)
    d.until(lambda: set(ids) <= set(final_records(home)), what="the three tasks")
    assert all(final(home, t)["status"] == "completed" for t in ids)
    warned = events(home, "worker_cgroup_limits_unavailable")
    assert len(warned) == 1, warned
    assert warned[0]["severity"] == "warning"
    assert warned[0]["data"]["worker_type"] == "scoped"
    assert warned[0]["data"]["reason"] == \
        "the worker does not run under systemd (no INVOCATION_ID)"
    assert all("scope" not in e["data"] for e in events(home, "task_started"))


FAKE_SYSTEMD_RUN = """\
import json, os, sys
args = sys.argv[1:]
with open({log!r}, "a") as fh:
    fh.write(json.dumps({{"argv": args, "xdg": os.environ.get("XDG_RUNTIME_DIR")}}) + "\\n")
if {fail!r}:
    sys.exit("Failed to connect to bus: No medium found")
refuse = {refuse!r}
if refuse and any(a.startswith("--unit=") for a in args) and not os.path.exists(refuse):
    open(refuse, "w").close()  # refuse the first task scope only, as a stopping unit would
    sys.exit("Failed to start transient scope unit: Transaction for x.scope/start is "
             "destructive (harness-worker@1.service has 'stop' job queued, but 'start' "
             "is included in transaction).")
os.environ["INVOCATION_ID"] = "scope-invocation"  # as the real systemd-run --scope does
cmd = args[args.index("--") + 1:]
os.execv(cmd[0], cmd)
"""


def _fake_systemd_run(tmp_path: Path, fail: bool = False,
                      refuse: str = "") -> tuple[dict[str, str], Path]:
    """A worker environment as under a user manager, with a fake systemd-run that logs its
    argv and execs the command after ``--`` in place (as ``--scope`` does)."""
    log = tmp_path / "systemd-run.jsonl"
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "systemd-run").write_text(f"#!{PY}\n" + FAKE_SYSTEMD_RUN.format(
        log=str(log), fail=fail, refuse=refuse))
    (tools / "systemd-run").chmod(0o755)
    environ = dict(os.environ, PATH=f"{tools}:{os.environ['PATH']}", INVOCATION_ID="w-inv",
                   MANAGERPID="1", XDG_RUNTIME_DIR=str(tmp_path / "run"))
    return environ, log


def test_cgroup_limits_wrap_the_task_in_a_scope(home: Home, make_worker: Callable[..., Driver],
                                                tmp_path: Path, task_pids: Path) -> None:
    set_system(home, kill_grace_s=0.3, retry_backoff_base_s=0)
    add_types(home, scoped={"command_template": None, "limits": {"cpu_seconds": 100},
                            "cgroup_limits": {"MemoryMax": "64M", "CPUQuota": "50%"}})
    environ, log = _fake_systemd_run(tmp_path)
    q = TaskQueue(home)
    dump = ("import json, os, resource; json.dump({'env': dict(os.environ), 'pid': os.getpid(),"
            " 'cpu': resource.getrlimit(resource.RLIMIT_CPU)}, "
            "open(os.environ['HARNESS_RESULT_FILE'], 'w'))")
    ok = q.enqueue({"command": [PY, "-c", dump], "worker_type": "scoped"}).task
    pidfile, leader = task_pids / "gc.pid", task_pids / "leader.pid"
    slow = q.enqueue({"command": ["bash", "-c", f"echo $$ > {leader}; sleep 300 & "
                                  f"echo $! > {pidfile}; sleep 300"], "timeout_s": 0.5,
                      "worker_type": "scoped", "max_attempts": 1}).task
    missing = q.enqueue({"command": ["no-such-command-xyz"], "worker_type": "scoped"}).task
    plain = q.enqueue({"command": ["true"]}).task
    ids = {t["task_id"] for t in (ok, slow, missing, plain)}
    d = make_worker(environ=environ)
    d.until(lambda: ids <= set(final_records(home)), what="the four tasks")
    # The scoped task ran through systemd-run, in place: same pid as task_started says.
    rec = final(home, ok["task_id"])
    assert rec["status"] == "completed", rec
    started = {e["task_id"]: e["data"] for e in events(home, "task_started")}
    assert rec["result"]["pid"] == started[ok["task_id"]]["pid"]
    unit = scope_unit_name(ok["task_id"], 1)
    assert started[ok["task_id"]]["scope"] == unit
    assert started[ok["task_id"]]["argv"] == [PY, "-c", dump]  # the task's own argv
    # Under systemd every task gets a scope, the default type's too (no limits then).
    assert started[plain["task_id"]]["scope"] == scope_unit_name(plain["task_id"], 1)
    # The environment is still the allowlist: systemd-run's additions are stripped.
    env = rec["result"]["env"]
    assert "INVOCATION_ID" not in env and "XDG_RUNTIME_DIR" not in env
    assert "MANAGERPID" not in env and env["HARNESS_TASK_ID"] == ok["task_id"]
    assert rec["result"]["cpu"] == [100, 101]  # setrlimit limits still apply
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    probes = [c for c in calls if not any(a.startswith("--unit=") for a in c["argv"])]
    assert len(probes) == 2  # one probe per type (scoped, default), not one per task
    probes = [c for c in probes if "MemoryMax=64M" in c["argv"]]
    assert probes[0]["argv"][:7] == ["--user", "--scope", "--quiet", "--collect", "-p",
                                     "MemoryMax=64M", "-p"]
    task_call = next(c for c in calls if f"--unit={unit}" in c["argv"])
    assert task_call["xdg"] == environ["XDG_RUNTIME_DIR"]  # systemd-run can reach the manager
    assert task_call["argv"][:10] == ["--user", "--scope", "--quiet", "--collect",
                                      f"--unit={unit}", "-p", "MemoryMax=64M", "-p",
                                      "CPUQuota=50%", "--"]
    # The timeout still stops the whole process group, grandchild included.
    timed = final(home, slow["task_id"])
    assert timed["status"] == "failed" and timed["last_error"].startswith("timeout after 0.5s")
    assert not pid_alive(int(pidfile.read_text())) and not pid_alive(int(leader.read_text()))
    # A missing command is still a spawn failure (127, no retry), not a failed systemd-run.
    gone = final(home, missing["task_id"])
    assert gone["status"] == "failed" and gone["exit_code"] == 127 and gone["attempts"] == 1
    assert not any(f"--unit={scope_unit_name(missing['task_id'], 1)}" in c["argv"]
                   for c in calls)
    assert not events(home, "worker_cgroup_limits_unavailable")


def test_cgroup_limits_refused_by_manager_runs_unscoped(
        home: Home, make_worker: Callable[..., Driver], tmp_path: Path) -> None:
    add_types(home, scoped={"command_template": None, "cgroup_limits": {"IOWeight": "50"}})
    environ, log = _fake_systemd_run(tmp_path, fail=True)
    q = TaskQueue(home)
    ids = [q.enqueue({"command": ["true"], "worker_type": "scoped"}).task["task_id"]
           for _ in range(2)]
    d = make_worker(environ=environ)
    d.until(lambda: set(ids) <= set(final_records(home)), what="both tasks")
    assert all(final(home, t)["status"] == "completed" for t in ids)
    assert len(log.read_text().splitlines()) == 1  # the probe only
    warned = events(home, "worker_cgroup_limits_unavailable")
    assert [w["data"]["reason"] for w in warned] == [
        "systemd-run --scope failed (exit 1): Failed to connect to bus: No medium found"]
    assert warned[0]["data"]["properties"] == {"IOWeight": "50"}


def test_refused_task_scope_hands_the_task_back(home: Home, make_worker: Callable[..., Driver],
                                                tmp_path: Path) -> None:
    """systemd-run exits 1 without running the command when the manager refuses the scope
    (a worker unit being stopped makes the scope's BindsTo= start destructive): the task is
    handed back without spending an attempt, the scope probed again, and the next attempt
    runs."""
    set_system(home, retry_backoff_base_s=0)
    environ, log = _fake_systemd_run(tmp_path, refuse=str(tmp_path / "refused-once"))
    q = TaskQueue(home)
    task = q.enqueue({"command": ["true"], "max_attempts": 1}).task
    d = make_worker(environ=environ)
    d.until(lambda: task["task_id"] in final_records(home), what="the task")
    rec = final(home, task["task_id"])
    assert rec["status"] == "completed" and rec["attempts"] == 1, rec
    outcomes = [r["outcome"] for r in q.history_of(task["task_id"])]
    assert outcomes[0] == "released", outcomes
    calls = [json.loads(line)["argv"] for line in log.read_text().splitlines()]
    probes = [c for c in calls if not any(a.startswith("--unit=") for a in c)]
    assert len(probes) == 2  # probed again after the refusal
