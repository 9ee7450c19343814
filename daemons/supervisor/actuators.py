"""Actuators: how the supervisor starts and stops worker processes.

One small interface (:class:`Actuator`) with two implementations, so the supervisor's
decisions are tested without touching the OS and the OS effects are tested on their own:

- :class:`ProcessActuator` spawns ``harness worker run --instance N --home H`` children,
  each in its own session and process group, and reaps them. Used by ``harness up`` and
  wherever systemd is absent.
- :class:`SystemdActuator` starts and stops ``harness-worker@N.service`` instances through
  ``systemctl [--user]`` (``--no-block``: the supervisor never waits for a job) and lists
  them with ``systemctl list-units 'harness-worker@*' --output=json``.

The supervisor never asks an actuator to stop a busy worker: scale-down drains idle workers
through ``control.json`` (the worker finishes whatever it just claimed, then exits 0, so a
systemd instance goes inactive, not failed). :meth:`Actuator.stop` (SIGTERM or ``systemctl
stop``: the worker hands its task back) and :meth:`Actuator.kill` are for shutdown and for
fencing a worker already declared dead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
import psutil

from coordination.paths import Home
from coordination.store import open_in_folder

from ..process_groups import parent_death_preexec

WORKER_UNIT_TEMPLATE = "harness-worker@.service"
log = logging.getLogger("harness.actuators")  # diagnostics (daemons/diagnostics.py)
#: Environment a spawned worker must not inherit from a supervisor run by systemd: it is
#: not the unit's main process (sd_notify would be refused) and it is not "in" that unit.
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "JOURNAL_STREAM")


def worker_unit(instance: str) -> str:
    return f"harness-worker@{instance}.service"


@dataclass
class Instance:
    """A worker instance the actuator knows: ``state`` is running, starting or stopping."""

    name: str
    state: str
    pid: int | None = None


class Actuator(Protocol):
    """What the supervisor needs from whatever runs workers."""

    name: str

    def instances(self) -> dict[str, Instance]:
        """Instances that are up or on their way up/down, by instance name."""
        ...

    def start(self, instance: str) -> None:
        """Start one worker instance (returns at once; the worker registers its spec)."""
        ...

    def stop(self, instance: str) -> None:
        """Ask one instance to stop now (SIGTERM: it hands its task back)."""
        ...

    def kill(self, instance: str) -> None:
        """SIGKILL one instance (fencing a worker declared dead)."""
        ...

    def poll(self) -> list[tuple[str, int | None]]:
        """Reap instances that exited since the last call: ``(instance, status)``."""
        ...

    def close(self, grace_s: float) -> None:
        """Stop what this actuator itself owns (children); no-op for systemd units."""
        ...


# ---------------------------------------------------------------------------- process
@dataclass
class _Child:
    instance: str
    popen: subprocess.Popen[bytes]
    started: float


class ProcessActuator:
    """Workers as child processes, one session (and process group) each.

    Each child gets SIGTERM when this process dies, however it dies (PR_SET_PDEATHSIG,
    :func:`~daemons.process_groups.parent_death_preexec`): a ``kill -9`` of ``harness up``
    leaves no worker behind; each hands back its task and stops it, as on any SIGTERM.

    Their stdout/stderr go to ``logs/workers/worker-<N>.log`` (appended), so the terminal
    of ``harness up`` stays readable and no pipe can fill up. Children never outlive
    :meth:`close`: SIGTERM, ``grace_s`` to finish or hand back their tasks, then SIGKILL of
    their process groups.
    """

    name = "process"

    def __init__(self, home: Home, *, argv: list[str] | None = None,
                 environ: Mapping[str, str] | None = None,
                 log_dir: Path | None = None, worker_args: tuple[str, ...] = ()) -> None:
        self.home = home
        self.argv = list(argv) if argv else [sys.executable, "-m", "daemons"]
        self.environ = dict(os.environ if environ is None else environ)
        self.log_dir = log_dir or home.worker_logs
        self.worker_args = tuple(worker_args)
        self.children: dict[str, _Child] = {}
        self._exited: list[tuple[str, int | None]] = []

    def _env(self, instance: str) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if k not in _SYSTEMD_ENV}
        env["HARNESS_HOME"] = str(self.home.root)
        env["HARNESS_INSTANCE"] = instance
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def command(self, instance: str) -> list[str]:
        return [*self.argv, "worker", "run", "--instance", instance,
                "--home", str(self.home.root), *self.worker_args]

    def start(self, instance: str) -> None:
        if instance in self.children and self.children[instance].popen.poll() is None:
            raise ValueError(f"worker instance {instance} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_fd = open_in_folder(self.log_dir / f"worker-{instance}.log",  # never a link
                                os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with os.fdopen(log_fd, "ab") as log:
            popen = subprocess.Popen(self.command(instance), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     env=self._env(instance), start_new_session=True,
                                     close_fds=True,
                                     preexec_fn=parent_death_preexec(signal.SIGTERM))
        self.children[instance] = _Child(instance, popen, time.monotonic())

    def instances(self) -> dict[str, Instance]:
        self._reap()
        return {name: Instance(name, "running", child.popen.pid)
                for name, child in self.children.items()}

    def pids(self) -> dict[str, int]:
        return {name: child.popen.pid for name, child in self.children.items()}

    def _reap(self) -> None:
        for name, child in list(self.children.items()):
            code = child.popen.poll()
            if code is not None:
                del self.children[name]
                self._exited.append((name, code))

    def poll(self) -> list[tuple[str, int | None]]:
        self._reap()
        out, self._exited = self._exited, []
        return out

    def _signal(self, instance: str, sig: int, group: bool = False) -> None:
        child = self.children.get(instance)
        if child is None or child.popen.poll() is not None:
            return  # reaped (or never ours): its pid may belong to someone else now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(child.popen.pid, sig)
            else:
                os.kill(child.popen.pid, sig)

    def stop(self, instance: str) -> None:
        self._signal(instance, signal.SIGTERM)

    def kill(self, instance: str) -> None:
        self._signal(instance, signal.SIGKILL, group=True)

    def terminate_all(self) -> None:
        """SIGTERM every child (a second call ends their stop grace at once)."""
        for name in list(self.children):
            self._signal(name, signal.SIGTERM)

    def wait_all(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every child to exit (reaping them); True when none
        is left."""
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            if not self.children:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def close(self, grace_s: float) -> None:
        self.terminate_all()
        if not self.wait_all(grace_s):
            for name in list(self.children):
                self._signal(name, signal.SIGKILL, group=True)
            self.wait_all(10.0)
        # Whatever is left is unreapable by us (should not happen): forget it loudly.
        for name, child in list(self.children.items()):
            log.error("worker instance %s (pid %s) did not exit", name, child.popen.pid)
        self.children.clear()


# ---------------------------------------------------------------------------- systemd
class SystemdError(RuntimeError):
    """systemctl failed; the message carries its stderr."""


class SystemdActuator:
    """Worker instances as ``harness-worker@N.service`` units of one systemd manager.

    ``scope`` "user" drives ``systemctl --user`` (the manager found through
    ``$XDG_RUNTIME_DIR``), "system" the system manager (needs root or a polkit rule).
    Listing is cached for ``list_cache_s`` and refreshed after every start or stop, so an
    idle supervisor does not fork systemctl on every tick.
    """

    name = "systemd"

    def __init__(self, scope: str = "user", *, environ: Mapping[str, str] | None = None,
                 systemctl: str = "systemctl", timeout_s: float = 30.0,
                 list_cache_s: float = 10.0) -> None:
        if scope not in ("user", "system"):
            raise ValueError(f"unknown systemd scope {scope!r}")
        self.scope = scope
        self.environ = dict(os.environ if environ is None else environ)
        self.systemctl = systemctl
        self.timeout_s = timeout_s
        self.list_cache_s = list_cache_s
        self._cache: tuple[float, dict[str, Instance]] | None = None

    def _cmd(self, *args: str) -> list[str]:
        return [self.systemctl, *(["--user"] if self.scope == "user" else []), *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = self._cmd(*args)
        try:
            proc = subprocess.run(cmd, env=self.environ, capture_output=True, text=True,
                                  timeout=self.timeout_s, check=False,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SystemdError(f"{' '.join(cmd)}: {exc}") from exc
        if check and proc.returncode != 0:
            raise SystemdError(f"{' '.join(cmd)} exited {proc.returncode}: "
                               f"{proc.stderr.strip()}")
        return proc

    def installed(self) -> bool:
        """Whether the manager knows the harness-worker@.service template."""
        try:
            proc = self.run("list-unit-files", WORKER_UNIT_TEMPLATE, "--no-legend",
                            "--no-pager", check=False)
        except SystemdError:
            return False
        return any(line.split()[:1] == [WORKER_UNIT_TEMPLATE]
                   for line in proc.stdout.splitlines())

    @staticmethod
    def parse_list_units(text: str) -> dict[str, Instance]:
        """``list-units --output=json`` rows -> instances (running, starting, stopping)."""
        try:
            rows = orjson.loads(text or "[]")
        except orjson.JSONDecodeError as exc:
            raise SystemdError(f"unexpected list-units output: {exc}") from None
        out: dict[str, Instance] = {}
        for row in rows if isinstance(rows, list) else []:
            unit = str(row.get("unit", ""))
            if not unit.startswith("harness-worker@") or not unit.endswith(".service"):
                continue
            name = unit[len("harness-worker@"):-len(".service")]
            active = row.get("active")
            if active in ("active", "reloading"):
                state = "running"
            elif active == "activating":
                state = "starting"
            elif active == "deactivating":
                state = "stopping"
            else:
                continue  # inactive, failed: not running
            out[name] = Instance(name, state)
        return out

    def instances(self) -> dict[str, Instance]:
        now = time.monotonic()
        if self._cache is not None and now - self._cache[0] < self.list_cache_s:
            return dict(self._cache[1])
        proc = self.run("list-units", "harness-worker@*", "--all", "--output=json",
                        "--no-pager")
        found = self.parse_list_units(proc.stdout)
        self._cache = (now, found)
        return dict(found)

    def invalidate(self) -> None:
        self._cache = None

    def start(self, instance: str) -> None:
        self._cache = None
        self.run("start", "--no-block", worker_unit(instance))

    def stop(self, instance: str) -> None:
        self._cache = None
        self.run("stop", "--no-block", worker_unit(instance))

    def kill(self, instance: str) -> None:
        self._cache = None
        self.run("kill", "--signal=SIGKILL", worker_unit(instance), check=False)

    def poll(self) -> list[tuple[str, int | None]]:
        return []  # systemd reaps its units

    def close(self, grace_s: float) -> None:
        """Worker units are independent of the supervisor: leave them running."""


# ---------------------------------------------------------------------------- choice
def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("INVOCATION_ID"))


def make_actuator(home: Home, cfg: Mapping[str, Any], *, name: str | None = None,
                  environ: Mapping[str, str] | None = None) -> Actuator:
    """The actuator ``name`` (else system.json ``actuator``); "auto" picks systemd when we
    run under systemd ($INVOCATION_ID) and the harness-worker@.service template is installed
    in the manager of ``systemd_scope``, else process."""
    choice = name or str(cfg.get("actuator", "auto"))
    scope = str(cfg.get("systemd_scope", "user"))
    if choice == "process":
        return ProcessActuator(home, environ=environ)
    if choice == "systemd":
        return SystemdActuator(scope, environ=environ)
    if choice != "auto":
        raise ValueError(f"unknown actuator {choice!r}; use auto, systemd or process")
    if under_systemd(environ) and shutil.which("systemctl"):
        candidate = SystemdActuator(scope, environ=environ)
        if candidate.installed():
            return candidate
    return ProcessActuator(home, environ=environ)


def kill_orphaned_tasks(worker_id: str) -> list[int]:
    """SIGKILL the process groups of tasks a dead worker left behind on this host.

    A task runs in its own session, so it survives a SIGKILL of its worker and would keep
    running beside the retry. The worker gives each task ``HARNESS_WORKER_ID`` in its
    environment; that is how the orphans are found (best effort: processes of other users
    are not readable). Returns the process group ids signalled.
    """
    groups: set[int] = set()
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("HARNESS_WORKER_ID") != worker_id:
            continue
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(proc.pid))
    own = os.getpgid(0)
    killed = []
    for pgid in sorted(groups):
        if pgid in (own, 0, 1):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
            killed.append(pgid)
    return killed
