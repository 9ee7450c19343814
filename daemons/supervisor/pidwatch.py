"""Waking the supervisor loop the instant a worker process dies (a pidfd per process).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable, Iterable

from coordination.specs import process_start_time


class PidWatcher:
    """Wakes the loop the instant a watched process exits.

    inotify sees file changes, not deaths, so without this a SIGKILLed worker would wait for
    the next tick. One thread polls a pidfd (``os.pidfd_open``, Linux >= 5.3) per process;
    it owns every pidfd (opens, polls, closes), the main thread only publishes the wanted
    set. A pid whose start time differs from the one given is not watched (reused: the
    pass proves that death itself). Without pidfd support it does nothing and the tick
    bounds the reaction time.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.available = hasattr(os, "pidfd_open")
        self.fired = 0
        self._wanted: dict[int, float | None] = {}
        self._lock = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._r = self._w = -1

    def start(self) -> PidWatcher:
        if os.environ.get("HARNESS_SUPERVISOR_NO_PIDFD"):  # diagnostics: tick-only reaction
            self.available = False
        if not self.available:
            return self
        try:
            probe = os.pidfd_open(os.getpid())
        except OSError:
            self.available = False
            return self
        os.close(probe)
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="harness-pid-watcher",
                                        daemon=True)
        self._thread.start()
        return self

    def watch(self, procs: Iterable[tuple[int, float | None]]) -> None:
        wanted = dict(procs)
        with self._lock:
            if wanted == self._wanted:
                return
            self._wanted = wanted
        self._poke()

    def _poke(self) -> None:
        if self._w >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._w, b"x")

    def stop(self) -> None:
        self._stop = True
        self._poke()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1

    def _run(self) -> None:
        fds: dict[int, int] = {}  # pid -> pidfd
        done: set[int] = set()  # pids that already fired (a zombie's pidfd stays readable)
        try:
            while not self._stop:
                with self._lock:
                    wanted = dict(self._wanted)
                for pid in [p for p in fds if p not in wanted]:
                    os.close(fds.pop(pid))
                done &= set(wanted)
                gone = False  # died (or was reused) between the pass and now: wake anyway
                for pid, start in wanted.items():
                    if pid in fds or pid in done:
                        continue
                    try:
                        fd = os.pidfd_open(pid)
                    except OSError:
                        done.add(pid)
                        gone = True
                        continue
                    actual = process_start_time(pid)
                    if start is not None and (actual is None or abs(actual - start) > 0.05):
                        os.close(fd)
                        done.add(pid)
                        gone = True
                        continue
                    fds[pid] = fd
                if gone:
                    self.fired += 1
                    self.wake()
                poller = select.poll()
                poller.register(self._r, select.POLLIN)
                by_fd = {fd: pid for pid, fd in fds.items()}
                for fd in by_fd:
                    poller.register(fd, select.POLLIN)
                events = poller.poll()
                woke = False
                for fd, _ in events:
                    if fd == self._r:
                        with contextlib.suppress(BlockingIOError, OSError):
                            os.read(self._r, 4096)
                        continue
                    pid = by_fd[fd]
                    os.close(fds.pop(pid))
                    done.add(pid)
                    woke = True
                if woke:
                    self.fired += 1
                    self.wake()
        finally:
            for fd in fds.values():
                os.close(fd)
