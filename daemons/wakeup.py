"""Event-driven wake-ups for daemon loops: inotify (watchdog) + signals + in-process pokes.

A :class:`Wakeup` owns one :class:`threading.Event`. It is set when

- the queue may have changed: the queue port's ``on_change`` (inotify on the file
  backend's journal and inbox, LISTEN/NOTIFY elsewhere) feeds the same event, see
  :meth:`Wakeup.follow_queue`;
- ``control.json`` or a file in ``coordination/config/`` is published; everything else
  (event log appends, temp files, lock files) is ignored, so a daemon's own writes do not
  keep it awake;
- a signal arrives (:func:`signal.set_wakeup_fd` writes to a pipe from C, a small thread
  turns that into ``event.set()``; Python-level handlers then only set flags, and never
  touch a lock the interrupted main thread may hold);
- anyone calls :meth:`Wakeup.set` (e.g. a task's output reader at EOF).

The loop clears the event *before* a step and waits on it *after*, so a change that lands
during a step is never lost, and an idle loop sleeps in the kernel: no polling.
Only IN_CREATE / IN_MOVED_* are watched (every coordination file is published by rename).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coordination.paths import Home

WATCHED_NAMES = frozenset({"control.json"})


def _is_relevant(home: Home, path: str) -> bool:
    if not path:
        return False
    folder, name = os.path.split(path)
    if not name or name.startswith("."):
        return False
    if folder == str(home.coordination):
        return name in WATCHED_NAMES
    if folder == str(home.config_dir):
        return name.endswith(".json")
    return False


def _no_move_pairing_delay(emitter: Any) -> bool:
    """Turn off watchdog's move pairing delay for one emitter; True when it was found.

    watchdog holds each IN_MOVED_FROM up to 0.5 s to pair it with its IN_MOVED_TO, and its
    consumer thread *sleeps* on such a head-of-queue event, so every event queued behind it
    waits too. Publish-by-rename makes a MOVED_FROM of every write, so under load a wake-up
    sometimes came 500 ms late (seen as p99 ~500 ms dispatch latency). We only need to know
    that a watched name appeared, which the unpaired MOVED_TO still reports (as a creation),
    so the delay buys us nothing. The queue is internal to watchdog (an ``InotifyWatchGroup``
    grouper in 6+, an ``InotifyBuffer`` before): look for it, and leave watchdog as it is
    (correct, occasionally slower) when a version keeps it elsewhere."""
    inotify = getattr(emitter, "_inotify", None)
    for holder in (getattr(inotify, "_move_event_grouper", None), inotify):
        queue = getattr(holder, "_queue", None)
        if queue is not None and isinstance(getattr(queue, "delay", None), int | float):
            queue.delay = 0
            return True
    return False


class Wakeup:
    """A wake-up event fed by inotify on the home, by signals and by :meth:`set`."""

    def __init__(self, home: Home | None = None) -> None:
        self.home = home
        self.event = threading.Event()
        self.fs_wakeups = 0  # inotify-caused wake-ups (for diagnostics and tests)
        self._observer: Any = None
        self._sig_r: int | None = None
        self._sig_w: int | None = None
        self._sig_thread: threading.Thread | None = None
        self._old_wakeup_fd: int | None = None
        self.prompt_moves = False  # watchdog's 0.5 s move-pairing delay is disabled
        self._queue_stops: list[Any] = []
        self.queue_interest = True  # see want_queue
        self.queue_changes = 0  # queue-caused wake-ups (diagnostics and tests)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, *, signals: bool = True) -> Wakeup:
        if self.home is not None:
            self._start_observer(self.home)
        if signals and threading.current_thread() is threading.main_thread():
            self._start_signal_pipe()
        return self

    def _start_observer(self, home: Home) -> None:
        from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        wakeup = self

        class _Handler(FileSystemEventHandler):
            def dispatch(self, event: Any) -> None:
                for path in (getattr(event, "dest_path", ""), event.src_path):
                    if isinstance(path, bytes):
                        path = os.fsdecode(path)
                    if _is_relevant(home, path):
                        wakeup.fs_wakeups += 1
                        wakeup.event.set()
                        return

        # The timeout only bounds how often watchdog threads re-check their stop flag; stop()
        # wakes them at once, so a long one saves idle wake-ups and costs nothing.
        observer = Observer(timeout=30)
        handler = _Handler()
        for folder in (home.coordination, home.config_dir):
            if Path(folder).is_dir():
                observer.schedule(handler, str(folder), recursive=False,
                                  event_filter=[FileMovedEvent, FileCreatedEvent])
        observer.daemon = True
        observer.start()
        self._observer = observer
        self.prompt_moves = all(_no_move_pairing_delay(e) for e in observer.emitters)

    def follow_queue(self, queue: Any) -> None:
        """Wake on every change of ``queue`` (a QueueBackend) until :meth:`stop`, while
        :attr:`queue_interest` is true (see there)."""
        def changed() -> None:
            if self.queue_interest:
                self.queue_changes += 1
                self.event.set()
        self._queue_stops.append(queue.on_change(changed))

    def want_queue(self, wanted: bool) -> None:
        """Say whether queue changes should wake the loop. A busy worker cannot claim, so
        the commits of the other workers need not wake it (each wake-up is a whole step).
        Turning interest back on sets the event once: a change that came while it was off
        is then looked at rather than lost."""
        if wanted and not self.queue_interest:
            self.event.set()
        self.queue_interest = wanted

    def keep_view(self, queue: Any) -> None:
        """Keep ``queue``'s jq view fresh (QueueBackend.keep_view_fresh) until :meth:`stop`."""
        self._queue_stops.append(queue.keep_view_fresh())

    def _start_signal_pipe(self) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(w, False)
        self._sig_r, self._sig_w = r, w
        self._old_wakeup_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        thread = threading.Thread(target=self._signal_reader, args=(r,),
                                  name="harness-signal-wakeup", daemon=True)
        thread.start()
        self._sig_thread = thread

    def _signal_reader(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 256)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return
            self.event.set()

    def stop(self) -> None:
        for stop_queue in self._queue_stops:
            stop_queue()
        self._queue_stops.clear()
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
        if self._sig_w is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._old_wakeup_fd if self._old_wakeup_fd is not None
                                     else -1)
            os.close(self._sig_w)  # EOF ends the reader thread
            self._sig_w = None
            if self._sig_thread is not None:
                self._sig_thread.join(timeout=5)
                self._sig_thread = None
            if self._sig_r is not None:
                os.close(self._sig_r)
                self._sig_r = None

    def __enter__(self) -> Wakeup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the event -----------------------------------------------------------------------
    def set(self) -> None:
        self.event.set()

    def clear(self) -> None:
        self.event.clear()

    def wait(self, timeout: float | None) -> bool:
        """Block until set or ``timeout`` seconds pass; True when woken."""
        if timeout is not None and timeout <= 0:
            return self.event.is_set()
        return self.event.wait(timeout)


# ---------------------------------------------------------------------------- for CLI loops
#: watchdog event types that mean "something changed" for a reader following files.
CHANGE_EVENTS = frozenset({"created", "deleted", "modified", "moved", "closed"})


@contextlib.contextmanager
def watch_changes(path: str, wake_fd: int) -> Iterator[bool]:
    """Write a byte to ``wake_fd`` (non-blocking) on every change under ``path``, lock
    files excepted (appends included, unlike :class:`Wakeup`); yields whether the inotify
    observer runs (False: the caller's timer is the only wake-up)."""
    try:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        yield False
        return

    class Wake(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type not in CHANGE_EVENTS:
                return
            src = os.fsdecode(event.src_path)
            if "/locks/" in src or src.endswith(".lock"):
                return
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(wake_fd, b"x")

    observer = Observer()
    observer.daemon = True
    try:
        observer.schedule(Wake(), path, recursive=True)
        observer.start()
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        observer.stop()
        observer.join(5)


@contextlib.contextmanager
def stop_signals(wake_fd: int, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM,
                                                            signal.SIGHUP)) -> Iterator[list[int]]:
    """While inside: ``signals`` only append their number to the yielded list (the loop
    stops at a clean point), and ``signal.set_wakeup_fd(wake_fd)`` makes the C-level
    handler write to ``wake_fd`` whichever thread the kernel picked, so a main thread
    blocked in select() on the read end wakes up (a Python handler alone would run only
    when the main thread next wakes). ``wake_fd`` must be non-blocking. Main thread only.
    Previous handlers and wake-up fd are restored on exit."""
    received: list[int] = []

    def record(signum: int, frame: Any) -> None:
        received.append(signum)

    old_fd = signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
    old = {sig: signal.signal(sig, record) for sig in signals}
    try:
        yield received
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_fd)
