"""The supervisor's rules driven through ``Supervisor.reconcile(now)``: the pure scaling
decision, backpressure, health, the circuit breaker, stall fencing, persisted state, the
idle-stop pass, and the ``supervisor run`` daemon itself (sd_notify, signals, singleton)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner
from helpers import T0, ProcGroup, daemon_env, events, make_home, req, set_system, wait_until

from coordination import clock
from coordination.config import default_system
from coordination.control import read_control, update_control
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import new_spec, read_specs, write_spec
from coordination.store import append_bytes, dumps, read_json
from daemons.cli import cli
from daemons.supervisor.pidwatch import PidWatcher
from daemons.supervisor.policy import decide_scale
from daemons.supervisor.reconcile import Supervisor, scale_down_once
from daemons.supervisor.state import singleton_lock_path

HARNESS = [sys.executable, "-m", "daemons"]






# ---------------------------------------------------------------------------- decide_scale
CFG = {k: v for k, v in default_system().items() if not k.startswith("_")}
CFG.update(min_workers=1, max_workers=8, max_concurrent_workers=16, scale_up_threshold=2.0,
           scale_down_threshold=0.5, scale_cooldown_s=60, warm_pool=0)


def cfg(**changes: Any) -> dict[str, Any]:
    out = dict(CFG)
    out.update(changes)
    return out


@pytest.mark.parametrize(("queued", "running", "busy", "changes", "last", "expected"), [
    (40, 4, 4, {}, None, 8),                       # burst: straight to the cap
    (40, 4, 4, {"max_workers": 30, "max_concurrent_workers": 30}, None, 20),  # queued / 2
    (40, 4, 4, {"max_concurrent_workers": 6}, None, 6),  # hard cap wins over max_workers
    (40, 4, 4, {}, T0 - 10, 4),                    # within the cool-down: hold
    (40, 4, 4, {}, T0 - 60, 8),                    # cool-down over
    (0, 8, 0, {}, None, 1),                        # empty queue: back to min
    (0, 8, 0, {}, T0 - 1, 8),                      # ... but not within the cool-down
    (0, 0, 0, {"min_workers": 2}, T0, 2),          # below the floor: no cool-down
    (0, 9, 0, {}, T0, 8),                          # above the cap: no cool-down
    (0, 3, 3, {"warm_pool": 1}, None, 4),          # all busy: refill the warm pool
    (0, 4, 0, {"warm_pool": 1}, None, 1),          # idle: keep min / warm pool only
    (0, 4, 0, {"warm_pool": 2}, None, 2),
    (0, 8, 8, {}, None, 8),                        # all busy, nothing queued: hold
    (5, 4, 4, {}, None, 4),                        # ratio 1.25 within the band: hold
    (9, 4, 4, {}, None, 5),                        # ratio 2.25: up (ceil(9/2) = 5)
    (1, 8, 2, {}, None, 2),                        # ratio 0.125: down to busy ones
    (3, 0, 0, {"min_workers": 0}, None, 2),        # nothing running, work queued
    (0, 0, 0, {"min_workers": 0}, None, 0),
    (10, 2, 2, {"scale_up_threshold": 0}, None, 8),  # threshold 0: one worker per task
])
def test_decide_scale(queued: int, running: int, busy: int, changes: dict[str, Any],
                      last: float | None, expected: int) -> None:
    assert decide_scale(queued, running, busy, cfg(**changes), last, T0) == expected


def test_decide_scale_never_exceeds_cap_or_drops_below_floor() -> None:
    for queued in (0, 1, 3, 17, 100):
        for running in range(0, 12):
            for busy in range(0, running + 1):
                for warm in (0, 1, 3):
                    c = cfg(warm_pool=warm, min_workers=2, max_workers=9)
                    target = decide_scale(queued, running, busy, c, None, T0)
                    assert 2 <= target <= 9
                    if queued == 0 and busy == running and running < 9:
                        assert target >= min(9, busy + warm)


# ---------------------------------------------------------------------------- helpers
def live_spec(home: Home, instance: str, state: str = "idle", **extra: Any) -> dict[str, Any]:
    """A spec that liveness accepts: this test process, fresh heartbeat."""
    now = clock.now()
    # Tests write arbitrary fields here: a plain dict, not the typed spec.
    spec: dict[str, Any] = dict(new_spec(clock.new_worker_id(instance, now), instance, now))
    spec.update(state=state, **extra)
    write_spec(home, spec, create=True)
    return spec


def add_history(home: Home, now: float, outcomes: list[tuple[str, str]],
                spread_s: float = 60.0) -> None:
    """Append crafted attempt records: (status, worker_type) each, spread over the last
    ``spread_s`` seconds before ``now``."""
    lines = []
    for i, (status, wtype) in enumerate(outcomes):
        at = now - spread_s + spread_s * (i + 1) / (len(outcomes) + 1)
        lines.append(dumps({"task_id": f"t-crafted-{i}-{status}", "status": status,
                            "worker_type": wtype, "final": status == "completed",
                            "outcome": "completed" if status == "completed" else "failed",
                            "attempts": 1, "started_at": clock.iso(at - 1),
                            "recorded_at": clock.iso(at)}) + b"\n")
    append_bytes(home.history_file, b"".join(lines), "none")


# ---------------------------------------------------------------------------- backpressure
def test_backpressure_exit_75_and_events(home_factory: Callable[..., Home]) -> None:
    home = home_factory(max_queue_depth=3, durability="none")
    queue = TaskQueue(home)
    for i in range(2):
        queue.enqueue(req(description=f"t{i}"))
    sup = Supervisor(home)
    report = sup.reconcile(clock.now())
    assert report["backpressure"] is False
    runner = CliRunner()
    # At the limit an add would exceed it: that is backpressure, for the CLI and the events.
    queue.enqueue(req(description="t2"))
    report = sup.reconcile(clock.now())
    assert report["queue"]["queued"] == 3 and report["backpressure"] is True
    refused = runner.invoke(cli, ["--home", str(home.root), "task", "add", "--", "true"])
    assert refused.exit_code == 75, refused.output
    assert "backpressure" in refused.output
    on = events(home, "backpressure_on")
    assert len(on) == 1 and on[0]["data"]["queued"] == 3
    # Producers that bypass the check (inbox, --force) push the queue over the limit.
    forced = runner.invoke(cli, ["--home", str(home.root), "task", "add", "--force", "--",
                                 "true"])
    assert forced.exit_code == 0, forced.output
    queue.submit(req(description="via inbox"))
    report = sup.reconcile(clock.now())
    assert report["ingested"] == 1  # the supervisor keeps draining the inbox
    assert report["queue"]["queued"] == 5 and report["backpressure"] is True
    assert len(events(home, "backpressure_on")) == 1  # no transition, no second event
    assert read_json(home.health_file)["backpressure"] is True
    for task in queue.live_tasks()[:3]:
        queue.cancel(task["task_id"])
    report = sup.reconcile(clock.now())
    assert report["backpressure"] is False
    assert len(events(home, "backpressure_off")) == 1
    assert runner.invoke(cli, ["--home", str(home.root), "task", "add", "--",
                               "true"]).exit_code == 0


def test_state_survives_a_restart(home_factory: Callable[..., Home]) -> None:
    home = home_factory(max_queue_depth=1, durability="none")
    queue = TaskQueue(home)
    queue.enqueue_batch([req(), req()], force=True)
    Supervisor(home).reconcile(clock.now())
    assert len(events(home, "backpressure_on")) == 1
    state = read_json(home.supervisor_state_file)
    assert state["backpressure"] is True and state["health"] == "healthy"
    again = Supervisor(home)  # a restarted supervisor: same decisions, no duplicate events
    again.reconcile(clock.now())
    assert len(events(home, "backpressure_on")) == 1
    assert len(events(home, "health_changed")) == 1


# ---------------------------------------------------------------------------- health
def test_health_transitions_with_crafted_history(home_factory: Callable[..., Home]) -> None:
    home = home_factory(durability="none", health_window_s=600, circuit_min_tasks=1000)
    sup = Supervisor(home)
    now = T0
    add_history(home, now, [("completed", "default")] * 10)
    report = sup.reconcile(now)
    assert report["health"]["health"] == "healthy"
    assert report["health"]["success_rate"] == 1.0
    # 10 ok + 4 failed: 71 % -> degraded
    now += 10
    add_history(home, now, [("failed", "default")] * 4, spread_s=5)
    assert sup.reconcile(now)["health"]["health"] == "degraded"
    # + 8 failed: 10/22 = 45 % -> unhealthy
    now += 10
    add_history(home, now, [("failed", "default")] * 8, spread_s=5)
    report = sup.reconcile(now)
    doc = read_json(home.health_file)
    assert report["health"]["health"] == doc["health"] == "unhealthy"
    assert doc["success_rate"] == pytest.approx(10 / 22, abs=1e-3)
    assert doc["reasons"] and doc["version"] == 1 and doc["stalled_workers"] == []
    assert set(doc) >= {"version", "updated_at", "health", "success_rate",
                        "stalled_workers", "reasons", "backpressure", "circuits"}
    # Everything ages out of the window: no attempts, healthy again.
    now += 700
    assert sup.reconcile(now)["health"]["health"] == "healthy"
    changes = [(e["data"]["from"], e["data"]["to"]) for e in events(home, "health_changed")]
    assert changes == [(None, "healthy"), ("healthy", "degraded"), ("degraded", "unhealthy"),
                       ("unhealthy", "healthy")]


def test_history_window_reads_only_the_tail(home_factory: Callable[..., Home]) -> None:
    """A long history: only the window is loaded; appends are read incrementally and a
    rotation starts over."""
    home = home_factory(durability="none", health_window_s=100, circuit_window_s=100)
    add_history(home, T0 - 10_000, [("failed", "default")] * 3000, spread_s=5000)
    add_history(home, T0, [("completed", "default")] * 5, spread_s=50)
    sup = Supervisor(home)
    sup.reconcile(T0)
    assert len(sup.history.records) == 5
    add_history(home, T0 + 1, [("failed", "default")], spread_s=0.5)
    assert sup.reconcile(T0 + 1)["health"]["attempts"] == {"completed": 5, "failed": 1}
    os.unlink(home.history_file)
    add_history(home, T0 + 2, [("completed", "default")], spread_s=0.5)
    assert sup.reconcile(T0 + 2)["health"]["attempts"] == {"completed": 1, "failed": 0}


# ---------------------------------------------------------------------------- circuits
def test_circuit_breaker_opens_pauses_and_closes(home_factory: Callable[..., Home]) -> None:
    home = home_factory(durability="none", circuit_failure_rate=0.5, circuit_min_tasks=5,
                        circuit_window_s=300, circuit_cooldown_s=120, health_window_s=300)
    sup = Supervisor(home)
    now = T0
    # 4 failures of "shell" are not judged yet (fewer than circuit_min_tasks)
    add_history(home, now, [("failed", "shell")] * 4 + [("completed", "default")] * 3)
    assert sup.reconcile(now)["circuits"] == {}
    now += 5
    add_history(home, now, [("failed", "shell"), ("completed", "shell")], spread_s=2)
    report = sup.reconcile(now)
    until = clock.iso(now + 120)
    assert report["circuits"] == {"shell": {"state": "open", "until": until}}
    pause = read_control(home)["paused_types"]["shell"]
    assert pause["reason"] == "circuit_open" and pause["until"] == until
    assert read_json(home.health_file)["circuits"] == {"shell": {"state": "open",
                                                                  "until": until}}
    [opened] = events(home, "circuit_open")
    assert opened["data"]["worker_type"] == "shell" and opened["data"]["attempts"] == 6
    # While open, claims skip the type.
    queue = TaskQueue(home)
    queue.enqueue({"worker_type": "shell", "description": "echo hi"}, now=now)
    assert queue.claim("w-test", now=now + 1) is None
    # Still open before the cool-down ends; closed after it, and the failures that opened
    # it do not open it again.
    assert sup.reconcile(now + 60)["circuits"]
    report = sup.reconcile(now + 121)
    assert report["circuits"] == {}
    assert "shell" not in read_control(home)["paused_types"]
    assert len(events(home, "circuit_closed")) == 1
    assert sup.reconcile(now + 122)["circuits"] == {}
    assert queue.claim("w-test", now=now + 123) is not None
    # New failures after closing count again.
    add_history(home, now + 130, [("failed", "shell")] * 5, spread_s=5)
    assert "shell" in sup.reconcile(now + 130)["circuits"]
    assert len(events(home, "circuit_open")) == 2


def test_operator_resume_closes_the_circuit_and_operator_pause_is_kept(
        home_factory: Callable[..., Home]) -> None:
    home = home_factory(durability="none", circuit_min_tasks=2, circuit_cooldown_s=600)
    sup = Supervisor(home)
    add_history(home, T0, [("failed", "shell")] * 3 + [("failed", "default")] * 3)
    update_control(home, lambda s: s["paused_types"].update(
        default={"since": clock.iso(T0), "until": None, "reason": "maintenance"}), now=T0)
    report = sup.reconcile(T0)
    assert set(report["circuits"]) == {"shell"}  # default was already paused by an operator
    assert read_control(home)["paused_types"]["default"]["reason"] == "maintenance"
    update_control(home, lambda s: s["paused_types"].pop("shell"), now=T0 + 1)
    assert sup.reconcile(T0 + 2)["circuits"] == {}
    assert "lifted by an operator" in events(home, "circuit_closed")[0]["message"]


# ---------------------------------------------------------------------------- stalls
def test_stalled_worker_is_fenced_and_its_task_retried(home_factory: Callable[..., Home],
                                                       adopt_orphans: None,
                                                       procs: ProcGroup) -> None:
    home = home_factory(durability="none", worker_stall_timeout_s=30,
                        heartbeat_timeout_s=3600, retry_backoff_base_s=0)
    queue = TaskQueue(home)
    task = queue.enqueue(req(description="will stall")).task
    fake = procs.python("fake-worker", "supervisor_fake_worker.py", home.root, "7", "claim")
    _, worker_id, task_id, task_pid = fake.wait_for_line("ready ").split()
    assert task_id == task["task_id"]
    task_proc = psutil.Process(int(task_pid))
    sup = Supervisor(home)
    now = clock.now()
    assert sup.reconcile(now)["stalled"] == []
    assert sup.reconcile(now + 20)["stalled"] == []  # progress unchanged, not yet 30 s
    report = sup.reconcile(now + 31)
    [stall] = report["stalled"]
    assert stall["worker_id"] == worker_id and stall["fenced"] is True
    fake.wait(30)  # SIGKILLed by the supervisor
    assert fake.popen.returncode == -signal.SIGKILL
    wait_until(lambda: not task_proc.is_running() or task_proc.status() == "zombie",
               what="the stalled task's process group to be killed")
    after = queue.get(task_id)
    assert after is not None and after["status"] == "queued" and after["attempts"] == 1
    records = queue.history_of(task_id)
    assert [(r["final"], r["outcome"]) for r in records] == [(False, "reclaimed")]
    assert "stalled" in (records[0]["last_error"] or "")
    [ev] = events(home, "worker_stalled")
    assert ev["worker_id"] == worker_id and ev["data"]["fenced"] is True
    assert events(home, "task_reclaimed")[0]["data"]["cause"] == "stalled"
    spec = read_json(home.specs_completed / f"{worker_id}.json")
    assert spec["exit_reason"] == "crashed"
    doc = read_json(home.health_file)
    # One stalled worker: degraded. Its reclaimed attempt is the only (failed) one, 0 %,
    # but one attempt is below health_min_attempts, so the rate is not judged yet.
    assert doc["stalled_workers"] == [worker_id] and doc["health"] == "degraded"


def test_progress_resets_the_stall_clock(home: Home) -> None:
    set_system(home, worker_stall_timeout_s=10, heartbeat_timeout_s=3600)
    queue = TaskQueue(home)
    queue.enqueue(req())
    spec = live_spec(home, "1", "busy")
    claimed = queue.claim(spec["worker_id"])
    assert claimed is not None
    spec.update(current_task_id=claimed["task_id"], progress=1)
    write_spec(home, spec)
    sup = Supervisor(home)
    now = clock.now()
    sup.reconcile(now)
    spec["progress"] = 2
    write_spec(home, spec)
    assert sup.reconcile(now + 8)["stalled"] == []
    assert sup.reconcile(now + 16)["stalled"] == []  # 8 s since the last change
    assert read_json(home.supervisor_state_file)["progress"][spec["worker_id"]]["progress"] == 2


# ---------------------------------------------------------------------------- idle stop
def test_scale_down_once_drains_idle_workers_above_min(home: Home) -> None:
    set_system(home, min_workers=1, max_workers=8, warm_pool=1, scale_cooldown_s=60)
    for i in range(1, 5):
        live_spec(home, str(i))
    busy = live_spec(home, "5", "busy", current_task_id="t-x")
    out = scale_down_once(home, clock.now(), dry_run=True)
    assert out["would_drain"] and not out["drained"]
    assert not (read_control(home).get("drain") or {"instances": None})["instances"]
    out = scale_down_once(home, clock.now())
    # 5 workers, 1 busy: keep busy + warm pool = 2, drain 3 idle (highest instances first)
    assert out["target"] == 2 and out["drained"] == ["4", "3", "2"]
    assert set(read_control(home)["drain"]["instances"]) == {"2", "3", "4"}
    assert busy["instance"] not in read_control(home)["drain"]["instances"]
    [ev] = events(home, "scale_down")
    assert ev["data"]["from"] == 5 and ev["data"]["to"] == 2
    again = scale_down_once(home, clock.now())  # drained ones no longer count; cool-down
    assert again["drained"] == []
    result = CliRunner().invoke(cli, ["supervisor", "scale-down-once", "--home",
                                      str(home.root), "--json"])
    assert result.exit_code == 0, result.output


def test_scale_down_once_skips_while_a_supervisor_runs(home: Home, procs: ProcGroup) -> None:
    child = procs.spawn("holder", ["flock", str(singleton_lock_path(home)), "sleep", "60"])
    wait_until(lambda: child.popen.poll() is None and any(
        "sleep" in " ".join(p.cmdline()) for p in psutil.Process(child.pid).children()),
        what="flock to hold the lock")
    out = subprocess.run([*HARNESS, "supervisor", "scale-down-once", "--home",
                          str(home.root)], capture_output=True, text=True, timeout=60,
                         env=daemon_env(), check=False)
    assert out.returncode == 0 and "skipped" in out.stdout, out


# ---------------------------------------------------------------------------- the daemon
@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    if len(path) > 100:
        pytest.skip(f"tmp_path too long for an AF_UNIX socket: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1.0)
    try:
        yield sock, path
    finally:
        sock.close()


def _messages(sock: socket.socket, until: Callable[[list[str]], bool],
              timeout: float = 30.0, into: list[str] | None = None) -> list[str]:
    got = into if into is not None else []
    deadline = time.monotonic() + timeout
    while not until(got):
        if time.monotonic() > deadline:
            raise AssertionError(f"sd_notify messages so far: {got}")
        with contextlib.suppress(TimeoutError):
            got += sock.recv(4096).decode().split("\n")
    return got


def test_run_notifies_systemd_and_stops_on_sigterm(home: Home, procs: ProcGroup,
                                                   notify_socket: tuple[socket.socket, str]
                                                   ) -> None:
    set_system(home, actuator="process", min_workers=0, warm_pool=0, supervisor_tick_s=0.2,
               durability="none")
    sock, path = notify_socket
    env = daemon_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    sup = procs.spawn("supervisor", [*HARNESS, "supervisor", "run", "--home", str(home.root)],
                      env=env)
    msgs = _messages(sock, lambda m: "READY=1" in m and "WATCHDOG=1" in m)
    assert any(m.startswith("STATUS=healthy; queued 0") for m in msgs), msgs
    # A second supervisor on the same home refuses (75); SIGHUP re-reads config.
    second = subprocess.run([*HARNESS, "supervisor", "run", "--home", str(home.root)],
                            capture_output=True, text=True, timeout=60, env=daemon_env(),
                            check=False)
    assert second.returncode == 75, second.stderr
    assert "another supervisor" in second.stderr
    os.kill(sup.pid, signal.SIGHUP)
    wait_until(lambda: events(home, "supervisor_reloaded"), what="supervisor_reloaded")
    TaskQueue(home).submit(req(description="via inbox"))  # inotify wakes it: ingested
    wait_until(lambda: TaskQueue(home).stats()["by_status"]["queued"] == 1,
               what="the inbox to be ingested")
    os.kill(sup.pid, signal.SIGTERM)
    assert sup.wait(30) == 0, sup.stderr()
    _messages(sock, lambda m: "STOPPING=1" in m, into=msgs)


def test_run_once_json(home: Home) -> None:
    set_system(home, actuator="process", min_workers=2)
    result = CliRunner().invoke(cli, ["supervisor", "run", "--once", "--json", "--home",
                                      str(home.root)])
    assert result.exit_code == 0, result.output
    report = __import__("json").loads(result.output)
    # --once with the process actuator decides but starts nothing.
    assert report["scale"]["target"] == 2 and report["scale"]["applied"] is False
    assert read_specs(home) == []
    status = CliRunner().invoke(cli, ["supervisor", "status", "--home", str(home.root)])
    assert status.exit_code == 0 and "health healthy" in status.output


def test_pid_watcher_wakes_on_death(procs: ProcGroup) -> None:
    woke: list[float] = []
    watcher = PidWatcher(lambda: woke.append(time.monotonic())).start()
    if not watcher.available:
        pytest.skip("pidfd_open is not available on this kernel")
    try:
        child = procs.spawn("sleeper", ["sleep", "60"])
        start = psutil.Process(child.pid).create_time()
        watcher.watch([(child.pid, start)])
        time.sleep(0.1)
        assert not woke
        t0 = time.monotonic()
        child.kill()  # becomes a zombie of ours: the pidfd fires anyway
        wait_until(lambda: woke, timeout=10, what="the pid watcher")
        assert woke[0] - t0 < 5
        watcher.watch([])
        child.wait(10)
    finally:
        watcher.stop()


def test_corrupt_state_file_is_replaced(home: Home) -> None:
    home.supervisor_state_file.write_text("{not json")
    Supervisor(home).reconcile(clock.now())
    assert read_json(home.supervisor_state_file)["version"] == 1


def test_make_home_helper_is_compatible(tmp_path: Path) -> None:
    home = make_home(tmp_path, "h", actuator="process")
    assert Supervisor(home).config()["actuator"] == "process"
