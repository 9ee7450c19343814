"""Process groups and descendants: liveness, signals, reaping, subreaper, parent death.

Shared by the worker (:mod:`daemons.worker.task_run` stops an attempt's whole group and, as a
child subreaper, every descendant), the supervisor (it reaps the orphans it inherits) and
``harness up`` (its children die with it). Liveness is judged from ``/proc`` state, so a
zombie never counts as a survivor. Nothing here touches a coordination file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Callable, Iterable
from typing import Any


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


@functools.cache
def new_session_needed() -> bool:
    """Whether a task must start a new session: only to leave the worker's controlling
    terminal (then a task cannot read it or get its signals), when there is one (a worker
    run by hand). Under systemd, or started detached, there is none, and a new process
    group is all a task needs: setsid(2) also creates a scheduler autogroup
    (``kernel.sched_autogroup_enabled``), which made each spawn 1.2 ms slower than
    setpgid(2) on the reference machine."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # ENXIO: no controlling terminal
    os.close(fd)
    return True


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
