"""The worker units under a real, private systemd user manager.

This host may be a container without systemd as PID 1, so the module boots its own
``systemd --user`` as a child process: ``/run/systemd/system`` must exist (created when we
are root, and removed again afterwards), ``XDG_RUNTIME_DIR`` and ``XDG_CONFIG_HOME`` point
into tmp, ``DBUS_SESSION_BUS_ADDRESS`` is unset so ``systemctl --user`` talks to the
manager's private socket. The units are installed with ``harness systemd install --user``
exactly as an operator would, sandboxing included (ProtectSystem=strict, ProtectHome,
ReadWritePaths). The home lives under /tmp, so the installer turns PrivateTmp off (a
private /tmp would hide the home) and says so.

Skips only when systemd is absent, when we may not create /run/systemd/system, or when the
manager does not come up (its stderr is in the skip reason); the cgroup_limits test also
skips when the manager refuses transient scopes (the worker's warning is the reason).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    final_records,
    set_system,
    wait_until,
)
from user_manager import UserManager, instance_of, unit_of

from coordination.config_keys import DEFAULT_WORKER_TYPES
from coordination.errors import NotFound
from coordination.queue import TaskQueue
from coordination.specs import read_specs
from coordination.store import replace_json
from coordination.tasks import Task
from daemons.worker.scopes import scope_unit_name

pytestmark = pytest.mark.systemd

def _start(mgr: UserManager, *units: str) -> None:
    mgr.systemctl("start", *units)
    for unit in units:
        state = mgr.show(unit, "ActiveState", "MainPID", "StatusText", "ExecMainStatus")
        assert state["ActiveState"] == "active", (state, mgr.log_tail())
        assert state["StatusText"] == "idle", state


def _status(mgr: UserManager, unit: str) -> str:
    return mgr.show(unit, "StatusText").get("StatusText", "")


def test_workers_run_tasks_and_report_status(fleet: UserManager) -> None:
    mgr = fleet
    units = (unit_of(1), unit_of(2))
    _start(mgr, *units)
    specs = {s.spec["instance"] for s in read_specs(mgr.home) if s.spec}
    assert {instance_of(1), instance_of(2)} <= specs
    unit_names = {s.spec.get("unit") for s in read_specs(mgr.home) if s.spec}
    assert set(units) <= unit_names
    q = TaskQueue(mgr.home)
    slow = q.enqueue({"command": ["sleep", "2"]}).task
    busy = wait_until(lambda: [u for u in units if _status(mgr, u).startswith(
        f"busy {slow['task_id']} (")], 10, "STATUS=busy")
    print(f"{busy[0]}: {_status(mgr, busy[0])}")
    ids = [q.enqueue({"command": ["true"]}).task["task_id"] for _ in range(6)]
    wait_until(lambda: {slow["task_id"], *ids} <= set(final_records(mgr.home)), 20,
               "the tasks to complete")
    finals = final_records(mgr.home)
    assert all(finals[t][-1]["status"] == "completed" for t in [slow["task_id"], *ids])
    wait_until(lambda: all(_status(mgr, u) == "idle" for u in units), 10, "STATUS=idle")
    for unit in units:
        assert mgr.show(unit, "ActiveState")["ActiveState"] == "active"


def test_killed_worker_is_restarted(fleet: UserManager) -> None:
    mgr = fleet
    unit = unit_of(1)
    _start(mgr, unit)
    before = mgr.show(unit, "MainPID", "NRestarts")
    old_pid = int(before["MainPID"])
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> dict[str, str] | None:
        now = mgr.show(unit, "MainPID", "ActiveState", "NRestarts", "StatusText")
        pid = int(now.get("MainPID") or 0)
        ok = pid not in (0, old_pid) and now["ActiveState"] == "active"
        return now if ok else None

    now = wait_until(restarted, 20, "systemd to restart the killed worker")
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1
    assert now["StatusText"] == "idle"


def test_stop_hands_running_task_back(fleet: UserManager) -> None:
    mgr = fleet
    units = (unit_of(1), unit_of(2))
    _start(mgr, *units)
    q = TaskQueue(mgr.home)
    task = q.enqueue({"command": ["sleep", "60"]}).task
    wait_until(lambda: (q.get(task["task_id"]) or {"status": None})["status"] == "running", 10,
               "the task to start")
    # Stop once the attempt's transient scope is up (systemd-run then execs the command).
    # A stop that lands while systemd-run is still creating the scope makes it exit 1 with
    # no output: the attempt fails and counts (a narrow race of a task's first
    # milliseconds, noted in docs/security.md), which is not what this test is about.
    scope = scope_unit_name(task["task_id"], 1)
    wait_until(lambda: mgr.show(scope, "ActiveState").get("ActiveState") == "active", 10,
               "the task's scope")
    t0 = time.monotonic()
    mgr.systemctl("stop", *units)
    elapsed = time.monotonic() - t0
    back = q.get(task["task_id"])
    assert back is not None and back["status"] == "queued" and back["attempts"] == 0, back
    for unit in units:
        state = mgr.show(unit, "ActiveState", "Result")
        assert state == {"ActiveState": "inactive", "Result": "success"}, state
    assert elapsed < 10  # stop_grace_s 1 + kill_grace_s 0.5, far below TimeoutStopSec
    reasons = [s.spec["exit_reason"] for s in read_specs(mgr.home, completed=True) if s.spec]
    assert reasons.count("signal") >= 2
    q.cancel(task["task_id"])


def test_idle_exit_leaves_unit_inactive_not_failed(fleet: UserManager) -> None:
    mgr = fleet
    set_system(mgr.home, idle_exit_s=1)
    try:
        unit = unit_of(3)
        mgr.systemctl("start", unit)
        state = wait_until(lambda: (lambda s: s if s["ActiveState"] == "inactive" else None)(
            mgr.show(unit, "ActiveState", "Result", "ExecMainStatus")), 15, "the idle exit")
        assert state["Result"] == "success" and state["ExecMainStatus"] == "0", state
        assert mgr.systemctl("is-failed", unit, check=False).returncode != 0
        done = [s.spec for s in read_specs(mgr.home, completed=True)
                if s.spec and s.spec["instance"] == instance_of(3)]
        assert [d["exit_reason"] for d in done] == ["idle"]
    finally:
        set_system(mgr.home, idle_exit_s=0)


def test_reload_sends_sighup(fleet: UserManager) -> None:
    mgr = fleet
    unit = unit_of(4)
    _start(mgr, unit)
    mgr.systemctl("reload", unit)

    def reloaded() -> bool:
        lines = mgr.home.events_file.read_text().splitlines()
        return any(json.loads(line)["type"] == "worker_reloaded" for line in lines)

    wait_until(reloaded, 10, "worker_reloaded")
    assert mgr.show(unit, "ActiveState")["ActiveState"] == "active"
    mgr.systemctl("stop", unit)
    assert mgr.show(unit, "Result")["Result"] == "success"


def test_watchdog_pings_keep_the_worker_alive(fleet: UserManager) -> None:
    """With a 2 s watchdog (drop-in) an idle worker must ping at least every second."""
    mgr = fleet
    unit = unit_of(5)
    dropin = Path(mgr.env["XDG_CONFIG_HOME"]) / "systemd" / "user" / f"{unit}.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "watchdog.conf").write_text("[Service]\nWatchdogSec=2\n")
    mgr.systemctl("daemon-reload")
    try:
        _start(mgr, unit)
        first = mgr.show(unit, "MainPID", "WatchdogTimestampMonotonic", "WatchdogUSec")
        assert first["WatchdogUSec"] == "2s"
        time.sleep(3.5)
        later = mgr.show(unit, "MainPID", "ActiveState", "NRestarts",
                         "WatchdogTimestampMonotonic")
        assert later["ActiveState"] == "active" and later["NRestarts"] == "0", later
        assert later["MainPID"] == first["MainPID"]
        assert int(later["WatchdogTimestampMonotonic"]) > \
            int(first["WatchdogTimestampMonotonic"])
        mgr.systemctl("stop", unit)
    finally:
        (dropin / "watchdog.conf").unlink()
        mgr.systemctl("daemon-reload")


#: Prints the task's cgroups, then the memory and pids limits of its own cgroup: cgroup v2
#: (memory.max in the unified hierarchy), else the v1 controllers of a hybrid host
#: (memory.limit_in_bytes, pids.max); then waits for the test to release it.
SCOPE_PROBE = r"""
cat /proc/self/cgroup
v2=$(sed -n 's/^0:://p' /proc/self/cgroup)
for base in /sys/fs/cgroup /sys/fs/cgroup/unified; do
  [ -r "$base$v2/memory.max" ] && echo "MEMORY=$(cat "$base$v2/memory.max")"
  [ -r "$base$v2/pids.max" ] && echo "PIDS=$(cat "$base$v2/pids.max")"
done
mem=$(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup)
pids=$(sed -n 's/^[0-9]*:pids://p' /proc/self/cgroup)
f=/sys/fs/cgroup/memory$mem/memory.limit_in_bytes
[ -n "$mem" ] && [ -r "$f" ] && echo "MEMORY=$(cat "$f")"
f=/sys/fs/cgroup/pids$pids/pids.max
[ -n "$pids" ] && [ -r "$f" ] && echo "PIDS=$(cat "$f")"
echo "ENV_INVOCATION_ID=${INVOCATION_ID:-unset}"
echo READY
for _ in $(seq 600); do [ -e release ] && exit 0; sleep 0.05; done
exit 3
"""


def test_cgroup_limits_put_the_task_in_a_transient_scope(fleet: UserManager) -> None:
    """A worker type with cgroup_limits, under the user manager: each task runs in a
    transient scope harness-task-<id>-<attempt>.scope with MemoryMax/TasksMax applied,
    completes, and the scope is collected when it ends."""
    mgr = fleet
    types = json.loads(json.dumps(DEFAULT_WORKER_TYPES))
    types["worker_types"]["scoped"] = {"command_template": ["bash", "-c", "{description}"],
                                "cgroup_limits": {"MemoryMax": "64M", "TasksMax": "20"}}
    replace_json(mgr.home.worker_types_config, types, pretty=True)
    unit = unit_of(6)
    try:
        _start(mgr, unit)
        q = TaskQueue(mgr.home)
        task = q.enqueue({"description": SCOPE_PROBE, "worker_type": "scoped",
                          "max_attempts": 1}).task
        task_id = task["task_id"]
        scope = scope_unit_name(task_id, 1)
        log = mgr.home.task_log(task_id)

        def progressed() -> bool:
            text = log.read_text() if log.exists() else ""
            return "READY" in text or task_id in final_records(mgr.home)

        wait_until(progressed, 20, "the scoped task to report its cgroup")
        warned = [json.loads(line) for line in mgr.home.events_file.read_text().splitlines()
                  if '"worker_cgroup_limits_unavailable"' in line]
        if warned:
            (mgr.home.result_dir(task_id) / "release").touch()
            pytest.skip(f"this manager refused transient scopes: {warned[0]['data']['reason']}")
        shown = mgr.show(scope, "ActiveState", "MemoryMax", "TasksMax", "ControlGroup")
        print(f"{scope}: {shown}\n{log.read_text()}")
        assert shown["ActiveState"] == "active", (shown, mgr.log_tail())
        assert shown["MemoryMax"] == str(64 * 2**20) and shown["TasksMax"] == "20", shown
        (mgr.home.result_dir(task_id) / "release").touch()
        wait_until(lambda: task_id in final_records(mgr.home), 20, "the scoped task to end")
        rec = final_records(mgr.home)[task_id][-1]
        assert rec["status"] == "completed", (rec, log.read_text())
        text = log.read_text()
        cgroups = [line for line in text.splitlines() if line[:1].isdigit() and ":" in line]
        assert cgroups and all(line.endswith(f"/{scope}") for line in cgroups
                               if line.split(":")[1] in ("", "memory", "pids")), text
        # The limits as the kernel sees them, wherever this host's cgroup files are.
        assert f"MEMORY={64 * 2**20}" in text and "PIDS=20" in text, text
        assert "ENV_INVOCATION_ID=unset" in text  # the env allowlist still holds
        started = [json.loads(line) for line in mgr.home.events_file.read_text().splitlines()
                   if '"task_started"' in line and task_id in line]
        assert started[-1]["data"]["scope"] == scope
        wait_until(lambda: mgr.show(scope, "LoadState")["LoadState"] == "not-found", 10,
                   "the scope to be collected")
        assert mgr.show(unit, "ActiveState")["ActiveState"] == "active"
    finally:
        mgr.systemctl("stop", unit, check=False)
        replace_json(mgr.home.worker_types_config, DEFAULT_WORKER_TYPES, pretty=True)


#: A task of the hardened worker: talks to a TCP server of the test on 127.0.0.1, reports
#: its rlimits, cgroup and sandbox (NoNewPrivs, Seccomp, CapBnd of /proc/self/status), and
#: writes all of it as its result.
NETWORK_TASK = r"""
import errno, json, os, resource, socket, stat, sys
port = int(sys.argv[1])
with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
    conn.sendall(b"ping " + os.environ["HARNESS_TASK_ID"].encode() + b"\n")
    reply = conn.makefile("rb").readline().decode().strip()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
def write_error(path):
    try:
        with open(path, "w"):
            pass
        os.unlink(path)
        return None
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
block_devices = [n for n in os.listdir("/dev")
                 if stat.S_ISBLK(os.lstat("/dev/" + n).st_mode)]
result = {"reply": reply, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
          "cpu": resource.getrlimit(resource.RLIMIT_CPU),
          "cgroup": open("/proc/self/cgroup").read().splitlines(),
          "sandbox": {k: status[k].strip() for k in ("NoNewPrivs", "Seccomp", "CapBnd")},
          "etc": write_error("/etc/harness-sandbox-probe"),
          "home": write_error(os.environ["HARNESS_RESULT_FILE"] + ".probe"),
          "block_devices": block_devices}
with open(os.environ["HARNESS_RESULT_FILE"], "w") as fh:
    json.dump(result, fh)
"""


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[int, list[str]]]:
    """A TCP server on 127.0.0.1 answering each line with "pong <line>"; yields its port and
    the lines it received."""
    import socket
    import threading

    received: list[str] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                line = conn.makefile("rb").readline().decode().strip()
                received.append(line)
                conn.sendall(f"pong {line}\n".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], received
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_hardened_worker_runs_a_network_task_with_rlimits_in_a_scope(
        fleet: UserManager) -> None:
    """The sandboxed worker unit (as installed) still runs a task that uses the network
    (loopback here: a server of this test), under its type's setrlimit limits, in a
    transient scope of its own, and the task writes its result. The worker itself really
    runs sandboxed: no new privileges, a seccomp filter, an empty capability bounding set.
    (A user manager ignores User=; the private manager of this test runs as root, so the
    mount-namespace options apply too.)"""
    mgr = fleet
    types = json.loads(json.dumps(DEFAULT_WORKER_TYPES))
    types["worker_types"]["net"] = {"command_template": None,
                             "limits": {"cpu_seconds": 120, "processes": 200}}
    replace_json(mgr.home.worker_types_config, types, pretty=True)
    unit = unit_of(7)
    try:
        _start(mgr, unit)
        pid = int(mgr.show(unit, "MainPID")["MainPID"])
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
        assert int(status["CapBnd"].strip(), 16) == 0, status["CapBnd"]
        q = TaskQueue(mgr.home)
        with echo_server() as (port, received):
            task = q.enqueue({"command": [sys.executable, "-c", NETWORK_TASK, str(port)],
                              "worker_type": "net", "max_attempts": 1}).task
            task_id = task["task_id"]
            wait_until(lambda: task_id in final_records(mgr.home), 30, "the network task")
        rec = final_records(mgr.home)[task_id][-1]
        log = mgr.home.task_log(task_id)
        assert rec["status"] == "completed", (rec, log.read_text(), mgr.log_tail())
        result = rec["result"]
        assert received == [f"ping {task_id}"] and result["reply"] == f"pong ping {task_id}"
        assert result["cpu"] == [120, 121]  # the type's limits, applied by the worker
        assert result["sandbox"] == {"NoNewPrivs": "1", "Seccomp": "2",
                                     "CapBnd": status["CapBnd"].strip()}
        # The mount namespace is in effect: /etc is read-only (ProtectSystem=strict), the
        # home is writable (ReadWritePaths=), /dev has no block device (PrivateDevices=).
        # Not on a host whose manager could only run the units with --no-sandbox.
        print(f"sandbox applied by this manager: {mgr.sandbox}")
        assert result["home"] is None, result
        if mgr.sandbox != "none":
            assert result["etc"] == "EROFS" and result["block_devices"] == [], result
        scope = scope_unit_name(task_id, 1)
        assert any(line.endswith(f"/{scope}") for line in result["cgroup"]), result["cgroup"]
        started = [json.loads(line) for line in mgr.home.events_file.read_text().splitlines()
                   if '"task_started"' in line and task_id in line]
        assert started[-1]["data"]["scope"] == scope
    finally:
        mgr.systemctl("stop", unit, check=False)
        replace_json(mgr.home.worker_types_config, DEFAULT_WORKER_TYPES, pretty=True)


ESCAPING_TASK = Path(__file__).parent / "procs" / "escaping_task.py"


def test_cancelled_task_scope_and_escapees_are_killed(fleet: UserManager) -> None:
    """Under systemd a task's children that left its process group (setsid, double fork,
    start_new_session, setpgid) die with it on cancel: the worker sweeps its descendants
    and kills the task's scope; the scope is gone afterwards. A task still running when
    its worker's unit is stopped by force dies with the unit (the scope is BindsTo= it)."""
    import psutil

    mgr = fleet
    unit = unit_of(8)
    pidfile = mgr.home.root / "escapees.json"
    try:
        _start(mgr, unit)
        q = TaskQueue(mgr.home)
        for stop in ("cancel", "kill-worker"):
            pidfile.unlink(missing_ok=True)
            task = q.enqueue({"command": [sys.executable, str(ESCAPING_TASK), str(pidfile)],
                              "max_attempts": 1}).task
            pids = wait_until(lambda: pidfile.exists() and json.loads(pidfile.read_text()),
                              30, "the escaping task's children")
            procs = {name: psutil.Process(pid) for name, pid in pids.items()}
            scope = scope_unit_name(task["task_id"], 1)
            assert mgr.show(scope, "ActiveState")["ActiveState"] == "active"
            if stop == "cancel":
                q.cancel(task["task_id"])
                def cancelled(t: Task = task) -> bool:
                    return t["task_id"] in final_records(mgr.home)

                wait_until(cancelled, 30, "the cancelled task")
            else:
                # SIGKILL of the worker alone: the unit fails and is restarted; its bound
                # scope is stopped with it, children and all.
                os.kill(int(mgr.show(unit, "MainPID")["MainPID"]), signal.SIGKILL)
            _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
            assert not alive, (stop, alive, mgr.log_tail())
            def collected(s: str = scope) -> bool:
                return mgr.show(s, "LoadState")["LoadState"] == "not-found"

            wait_until(collected, 10, "the scope to be collected")
            with contextlib.suppress(NotFound):  # the killed worker's task, if still live
                q.cancel(task["task_id"])
    finally:
        mgr.systemctl("stop", unit, check=False)
