"""A private ``systemd --user`` manager for the tests that run the units for real
(tests/test_systemd_real.py, tests/test_web_systemd.py); conftest.py wraps
:func:`boot_manager` and :func:`install_fleet` as the module-scoped ``manager`` and ``fleet``
fixtures.

This host may be a container without systemd as PID 1, so the manager is booted as a child
process: ``/run/systemd/system`` must exist (created when we are root, and removed again
afterwards), ``XDG_RUNTIME_DIR`` and ``XDG_CONFIG_HOME`` point into tmp,
``DBUS_SESSION_BUS_ADDRESS`` is unset so ``systemctl --user`` talks to the manager's private
socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import make_home, skip_reason, wait_until, write_host_limits_dropin

from coordination.paths import Home

HARNESS = [sys.executable, "-m", "daemons"]
#: Instance names unique to this run. Every `systemd --user` started in this container sits in
#: the same cgroup tree, so two managers running at once (parallel test runs on one host)
#: would share the cgroup of a same-named unit and kill each other's processes on stop.
RUN = f"t{os.getpid()}"


def unit_of(n: int | str) -> str:
    return f"harness-worker@{RUN}-{n}.service"


def instance_of(n: int | str) -> str:
    return f"{RUN}-{n}"


def _systemd_binary() -> str | None:
    for candidate in (shutil.which("systemd"), "/usr/lib/systemd/systemd",
                      "/lib/systemd/systemd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None



@dataclass
class UserManager:
    root: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path
    home: Home
    pids: set[int] = field(default_factory=set)  # every worker MainPID seen (for cleanup)
    # How much of the sandbox this manager applies: "full", "kernel-protections" (that
    # drop-in was needed) or "none" (--no-sandbox: no mount namespace at all).
    sandbox: str = "full"

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["systemctl", "--user", "--no-pager", *args], env=self.env,
                              capture_output=True, text=True, timeout=90, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"systemctl --user {' '.join(args)} failed "
                                 f"({proc.returncode}): {proc.stderr}\nmanager log:\n"
                                 f"{self.log_tail()}")
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"-p{p}" for p in props)).stdout
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        pid = values.get("MainPID")
        if pid and pid != "0":
            self.pids.add(int(pid))
        return values

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""


def boot_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserManager]:
    """A private ``systemd --user`` manager for a module (conftest's ``manager`` fixture),
    stopped with every worker it ran at the end; skips where it cannot run."""
    systemd = _systemd_binary()
    if systemd is None or shutil.which("systemctl") is None:
        pytest.skip(skip_reason("systemd"))
    marker = Path("/run/systemd/system")
    if not marker.is_dir() and os.geteuid() != 0:
        pytest.skip("/run/systemd/system does not exist and we are not root, so a private "
                    "systemd --user manager cannot be booted here")
    created_marker = False
    root = tmp_path_factory.mktemp("systemd-user")
    runtime = root / "run"
    runtime.mkdir(mode=0o700)
    config = root / "config"
    config.mkdir()
    env = dict(os.environ)
    for key in ("DBUS_SESSION_BUS_ADDRESS", "NOTIFY_SOCKET", "INVOCATION_ID", "MANAGERPID",
                "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(key, None)
    env.update(XDG_RUNTIME_DIR=str(runtime), XDG_CONFIG_HOME=str(config),
               SYSTEMD_LOG_TARGET="console")
    log = root / "manager.log"
    home = make_home(root, "home", stop_grace_s=1, kill_grace_s=0.5, retry_backoff_base_s=0)
    private = runtime / "systemd" / "private"
    mgr: UserManager | None = None
    try:
        # /run/systemd/system is shared by every test run on this host; another module's
        # teardown may remove it just as we start, so a manager that exits at once is
        # retried (the marker recreated) a couple of times before we give up and skip.
        for _ in range(3):
            if not marker.is_dir():
                marker.mkdir(parents=True, exist_ok=True)
                created_marker = True
            with open(log, "ab") as fh:
                proc = subprocess.Popen([systemd, "--user"], env=env,
                                        stdin=subprocess.DEVNULL, stdout=fh,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            mgr = UserManager(root, env, proc, log, home)
            def up_or_exited(p: subprocess.Popen[bytes] = proc) -> bool:
                return private.exists() or p.poll() is not None

            with contextlib.suppress(AssertionError):
                wait_until(up_or_exited,
                           20, "the user manager's private socket")
            if proc.poll() is None:
                break  # up (or hung: then skipped below, and killed at teardown)
        assert mgr is not None
        if mgr.proc.poll() is not None or not private.exists():
            pytest.skip(f"systemd --user did not start (exit {mgr.proc.poll()}): "
                        f"{mgr.log_tail(2000)}")
        yield mgr
    finally:
        _teardown(mgr, created_marker, marker)


def _teardown(mgr: UserManager | None, created_marker: bool, marker: Path) -> None:
    if mgr is None:
        return
    with contextlib.suppress(Exception):
        if mgr.proc.poll() is None:
            mgr.systemctl("stop", "harness.target", "harness-worker@*.service", check=False)
    if mgr.proc.poll() is None:
        mgr.proc.send_signal(signal.SIGTERM)  # a user manager exits on SIGTERM
        try:
            mgr.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(mgr.proc.pid, signal.SIGKILL)
            mgr.proc.wait(30)
    # Workers run in sessions of their own: make sure none outlived the manager.
    for pid in mgr.pids:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(mgr.home.root).encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
    if created_marker:
        with contextlib.suppress(OSError):
            marker.rmdir()


def install_units(mgr: UserManager, *extra: str) -> subprocess.CompletedProcess[str]:
    # ExecStart is whatever the installer picks by default (the console script beside this
    # interpreter, else `harness` on PATH, else `python -m daemons`), as for an operator.
    out = subprocess.run([*HARNESS, "systemd", "install", "--user", "--home",
                          str(mgr.home.root), *extra], env=mgr.env, capture_output=True,
                         text=True, timeout=90, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ran systemctl --user daemon-reload" in out.stdout, out.stdout + out.stderr
    return out


def install_fleet(manager: UserManager) -> UserManager:
    """The units installed into the private manager's user unit directory, sandboxed.

    Where the manager cannot build the sandbox's mount namespace (the unit fails with
    status 226/NAMESPACE), the units are reinstalled with --no-sandbox, the documented
    switch for such hosts, and the test says so; on this project's CI container the
    sandboxed units work."""
    out = install_units(manager)
    if str(manager.home.root).startswith(("/tmp/", "/var/tmp/")):
        assert "PrivateTmp turned off" in out.stderr  # a private /tmp would hide the home
    unit = Path(manager.env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "harness-worker@.service"
    text = unit.read_text()
    assert "ProtectSystem=strict" in text and f"ReadWritePaths={manager.home.root}" in text
    probe = unit_of("probe")

    def start_probe() -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
        started = manager.systemctl("start", probe, check=False)
        state = manager.show(probe, "ActiveState", "ExecMainStatus")
        if started.returncode != 0:
            manager.systemctl("reset-failed", probe, check=False)
        return started, state

    started, state = start_probe()
    if started.returncode != 0 and state.get("ExecMainStatus") == "226":
        # The documented, narrower escape first: only the two kernel protections this
        # host's manager cannot apply are dropped, the rest of the sandbox stays.
        dropin = write_host_limits_dropin(unit.parent)
        manager.systemctl("daemon-reload")
        print(f"sandboxed unit failed with 226/NAMESPACE here; added {dropin}")
        manager.sandbox = "kernel-protections"
        started, state = start_probe()
    if started.returncode != 0 and state.get("ExecMainStatus") == "226":
        print(f"still 226/NAMESPACE; reinstalling with --no-sandbox. Manager log:\n"
              f"{manager.log_tail(1500)}")
        install_units(manager, "--no-sandbox")
        manager.sandbox = "none"
    else:
        assert started.returncode == 0, (started.stderr, state, manager.log_tail())
    manager.systemctl("stop", probe, check=False)
    return manager
