"""Run one task attempt as its own process group, capture its output, stop it reliably.

A :class:`TaskRun` is driven by its worker's loop and never blocks it:

- The task is started with ``start_new_session=True`` (new session and process group, no
  controlling terminal), stdin from /dev/null, stdout and stderr into one pipe, the
  environment built by :func:`build_env` from an allowlist only, and the worker type's
  resource limits applied in the child before exec (:func:`limits_preexec`).
- A reader thread copies the pipe into ``logs/tasks/<task_id>.log`` (append, one header
  line per attempt) until the file reaches ``task_log_max_bytes``; the rest of the output is
  read and counted but dropped, and one marker line ``[harness: output truncated at N
  bytes]`` is appended. The same thread polls a pidfd of the leader and pokes ``wake``
  when it exits (the loop then reaps it), and again at EOF; it never touches coordination
  files. Without pidfd_open (Linux < 5.3) a second thread waits for the leader instead.
  One thread per attempt, no preexec_fn unless the type sets limits: subprocess then
  spawns with vfork, the cheap path.
- :meth:`TaskRun.terminate` sends SIGTERM to the whole group and SIGKILL ``kill_grace_s``
  later. With ``RunSpec.sweep_descendants`` (the worker, a child subreaper that runs one
  task at a time) both also go to every descendant of the worker, so children that left
  the group (setsid, setpgid, a double-fork daemon) go too, and the SIGKILL sweep repeats
  until none is left; with a scope, SIGKILL also goes to the scope's cgroup. When the
  leader exits on its own, whatever is left (a background grandchild, a daemon) is stopped
  the same way, so no process of a task outlives it (docs/security.md).
  Zombies do not count as survivors: liveness is judged from ``/proc`` state.
- With a :class:`Scope` (the worker type sets ``cgroup_limits`` and the worker runs under a
  reachable systemd manager, :func:`find_scope_manager`), the argv is prefixed by
  :func:`scope_command`: ``systemd-run [--user] --scope ... -- env -u ... --`` puts the
  process into a transient scope with those cgroup limits and execs the command in place
  (same pid, same process group, still our child), so everything above is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordination import clock
from coordination.errors import UnsafePath
from coordination.store import open_in_folder

log = logging.getLogger("harness.task")  # diagnostics (daemons/diagnostics.py)
TRUNCATION_MARKER = "[harness: output truncated at {cap} bytes]"
LINGER_AFTER_KILL_S = 2.0  # after SIGKILL, stop waiting for a group that will not go away
EOF_GRACE_S = 1.0  # after the group is gone, wait this long for the pipe's EOF
TAIL_BYTES = 512
SCOPE_PROBE_TIMEOUT_S = 10.0  # a systemd-run probe that takes longer counts as a failure
SCOPE_UNIT_PREFIX = "harness-task-"
#: How systemd-run reports that the manager refused the scope (the command never ran).
SCOPE_REFUSED = b"Failed to start transient scope unit"

_LIMITS = {
    "memory_mb": (resource.RLIMIT_AS, 1024 * 1024),
    "cpu_seconds": (resource.RLIMIT_CPU, 1),
    "processes": (resource.RLIMIT_NPROC, 1),
}


class SpawnError(Exception):
    """The task could not be started; ``retry`` says whether another attempt may help."""

    def __init__(self, message: str, *, retry: bool, exit_code: int) -> None:
        super().__init__(message)
        self.retry = retry
        self.exit_code = exit_code


def build_env(source: Mapping[str, str], allow: Iterable[str],
              harness: Mapping[str, str]) -> dict[str, str]:
    """The task environment: only allowlisted keys of ``source``, plus ``harness``."""
    env = {key: source[key] for key in dict.fromkeys(allow) if key in source}
    env.update(harness)
    return env


def rlimits(limits: Mapping[str, Any] | None) -> list[tuple[int, int, int]]:
    """``(resource, soft, hard)`` triples for a worker type's ``limits`` (None: unset).

    A limit never exceeds the worker's own hard limit (an unprivileged worker cannot raise
    it). RLIMIT_CPU gets a hard limit one second above the soft one, so the task first sees
    SIGXCPU (which it may handle) and SIGKILL only after.
    """
    out = []
    for key, value in (limits or {}).items():
        if value is None or key not in _LIMITS:
            continue
        res, unit = _LIMITS[key]
        soft = int(value) * unit
        hard = soft + 1 if res == resource.RLIMIT_CPU else soft
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        out.append((res, soft, hard))
    return out


def limits_preexec(limits: Mapping[str, Any] | None) -> Callable[[], None] | None:
    """A preexec_fn applying the limits in the child between fork and exec (no race with
    the task's first fork). It only calls setrlimit(2): no lock, no allocation worth
    mentioning, so it is safe although the worker has threads. None when no limit is set,
    which keeps subprocess on its vfork fast path."""
    triples = rlimits(limits)
    if not triples:
        return None

    def apply() -> None:
        for res, soft, hard in triples:
            resource.setrlimit(res, (soft, hard))

    return apply


# -- systemd transient scopes -----------------------------------------------------------------
@dataclass(frozen=True)
class ScopeManager:
    """A systemd manager that ``systemd-run --scope`` can reach from this worker."""

    user: bool  # the worker's own (user) manager: systemd-run --user
    systemd_run: str  # absolute path
    env_tool: str  # absolute path of env(1), which strips what systemd-run adds
    bus_env: dict[str, str] = field(default_factory=dict)  # what systemd-run needs to connect


@dataclass(frozen=True)
class Scope:
    """The transient scope one attempt runs in."""

    manager: ScopeManager
    unit: str
    properties: dict[str, str]


def scope_unit_name(task_id: str, attempt: int) -> str:
    """``harness-task-<task_id>-<attempt>.scope``, characters outside [A-Za-z0-9_.:-] as
    ``_``. The attempt number keeps a retry clear of a previous attempt's scope that a
    lingering process may still hold."""
    safe = re.sub(r"[^A-Za-z0-9_.:-]", "_", task_id)[:200]
    return f"{SCOPE_UNIT_PREFIX}{safe}-{attempt}.scope"


def find_scope_manager(environ: Mapping[str, str]) -> tuple[ScopeManager | None, str]:
    """The manager a worker with environment ``environ`` can put its tasks' scopes into,
    else None and why not.

    Under systemd means ``INVOCATION_ID`` is set (systemd sets it for every unit it
    starts). A user manager also sets ``MANAGERPID`` (systemd.exec(5)): then the scope goes
    to that manager with ``systemd-run --user``, which finds it through ``XDG_RUNTIME_DIR``
    (the private socket ``$XDG_RUNTIME_DIR/systemd/private``, else the session bus); without
    ``MANAGERPID`` the system manager. ``systemd-run`` and ``env`` must be on ``PATH``.
    Whether the manager then accepts the scope is :func:`probe_scope`'s question."""
    if not environ.get("INVOCATION_ID"):
        return None, "the worker does not run under systemd (no INVOCATION_ID)"
    path = environ.get("PATH") or os.defpath
    systemd_run = shutil.which("systemd-run", path=path)
    if systemd_run is None:
        return None, f"systemd-run is not on PATH ({path})"
    env_tool = shutil.which("env", path=path)
    if env_tool is None:
        return None, f"env is not on PATH ({path})"
    user = bool(environ.get("MANAGERPID"))
    bus_env: dict[str, str] = {}
    if user:
        if not environ.get("XDG_RUNTIME_DIR"):
            return None, ("the worker runs under a user manager (MANAGERPID) but "
                          "XDG_RUNTIME_DIR is not set, so systemd-run --user cannot reach it")
        bus_env = {k: environ[k] for k in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")
                   if environ.get(k)}
    return ScopeManager(user, os.path.abspath(systemd_run), os.path.abspath(env_tool),
                        bus_env), ""


def _systemd_run_head(manager: ScopeManager, properties: Mapping[str, str],
                      unit: str | None = None) -> list[str]:
    argv = [manager.systemd_run, *(["--user"] if manager.user else []),
            "--scope", "--quiet", "--collect", *([f"--unit={unit}"] if unit else [])]
    for key, value in properties.items():
        argv += ["-p", f"{key}={value}"]
    return argv


def scope_command(scope: Scope, argv: list[str], env: Mapping[str, str]) \
        -> tuple[list[str], dict[str, str]]:
    """(argv, env) that run ``argv`` with environment ``env`` inside ``scope``.

    ``systemd-run --scope`` creates the scope, moves itself into it and execs the rest in
    place; ``env -u`` then drops what the task would not otherwise get: ``INVOCATION_ID``
    (systemd-run sets the scope's) and the variables systemd-run needed to reach the
    manager, unless ``env`` (the allowlisted task environment) already has them."""
    manager = scope.manager
    head = _systemd_run_head(manager, scope.properties, scope.unit)
    run_env = dict(env)
    strip = [] if "INVOCATION_ID" in env else ["INVOCATION_ID"]
    for key, value in manager.bus_env.items():
        if key not in env:
            run_env[key] = value
            strip.append(key)
    unset = [arg for key in strip for arg in ("-u", key)]
    return [*head, "--", manager.env_tool, *unset, "--", *argv], run_env


def probe_scope(manager: ScopeManager, properties: Mapping[str, str],
                timeout: float = SCOPE_PROBE_TIMEOUT_S) -> str | None:
    """Start a throw-away scope with ``properties`` (running ``env``): None when the
    manager accepted it, else why not (systemd-run's message). The manager may refuse
    (no permission, no delegation, a value it rejects) or be unreachable."""
    argv = [*_systemd_run_head(manager, properties), "--", manager.env_tool]
    env = {"PATH": os.environ.get("PATH") or os.defpath, **manager.bus_env}
    try:
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout, check=False, start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"systemd-run did not answer within {timeout:g}s"
    except OSError as exc:
        return f"cannot run {manager.systemd_run}: {exc.strerror or exc}"
    if proc.returncode == 0:
        return None
    message = " ".join(proc.stderr.decode("utf-8", "replace").split())[:300]
    return f"systemd-run --scope failed (exit {proc.returncode}): {message or 'no message'}"


def kill_scope(scope: Scope, timeout: float = SCOPE_PROBE_TIMEOUT_S) -> str | None:
    """SIGKILL every process in the scope's cgroup (``systemctl kill``): None when the
    manager did it or the scope is already gone, else why not. Belt and braces beside the
    descendant sweep: the cgroup holds whatever the task started, wherever it moved in the
    process tree."""
    manager = scope.manager
    systemctl = shutil.which("systemctl", path=os.path.dirname(manager.systemd_run)) \
        or shutil.which("systemctl")
    if systemctl is None:
        return "systemctl not found"
    argv = [systemctl, *(["--user"] if manager.user else []), "kill", "--signal=SIGKILL",
            "--kill-whom=all", scope.unit]
    env = {"PATH": os.environ.get("PATH") or os.defpath, **manager.bus_env}
    try:
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"systemctl kill: {exc}"
    if proc.returncode == 0:
        return None
    message = proc.stderr.decode("utf-8", "replace").strip()
    return None if "not loaded" in message or "not found" in message else message[:300]


def check_executable(argv0: str, cwd: Path, env: Mapping[str, str]) -> None:
    """Raise FileNotFoundError or PermissionError as exec would for ``argv0`` (PATH from
    ``env``, a name with a slash relative to ``cwd``). A wrapped command (systemd-run, env)
    would only fail after starting; this keeps such failures spawn failures."""
    if "/" in argv0:
        candidates = [cwd / argv0]
    else:  # as subprocess searches: the task's PATH, relative entries from its cwd
        candidates = [cwd / folder / argv0 for folder in os.get_exec_path(dict(env))]
    seen = False
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return
        seen = seen or path.exists()
    if seen:
        raise PermissionError(13, "Permission denied")
    raise FileNotFoundError(2, "No such file or directory")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _proc_stat(pid_dir: str) -> tuple[str, int] | None:
    """(state, pgrp) from /proc/PID/stat, or None when the process is gone."""
    try:
        with open(f"/proc/{pid_dir}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return fields[0].decode(), int(fields[2])
    except (IndexError, ValueError):
        return None


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # kill(2) counts zombies (an orphan nobody reaped yet); /proc tells them apart.
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for name in entries:
        if not name.isdigit():
            continue
        stat = _proc_stat(name)
        if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X", "x"):
            return True
    return False


def reap_group(pgid: int) -> int:
    """Reap exited children of ours in group ``pgid`` (orphans reparented to a subreaper
    worker); returns how many. Call only after the leader itself was reaped."""
    count = 0
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return count
        if pid == 0:
            return count
        count += 1


def signal_group(pgid: int, sig: int) -> bool:
    """killpg; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def reap_orphans(exclude: Iterable[int] = ()) -> int:
    """Reap zombie children other than ``exclude``: orphans a subreaper inherited from tasks
    that escaped their process group (setsid) and exited later. Pass the pids this process
    still waits for itself (its Popen children) as ``exclude``, so their exit status is left
    to their owner. Returns how many were reaped."""
    import psutil

    # Cheap test first (one syscall, reaps nothing): is any child of ours a zombie at all?
    # Usually none is, and then the scan of /proc below (about 1 ms) is skipped.
    try:
        if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return 0
    except ChildProcessError:
        return 0  # no children at all
    skip = set(exclude)
    count = 0
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return 0
    for child in children:
        if child.pid in skip:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            pid, _ = os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            continue
        if pid:
            count += 1
    return count


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER), so
    grandchildren left by a task are reaped by the worker rather than lingering as zombies
    under an init that does not reap. Best effort; False when unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(36, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


PR_SET_PDEATHSIG = 1


def parent_death_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn making the child receive ``sig`` when this process dies
    (PR_SET_PDEATHSIG), so it cannot outlive us even after a SIGKILL; None where prctl is
    unavailable. The parent may die between fork and the prctl: the child then sees
    another parent (getppid) and sends itself ``sig`` at once. libc's prctl is looked up
    here, before the fork, so the child only makes two system calls. The setting survives
    exec; it fires when the *thread* that forked the child exits, so spawn from the main
    thread."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def apply() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return apply


def has_children() -> bool:
    """Whether this process has any child, live or zombie (one waitid(2), reaps nothing).
    With none, it has no descendant at all: every live descendant of a subreaper hangs
    below one of its children."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def live_descendants() -> list[Any]:
    """This process's descendants that are not zombies (psutil processes, so a signal
    sent through them cannot hit a recycled pid)."""
    import psutil

    if not has_children():
        return []
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def signal_descendants(sig: int, skip_pgid: int | None = None) -> int:
    """Send ``sig`` to every live descendant of this process, except members of process
    group ``skip_pgid`` (already signalled with killpg: a second SIGTERM would read as
    "hurry" to a program that counts them); returns how many got it.

    Children that called setsid(2) or setpgid(2), or daemonized by a double fork, left the
    task's process group but not our tree: as a child subreaper (:func:`become_subreaper`)
    this process inherits every orphan of its tasks. A process forked between the scan and
    the signal is caught by the next call: callers repeat until none is left."""
    import psutil

    count = 0
    for proc in live_descendants():
        with contextlib.suppress(psutil.Error, OSError):
            if skip_pgid is not None and os.getpgid(proc.pid) == skip_pgid:
                continue
            proc.send_signal(sig)
            count += 1
    return count


@dataclass
class RunSpec:
    """Everything needed to start one attempt."""

    task_id: str
    attempt: int
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    log_path: Path
    log_max_bytes: int
    kill_grace_s: float = 5.0
    limits: dict[str, Any] = field(default_factory=dict)
    header: str = ""
    scope: Scope | None = None  # run inside this transient systemd scope
    # The running process is a child subreaper whose only children are this attempt's
    # (the worker): stopping the attempt then stops every descendant of the process, not
    # only the task's process group, so setsid/setpgid/double-fork children go too.
    sweep_descendants: bool = False


class TaskRun:
    """One running attempt. All methods are called from the worker's main thread."""

    def __init__(self, spec: RunSpec, wake: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self._wake = wake or (lambda: None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.started_mono = 0.0
        self.ended_mono: float | None = None
        self.output_bytes = 0  # everything read from the pipe, kept or dropped
        self.logged_bytes = 0
        self.truncated = False
        self.tail = b""
        self.stop_reason: str | None = None  # why we stopped it (timeout, cancelled, ...)
        self.killed = False  # SIGKILL was sent
        self.lingering = False  # gave up waiting for a group member that would not die
        self.log_error: str | None = None  # a failed log write (the task kept running)
        self.finished = False
        self.scope_unit: str | None = None  # the transient scope it runs in, if any
        self._scope_killed = False
        self._term_sent_mono: float | None = None
        self._kill_at: float | None = None
        self._killed_mono: float | None = None
        self._leader_done_mono: float | None = None
        self._group_gone_mono: float | None = None
        self._reader: threading.Thread | None = None
        self._waiter: threading.Thread | None = None
        self._pidfd: int | None = None  # the reader thread also watches the leader's exit
        self._reader_done = threading.Event()
        self._stop_r: int | None = None
        self._stop_w: int | None = None
        self._lock = threading.Lock()

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the task; raises :class:`SpawnError` (nothing left running) on failure."""
        spec = self.spec
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            # Never through a link (the log or logs/tasks/ swapped for one): open_in_folder.
            try:
                log_fd = open_in_folder(spec.log_path, flags)
            except FileNotFoundError:  # logs/tasks/ is missing: create it, once
                spec.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                log_fd = open_in_folder(spec.log_path, flags)
        except UnsafePath as exc:
            raise SpawnError(f"cannot open the task log: {exc}", retry=False,
                             exit_code=126) from None
        except OSError as exc:
            raise SpawnError(f"cannot open the task log {spec.log_path}: "
                             f"{exc.strerror or exc}", retry=True, exit_code=126) from None
        try:
            if spec.header:
                _write_all(log_fd, spec.header.rstrip("\n").encode("utf-8", "replace") + b"\n")
            size = os.fstat(log_fd).st_size
            self._start_process(log_fd, max(0, spec.log_max_bytes - size))
        except BaseException:
            if self._reader is None:  # else the reader thread owns (and closes) log_fd
                os.close(log_fd)
            raise

    def _start_process(self, log_fd: int, room: int) -> None:
        spec = self.spec
        if not spec.cwd.is_dir():
            raise SpawnError(f"working directory {spec.cwd} does not exist", retry=False,
                             exit_code=127)
        argv, env = spec.argv, spec.env
        # env(1) would take an argv[0] with "=" for an assignment: such a command runs
        # without the scope (docs/coordination.md, cgroup_limits).
        if spec.scope is not None and "=" not in argv[0]:
            try:
                check_executable(argv[0], spec.cwd, env)
            except OSError as exc:
                raise SpawnError(f"cannot execute {argv[0]!r}: {exc.strerror}", retry=False,
                                 exit_code=127 if isinstance(exc, FileNotFoundError)
                                 else 126) from None
            argv, env = scope_command(spec.scope, argv, env)
            self.scope_unit = spec.scope.unit
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.proc = subprocess.Popen(
                argv, cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=out_w, stderr=out_w, start_new_session=True, close_fds=True,
                preexec_fn=limits_preexec(spec.limits))
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            os.close(out_r)
            raise SpawnError(f"cannot execute {spec.argv[0]!r}: {exc.strerror or exc}",
                             retry=False, exit_code=127 if isinstance(
                                 exc, FileNotFoundError) else 126) from None
        except OSError as exc:
            os.close(out_r)
            raise SpawnError(f"cannot start {spec.argv[0]!r}: {exc.strerror or exc}",
                             retry=True, exit_code=126) from None
        except BaseException:
            os.close(out_r)
            raise
        finally:
            os.close(out_w)
        self.pid = self.proc.pid
        self.started_mono = time.monotonic()
        # One thread per attempt: the output reader also polls a pidfd of the leader and
        # wakes the loop when it exits (the loop reaps it). Without pidfd_open (Linux < 5.3)
        # a second thread waits for the leader instead.
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        self._reader = threading.Thread(target=self._read_output, args=(out_r, log_fd, room),
                                        name=f"task-output-{spec.task_id}", daemon=True)
        self._reader.start()
        if self._pidfd is None:
            self._waiter = threading.Thread(target=self._wait_leader,
                                            name=f"task-wait-{spec.task_id}", daemon=True)
            self._waiter.start()

    # -- threads ---------------------------------------------------------------------------
    def _wait_leader(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self._wake()

    def _read_output(self, fd: int, log_fd: int, room: int) -> None:
        """Copy the pipe to the log until EOF (or :meth:`_abandon_reader`). Output past the
        cap is read and counted but dropped; a failing log write (disk full) stops logging,
        never reading, so the task cannot block on a full pipe."""
        cap = self.spec.log_max_bytes
        assert self._stop_r is not None
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(self._stop_r, select.POLLIN)
        pidfd = self._pidfd
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        last_byte = b"\n"
        eof = False
        try:
            while True:
                ready = dict(poller.poll())
                if self._stop_r in ready:
                    break
                if pidfd is not None and pidfd in ready:
                    poller.unregister(pidfd)
                    pidfd = None
                    self._wake()  # the leader exited; the loop reaps it
                    if eof:
                        break
                if eof or fd not in ready:
                    continue
                try:
                    data = os.read(fd, 65536)
                except InterruptedError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    eof = True
                    poller.unregister(fd)
                    self._output_done(fd, log_fd)
                    if pidfd is None:
                        break
                    continue  # the leader closed its output but lives on: watch it
                with self._lock:
                    self.output_bytes += len(data)
                    self.tail = (self.tail + data)[-TAIL_BYTES:]
                try:
                    if room > 0:
                        keep = data[:room]
                        _write_all(log_fd, keep)
                        room -= len(keep)
                        self.logged_bytes += len(keep)
                        last_byte = keep[-1:]
                        data = data[len(keep):]
                    if data and not self.truncated and self.log_error is None:
                        self.truncated = True
                        marker = TRUNCATION_MARKER.format(cap=cap).encode()
                        _write_all(log_fd, (b"" if last_byte == b"\n" else b"\n")
                                   + marker + b"\n")
                except OSError as exc:
                    self.log_error = f"{self.spec.log_path}: {exc.strerror or exc}"
                    room = 0
        finally:
            if not eof:
                self._output_done(fd, log_fd)
            if self._pidfd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._pidfd)

    def _output_done(self, fd: int, log_fd: int) -> None:
        os.close(fd)
        os.close(log_fd)
        self._reader_done.set()
        self._wake()

    # -- control ---------------------------------------------------------------------------
    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and not self.finished

    def terminate(self, reason: str) -> None:
        """SIGTERM to the whole group now, SIGKILL ``kill_grace_s`` later (see :meth:`poll`).
        The first reason sticks (a timeout stays a timeout if a cancel follows)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._term_sent_mono is not None or self.pid is None:
            return
        now = time.monotonic()
        self._term_sent_mono = now
        self._kill_at = now + max(0.0, self.spec.kill_grace_s)
        self._signal_all(signal.SIGTERM)
        if self.spec.kill_grace_s <= 0:
            self._sigkill(now)

    def _signal_all(self, sig: int) -> None:
        """``sig`` to the task's process group and, with ``sweep_descendants``, to every
        descendant of ours; with a scope, SIGKILL also goes to the scope's cgroup."""
        assert self.pid is not None
        signal_group(self.pid, sig)
        if self.spec.sweep_descendants:
            signal_descendants(sig, skip_pgid=self.pid)
        if sig == signal.SIGKILL and self.spec.scope is not None and not self._scope_killed:
            self._scope_killed = True
            problem = kill_scope(self.spec.scope)
            if problem is not None:  # the sweep above still ran; say why the cgroup did not
                log.error("cannot kill the scope %s: %s", self.spec.scope.unit, problem)

    def kill_now(self, reason: str) -> None:
        """Skip the grace: SIGKILL the group at once."""
        self.terminate(reason)
        self._sigkill(time.monotonic())

    def _sigkill(self, now: float) -> None:
        if self.pid is not None and not self.killed:
            self.killed = True
            self._killed_mono = now
            self._signal_all(signal.SIGKILL)

    def poll(self) -> bool:
        """Advance the stop sequence; True once the attempt is over: the leader was reaped,
        no group member is left (or one ignored SIGKILL for LINGER_AFTER_KILL_S) and the
        output pipe reached EOF (or was abandoned EOF_GRACE_S after the group ended)."""
        if self.finished:
            return True
        if self.proc is None or self.pid is None:
            return False
        now = time.monotonic()
        if self._kill_at is not None and now >= self._kill_at:
            self._sigkill(now)
        if self.proc.poll() is None:
            return False
        if self._leader_done_mono is None:
            self._leader_done_mono = now
            if self.ended_mono is None:
                self.ended_mono = now
        reap_group(self.pid)
        if self.spec.sweep_descendants:
            reap_orphans()  # killed descendants re-parented to us are zombies of ours
        if self._group_gone_mono is None:
            if self._leftovers():
                if self._term_sent_mono is None:
                    # The leader is gone but left processes behind: stop them too.
                    self._term_sent_mono = now
                    self._kill_at = now + max(0.0, self.spec.kill_grace_s)
                    self._signal_all(signal.SIGTERM)
                elif self.killed and self.spec.sweep_descendants:
                    # A descendant may have forked after the last sweep: sweep again.
                    signal_descendants(signal.SIGKILL)
                if self._killed_mono is not None and now - self._killed_mono \
                        > LINGER_AFTER_KILL_S:
                    self.lingering = True
                else:
                    return False
            self._group_gone_mono = now
        if not self._reader_done.is_set():
            if now - self._group_gone_mono < EOF_GRACE_S:
                return False
            self._abandon_reader()
        self._finish_threads()
        self.finished = True
        return True

    def _leftovers(self) -> bool:
        """After the leader was reaped: is any process of the attempt still alive?"""
        assert self.pid is not None
        if group_alive(self.pid):
            return True
        return self.spec.sweep_descendants and bool(live_descendants())

    def next_poll_in(self) -> float | None:
        """How soon :meth:`poll` needs calling without a wake-up (None: only on wake-up)."""
        if self.finished:
            return None
        now = time.monotonic()
        waits = []
        if self._kill_at is not None and not self.killed:
            waits.append(max(0.0, self._kill_at - now))
        if self._leader_done_mono is not None:
            if self._group_gone_mono is None:
                waits.append(0.02)  # no event tells us a group emptied: re-check briskly
            else:
                waits.append(max(0.0, self._group_gone_mono + EOF_GRACE_S - now))
        return min(waits) if waits else None

    def _abandon_reader(self) -> None:
        if self._stop_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
        if self._reader is not None:
            self._reader.join(timeout=2)

    def _finish_threads(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=2)
        if self._waiter is not None:
            self._waiter.join(timeout=2)
        for fd in (self._stop_r, self._stop_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._stop_r = self._stop_w = None

    def duration_s(self) -> float:
        end = self.ended_mono if self.ended_mono is not None else time.monotonic()
        return max(0.0, end - self.started_mono) if self.started_mono else 0.0

    @property
    def scope_refused(self) -> bool:
        """The manager refused the attempt's scope, so systemd-run exited (status 1) without
        running the command: e.g. a scope bound to a worker unit whose stop job is already
        queued is a "destructive transaction". Not the task's failure."""
        with self._lock:
            tail = self.tail
        return self.scope_unit is not None and self.returncode == 1 \
            and tail.lstrip().startswith(SCOPE_REFUSED) and tail.count(b"\n") <= 1

    def tail_line(self, limit: int = 200) -> str:
        """The last non-empty output line (for last_error), at most ``limit`` characters."""
        with self._lock:
            tail = self.tail
        for line in reversed(tail.decode("utf-8", "replace").splitlines()):
            line = line.strip()
            if line and not line.startswith("[harness:"):
                return line[-limit:]
        return ""

    def append_log_line(self, text: str) -> None:
        """A harness line (attempt footer) after the task's output."""
        with contextlib.suppress(OSError, UnsafePath):
            fd = open_in_folder(self.spec.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                _write_all(fd, text.rstrip("\n").encode("utf-8", "replace") + b"\n")
            finally:
                os.close(fd)

    def close(self) -> None:
        """Make sure nothing of the attempt is left (used when the worker aborts)."""
        if self.finished or self.proc is None:
            return
        self.kill_now(self.stop_reason or "worker exiting")
        deadline = time.monotonic() + LINGER_AFTER_KILL_S + EOF_GRACE_S + 1
        while not self.poll() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.finished:
            self._abandon_reader()
            self._finish_threads()
            self.finished = True


def describe_exit(returncode: int | None) -> tuple[int | None, str]:
    """(exit_code, phrase): a negative returncode (killed by signal N) becomes 128+N."""
    if returncode is None:
        return None, "did not exit"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return 128 - returncode, f"killed by {name}"
    return returncode, f"exit code {returncode}"


def header_line(task: Mapping[str, Any], worker_id: str, argv: list[str], now: float) -> str:
    return (f"=== harness: {task['task_id']} attempt {task.get('attempts')}/"
            f"{task.get('max_attempts')} on {worker_id} at {clock.iso(now)}: "
            f"{subprocess.list2cmdline(argv)[:500]} ===")
