"""The systemd actuator against a private ``systemd --user`` manager.

The manager is a child of the test with its own $XDG_RUNTIME_DIR and $XDG_CONFIG_HOME under
tmp_path; the units are installed with ``harness systemd install --user``; the supervisor
is driven in-process (``reconcile(now)``) with a :class:`SystemdActuator` talking to that
manager. Skipped, with the reason and the manager's stderr, only where systemd is absent or
cannot start here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import events, make_home, req, skip_reason, write_host_limits_dropin

from coordination import clock
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import read_specs
from daemons.supervisor.actuators import SystemdActuator
from daemons.supervisor.reconcile import Supervisor

pytestmark = pytest.mark.systemd

HARNESS = [sys.executable, "-m", "daemons"]


def _systemd_binary() -> str | None:
    for candidate in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("systemd")


@dataclass
class Manager:
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    stderr: Path

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemctl", "--user", *args], env=self.env,
                              capture_output=True, text=True, timeout=60, check=False)


def _ensure_run_systemd_system() -> None:
    """A user manager starts only when /run/systemd/system exists (systemd is not PID 1
    in a container). Created as root and left in place, as .ci/run does."""
    marker = Path("/run/systemd/system")
    if marker.is_dir():
        return
    if os.geteuid() != 0:
        pytest.skip("/run/systemd/system is missing and we are not root to create it")
    marker.mkdir(parents=True, exist_ok=True)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    exe = _systemd_binary()
    if exe is None or shutil.which("systemctl") is None:
        pytest.skip(skip_reason("systemd"))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    config = tmp_path / "config"
    config.mkdir()
    private = runtime / "systemd" / "private"
    if len(str(private)) > 100:
        pytest.skip(f"tmp_path too long for the manager's socket: {private}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DBUS_SESSION_BUS_ADDRESS", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                        "WATCHDOG_PID", "INVOCATION_ID", "HARNESS_HOME", "HARNESS_INSTANCE")}
    env.update(XDG_RUNTIME_DIR=str(runtime), XDG_CONFIG_HOME=str(config))
    err = tmp_path / "manager.err"
    proc: subprocess.Popen[bytes] | None = None
    for _ in range(3):  # another test's teardown may remove /run/systemd/system meanwhile
        _ensure_run_systemd_system()
        with open(err, "ab") as fe:
            proc = subprocess.Popen([exe, "--user"], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=fe,
                                    start_new_session=True)
        deadline = time.monotonic() + 30
        while not private.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if private.exists():
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc is not None
    if not private.exists():
        pytest.skip(f"systemd --user could not start here (exit {proc.returncode}); "
                    f"stderr: {err.read_text(errors='replace')[-2000:]!r}")
    mgr = Manager(env, proc, err)
    try:
        yield mgr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # stops every unit (drains workers), then exits
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def _install(mgr: Manager, home: Home) -> None:
    base = [*HARNESS, "systemd", "install", "--user", "--home", str(home.root)]
    out = subprocess.run(base, env=mgr.env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    probe = mgr.systemctl("start", "harness-worker@probe.service")
    if probe.returncode != 0:
        # This manager cannot apply two kernel protections (226/NAMESPACE): the documented
        # drop-in turns off just those two.
        mgr.systemctl("reset-failed", "harness-worker@probe.service")
        write_host_limits_dropin(Path(mgr.env["XDG_CONFIG_HOME"]) / "systemd" / "user")
        mgr.systemctl("daemon-reload")
        probe = mgr.systemctl("start", "harness-worker@probe.service")
    if probe.returncode != 0:
        # This manager cannot set up the unit's mount namespace at all (some containers).
        mgr.systemctl("reset-failed", "harness-worker@probe.service")
        out = subprocess.run([*base, "--no-sandbox"], env=mgr.env, capture_output=True,
                             text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        probe = mgr.systemctl("start", "harness-worker@probe.service")
    assert probe.returncode == 0, (probe.stderr, mgr.systemctl(
        "status", "harness-worker@probe.service", "--no-pager").stdout)
    mgr.systemctl("stop", "harness-worker@probe.service")


def _wait(cond: object, timeout: float, what: str, sup: Supervisor) -> None:
    deadline = time.monotonic() + timeout
    while True:
        sup.reconcile(clock.now())
        if callable(cond) and cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def test_systemd_actuator_scales_worker_units(tmp_path: Path, manager: Manager) -> None:
    home = make_home(tmp_path, durability="none", min_workers=1, max_workers=3, warm_pool=0,
                     scale_cooldown_s=0.5, heartbeat_interval_s=0.5, retry_backoff_base_s=0,
                     actuator="systemd", systemd_scope="user")
    _install(manager, home)
    actuator = SystemdActuator("user", environ=manager.env, list_cache_s=0)
    assert actuator.installed()
    sup = Supervisor(home, actuator)

    def units() -> dict[str, str]:
        return {k: v.state for k, v in actuator.instances().items()}

    def idle_specs() -> int:
        return sum(1 for s in read_specs(home) if s.spec and s.spec.get("state") == "idle")

    _wait(lambda: units() == {"1": "running"} and idle_specs() == 1, 60,
          "the min_workers instance", sup)
    TaskQueue(home).enqueue_batch([req(command=["sleep", "0.5"], description=f"b{i}")
                                   for i in range(12)])
    peak = [0]

    def burst_done() -> bool:
        peak[0] = max(peak[0], len(units()))
        return not TaskQueue(home).live_tasks()

    _wait(burst_done, 90, "the burst to finish", sup)
    assert peak[0] == 3, f"expected 3 instances at the peak, saw {peak[0]}"
    _wait(lambda: list(units()) == ["1"] or len(units()) == 1, 60,
          "idle instances to be drained", sup)
    ups, downs = events(home, "scale_up"), events(home, "scale_down")
    assert max(e["data"]["to"] for e in ups) == 3 and downs[-1]["data"]["to"] == 1
    assert all(e["data"]["actuator"] == "systemd" for e in ups + downs)
    # Every worker the supervisor drained exited by itself with exit_reason drained.
    drained = {i for e in downs for i in e["data"]["instances"]}
    done = {s.spec["instance"]: s.spec["exit_reason"]
            for s in read_specs(home, completed=True) if s.spec}
    assert drained and all(done.get(i) == "drained" for i in drained), (drained, done)
    # Drained units exit 0: inactive, not failed, and not restarted.
    failed = manager.systemctl("list-units", "harness-worker@*", "--state=failed",
                               "--no-legend", "--plain")
    assert failed.stdout.strip() == ""


def test_supervisor_service_under_the_manager(tmp_path: Path, manager: Manager) -> None:
    """harness-supervisor.service itself: Type=notify start, STATUS=, auto-detected systemd
    actuator (INVOCATION_ID + installed template) starting harness-worker@1, clean stop."""
    home = make_home(tmp_path, durability="none", min_workers=1, max_workers=2, warm_pool=0,
                     supervisor_tick_s=0.5)
    _install(manager, home)
    started = manager.systemctl("start", "harness-supervisor.service")  # waits for READY=1
    assert started.returncode == 0, (started.stderr, manager.systemctl(
        "status", "harness-supervisor.service", "--no-pager").stdout)
    try:
        deadline = time.monotonic() + 60
        while True:
            shown = manager.systemctl("show", "-p", "ActiveState", "-p", "StatusText",
                                      "harness-supervisor.service").stdout
            worker = manager.systemctl("is-active", "harness-worker@1.service").stdout.strip()
            if "ActiveState=active" in shown and "StatusText=" in shown and worker == "active" \
                    and any(s.spec and s.spec.get("instance") == "1" for s in read_specs(home)):
                break
            assert time.monotonic() < deadline, (shown, worker)
            time.sleep(0.2)
        assert "queued 0" in shown
        [up] = events(home, "scale_up")[:1]
        assert up["data"]["actuator"] == "systemd" and up["data"]["instances"] == ["1"]
    finally:
        stopped = manager.systemctl("stop", "harness-supervisor.service")
    assert stopped.returncode == 0, stopped.stderr
    state = manager.systemctl("show", "-p", "ActiveState", "-p", "Result",
                              "harness-supervisor.service").stdout
    assert "ActiveState=inactive" in state and "Result=success" in state, state
