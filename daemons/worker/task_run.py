"""Run one task attempt as its own process group, capture its output, stop it reliably.

A :class:`TaskRun` is driven by its worker's loop and never blocks it:

- The task is started as the leader of a new process group, in a new session too when the
  worker has a controlling terminal (so the task has none:
  :func:`~daemons.process_groups.new_session_needed`), stdin from /dev/null, stdout and
  stderr into one pipe, the environment built from an allowlist only, and the worker
  type's resource limits applied in the child before exec (both in
  :mod:`daemons.worker.process_setup`).
- No thread: the worker's loop waits on the output pipe and a pidfd of the leader
  (:meth:`TaskRun.wait_fds`, handled by :meth:`TaskRun.on_ready` inside the wait) next to
  its other descriptors. :meth:`TaskRun.pump` copies what the pipe holds into
  ``logs/tasks/<task_id>.log`` (append, one header line per attempt) until the file reaches
  ``task_log_max_bytes``; the rest of the output is read and counted but dropped, and one
  marker line ``[harness: output truncated at N bytes]`` is appended. Output alone never
  costs a whole loop step; the leader's exit and EOF do. Without pidfd_open (Linux < 5.3)
  the loop re-checks the leader every ``NO_PIDFD_POLL_S``. No preexec_fn unless the type
  sets limits: subprocess then spawns with vfork, the cheap path.
- :meth:`TaskRun.terminate` sends SIGTERM to the whole group and SIGKILL ``kill_grace_s``
  later. With ``RunSpec.sweep_descendants`` (the worker, a child subreaper that runs one
  task at a time) both also go to every descendant of the worker, so children that left
  the group (setsid, setpgid, a double-fork daemon) go too, and the SIGKILL sweep repeats
  until none is left; with a scope, SIGKILL also goes to the scope's cgroup. When the
  leader exits on its own, whatever is left (a background grandchild, a daemon) is stopped
  the same way, so no process of a task outlives it (docs/security.md).
  Zombies do not count as survivors: liveness is judged from ``/proc`` state.
- With a :class:`~daemons.scopes.Scope` (the worker runs under a systemd manager that
  accepts transient scopes from it), the argv is prefixed by
  :func:`~daemons.scopes.scope_command` and the process runs in a transient scope, same
  pid, same process group, still our child, so everything above is unchanged.

The process-group helpers live in :mod:`daemons.process_groups`, the scopes in
:mod:`daemons.scopes`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordination import clock
from coordination.errors import UnsafePath
from coordination.store import open_folder, open_in_folder, unsafe_path

from ..process_groups import (
    group_alive,
    live_descendants,
    new_session_needed,
    reap_group,
    reap_orphans,
    signal_descendants,
    signal_group,
)
from .process_setup import check_executable, limits_preexec
from .scopes import SCOPE_REFUSED, Scope, kill_scope, scope_command

log = logging.getLogger("harness.task")  # diagnostics (daemons/diagnostics.py)
TRUNCATION_MARKER = "[harness: output truncated at {cap} bytes]"
LINGER_AFTER_KILL_S = 2.0  # after SIGKILL, stop waiting for a group that will not go away
EOF_GRACE_S = 1.0  # after the group is gone, wait this long for the pipe's EOF
NO_PIDFD_POLL_S = 0.05  # without pidfd_open, how often the loop re-checks the leader
PUMP_READS = 16  # reads of 64 KiB per pump: a flood of output cannot starve the loop
TAIL_BYTES = 512


class SpawnError(Exception):
    """The task could not be started; ``retry`` says whether another attempt may help."""

    def __init__(self, message: str, *, retry: bool, exit_code: int) -> None:
        super().__init__(message)
        self.retry = retry
        self.exit_code = exit_code


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close_quietly(fd: int | None) -> None:
    """Close ``fd`` unless it is None; an error closing it changes nothing for the task."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


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

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
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
        self._out_fd: int | None = None  # the output pipe, until EOF or abandoned
        self._log_fd: int | None = None
        self._room = 0  # bytes the log may still take
        self._last_byte = b"\n"
        self._pidfd: int | None = None  # readable once the leader exited
        self._leader_exited = False  # the pidfd fired (reaping is poll's)

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the task; raises :class:`SpawnError` (nothing left running) on failure.

        The log is opened (created) just *after* the spawn, so the task starts while the
        file system does that (a new file costs 0.1-1 ms on a busy ext4): output waits in
        the pipe meanwhile and the header still comes first. Whether the log may be used is decided
        before the spawn: logs/tasks/ and the log itself must not be links (a link planted
        in between still fails the O_NOFOLLOW open, which then stops the task at once)."""
        spec = self.spec
        try:
            try:
                folder_fd = open_folder(spec.log_path.parent)
            except FileNotFoundError:  # logs/tasks/ is missing: create it, once
                spec.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                folder_fd = open_folder(spec.log_path.parent)
        except (OSError, UnsafePath) as exc:
            raise self._log_refused(exc) from None
        try:
            self._refuse_linked_log(folder_fd)
            self._start_process()
            try:
                self._open_log(folder_fd)
            except SpawnError:
                self.close()  # the task started a moment ago: stop it, nothing left running
                raise
        finally:
            os.close(folder_fd)

    def _log_refused(self, exc: OSError | UnsafePath) -> SpawnError:
        """The spawn failure for a log that cannot be opened: a link is final, anything
        else (disk full, permissions) may pass."""
        if isinstance(exc, UnsafePath):
            return SpawnError(f"cannot open the task log: {exc}", retry=False, exit_code=126)
        return SpawnError(f"cannot open the task log {self.spec.log_path}: "
                          f"{getattr(exc, 'strerror', None) or exc}", retry=True,
                          exit_code=126)

    def _refuse_linked_log(self, folder_fd: int) -> None:
        path = self.spec.log_path
        try:
            st = os.lstat(path.name, dir_fd=folder_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._log_refused(exc) from None
        if not stat.S_ISREG(st.st_mode):
            raise self._log_refused(unsafe_path(path, "file"))

    def _open_log(self, folder_fd: int) -> None:
        """Open (create) the log, write the attempt's header; the pipe is copied from now."""
        spec = self.spec
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            log_fd = open_in_folder(spec.log_path, flags, folder_fd)
        except (OSError, UnsafePath) as exc:
            raise self._log_refused(exc) from None
        try:
            if spec.header:
                _write_all(log_fd, spec.header.rstrip("\n").encode("utf-8", "replace") + b"\n")
            size = os.fstat(log_fd).st_size
        except OSError as exc:
            self.log_error = f"{spec.log_path}: {exc.strerror or exc}"
            size = spec.log_max_bytes
        self._log_fd, self._room = log_fd, max(0, spec.log_max_bytes - size)

    def _start_process(self) -> None:
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
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            session = new_session_needed()
            self.proc = subprocess.Popen(
                argv, cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=out_w, stderr=out_w, close_fds=True, start_new_session=session,
                process_group=None if session else 0,
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
        os.set_blocking(out_r, False)
        self._out_fd = out_r
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None  # Linux < 5.3: next_poll_in re-checks the leader

    # -- waiting ---------------------------------------------------------------------------
    def wait_fds(self) -> tuple[int, ...]:
        """The descriptors the loop waits on for this attempt: the output pipe until EOF,
        the pidfd until the leader exited."""
        fds = []
        if self._out_fd is not None:
            fds.append(self._out_fd)
        if self._pidfd is not None and not self._leader_exited \
                and self._leader_done_mono is None:  # reaped: it would stay readable
            fds.append(self._pidfd)
        return tuple(fds)

    def on_ready(self, fd: int) -> bool:
        """``fd`` (one of :meth:`wait_fds`) is readable; True when the loop should step:
        the leader exited or the output reached EOF (mere output is copied here)."""
        if fd == self._pidfd:
            self._leader_exited = True
            return True
        if fd == self._out_fd:
            return self.pump()
        return True

    def pump(self) -> bool:
        """Copy what the pipe holds to the log without blocking; True at EOF. Output past
        the cap is read and counted but dropped; a failing log write (disk full) stops
        logging, never reading, so the task cannot block on a full pipe."""
        fd = self._out_fd
        if fd is None:
            return True
        for _ in range(PUMP_READS):
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                data = b""
            if not data:
                self._output_done()
                return True
            self._keep(data)
        return False

    def _keep(self, data: bytes) -> None:
        self.output_bytes += len(data)
        self.tail = (self.tail + data)[-TAIL_BYTES:]
        log_fd = self._log_fd
        if log_fd is None:
            return
        try:
            if self._room > 0:
                keep = data[:self._room]
                _write_all(log_fd, keep)
                self._room -= len(keep)
                self.logged_bytes += len(keep)
                self._last_byte = keep[-1:]
                data = data[len(keep):]
            if data and not self.truncated and self.log_error is None:
                self.truncated = True
                marker = TRUNCATION_MARKER.format(cap=self.spec.log_max_bytes).encode()
                _write_all(log_fd, (b"" if self._last_byte == b"\n" else b"\n")
                           + marker + b"\n")
        except OSError as exc:
            self.log_error = f"{self.spec.log_path}: {exc.strerror or exc}"
            self._room = 0

    def _output_done(self) -> None:
        """EOF (or abandoned): close the pipe. The log stays open for the attempt's footer
        (:meth:`append_log_line`), which closes it."""
        fd, self._out_fd = self._out_fd, None
        _close_quietly(fd)

    def _close_log(self) -> None:
        fd, self._log_fd = self._log_fd, None
        _close_quietly(fd)

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
        self.pump()
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
        if self._out_fd is not None:
            if now - self._group_gone_mono < EOF_GRACE_S:
                return False
            self._output_done()  # a descendant we cannot see keeps the pipe open
        self._release()
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
        if self._pidfd is None and self._leader_done_mono is None:
            waits.append(NO_PIDFD_POLL_S)
        if self._kill_at is not None and not self.killed:
            waits.append(max(0.0, self._kill_at - now))
        if self._leader_done_mono is not None:
            if self._group_gone_mono is None:
                waits.append(0.02)  # no event tells us a group emptied: re-check briskly
            else:
                waits.append(max(0.0, self._group_gone_mono + EOF_GRACE_S - now))
        return min(waits) if waits else None

    def _release(self) -> None:
        self._output_done()
        pidfd, self._pidfd = self._pidfd, None
        _close_quietly(pidfd)

    def duration_s(self) -> float:
        end = self.ended_mono if self.ended_mono is not None else time.monotonic()
        return max(0.0, end - self.started_mono) if self.started_mono else 0.0

    @property
    def scope_refused(self) -> bool:
        """The manager refused the attempt's scope, so systemd-run exited (status 1) without
        running the command: e.g. a scope bound to a worker unit whose stop job is already
        queued is a "destructive transaction". Not the task's failure."""
        tail = self.tail
        return self.scope_unit is not None and self.returncode == 1 \
            and tail.lstrip().startswith(SCOPE_REFUSED) and tail.count(b"\n") <= 1

    def tail_line(self, limit: int = 200) -> str:
        """The last non-empty output line (for last_error), at most ``limit`` characters."""
        tail = self.tail
        for line in reversed(tail.decode("utf-8", "replace").splitlines()):
            line = line.strip()
            if line and not line.startswith("[harness:"):
                return line[-limit:]
        return ""

    def append_log_line(self, text: str) -> None:
        """A harness line (attempt footer) after the task's output, through the log still
        open from the start (else opened now); the log is closed after it."""
        line = text.rstrip("\n").encode("utf-8", "replace") + b"\n"
        if self._log_fd is not None:
            with contextlib.suppress(OSError):
                _write_all(self._log_fd, line)
            self._close_log()
            return
        with contextlib.suppress(OSError, UnsafePath):
            fd = open_in_folder(self.spec.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                _write_all(fd, line)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Make sure nothing of the attempt is left (used when the worker aborts)."""
        try:
            self._stop_all()
        finally:
            self._close_log()

    def _stop_all(self) -> None:
        if self.finished or self.proc is None:
            return
        self.kill_now(self.stop_reason or "worker exiting")
        deadline = time.monotonic() + LINGER_AFTER_KILL_S + EOF_GRACE_S + 1
        while not self.poll() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.finished:
            self._release()
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
