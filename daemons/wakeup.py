"""Event-driven wake-ups for daemon loops: one selector in the loop's own thread.

A :class:`Wakeup` is a set of descriptors the loop waits on in one select(2) (epoll):

- the queue may have changed: the queue port's change feed (``QueueBackend.changes``:
  inotify on the file backend's journal and inbox, LISTEN/NOTIFY elsewhere), see
  :meth:`Wakeup.follow_queue`;
- ``control.json`` or a file in ``coordination/config/`` is published (inotify, IN_CREATE /
  IN_MOVED_TO only: every coordination file is published by rename); everything else
  (event log appends, temp files, lock files) is not even delivered, so a daemon's own
  writes do not keep it awake;
- a signal arrives: :func:`signal.set_wakeup_fd` writes to the wake-up pipe from C; the
  Python-level handlers then only set flags, and never touch a lock the interrupted main
  thread may hold;
- anyone calls :meth:`Wakeup.set`, from any thread (a byte into the same pipe);
- a descriptor of the loop's own is ready (:meth:`Wakeup.watch_io`: a running task's
  output pipe and pidfd), whose handler says whether that is worth a whole step.

The pipe is the old "event": :meth:`set` makes it readable until :meth:`clear`. The loop
clears *before* a step and waits *after*, so a change that lands during a step is never
lost (inotify and the feeds keep what the kernel queued meanwhile), and an idle loop
sleeps in the kernel: no polling, and no thread of ours (each would take the GIL for
every event, on every worker).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from coordination.inotify import APPEARS, Q_OVERFLOW, INotify, pending_events
from coordination.paths import Home
from coordination.queue.contract import ChangeFeed, QueueBackend

WATCHED_NAMES = frozenset({"control.json"})

_POKE, _HOME, _QUEUE, _IO = "poke", "home", "queue", "io"


class Wakeup:
    """Wait for the first of: :meth:`set`, a signal, a watched publish in the home, a queue
    change (while wanted), a ready descriptor of :meth:`watch_io`, or the timeout."""

    def __init__(self, home: Home | None = None) -> None:
        self.home = home
        self.fs_wakeups = 0  # inotify-caused wake-ups (for diagnostics and tests)
        self.queue_changes = 0  # queue-caused wake-ups (diagnostics and tests)
        self.queue_interest = True  # see want_queue
        self._selector = selectors.DefaultSelector()
        self._poke_r, self._poke_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._poke_r, selectors.EVENT_READ, _POKE)
        self._inotify: INotify | None = None
        self._watched: dict[int, Callable[[str], bool]] = {}  # wd -> is this name ours?
        self._feeds: list[ChangeFeed] = []
        self._queue_stops: list[Callable[[], None]] = []
        self._io_owner: object | None = None
        self._io_fds: tuple[int, ...] = ()
        self._io_ready: Callable[[int], bool] | None = None
        self._old_wakeup_fd: int | None = None
        self._signals = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, *, signals: bool = True) -> Wakeup:
        if self.home is not None:
            self._watch_home(self.home)
        if signals and threading.current_thread() is threading.main_thread():
            self._old_wakeup_fd = signal.set_wakeup_fd(self._poke_w, warn_on_full_buffer=False)
            self._signals = True
        return self

    def _watch_home(self, home: Home) -> None:
        inotify = INotify(nonblocking=True)
        try:
            for folder, relevant in (
                    (home.coordination, WATCHED_NAMES.__contains__),
                    (home.config_dir, lambda name: name.endswith(".json"))):
                if folder.is_dir():
                    self._watched[inotify.add_watch(folder, APPEARS)] = relevant
        except BaseException:
            inotify.close()
            raise
        self._inotify = inotify
        self._selector.register(inotify.fileno(), selectors.EVENT_READ, _HOME)

    def follow_queue(self, queue: QueueBackend) -> None:
        """Wake on every change of ``queue`` (a QueueBackend, through its change feed)
        until :meth:`stop`, while :attr:`queue_interest` is true (see :meth:`want_queue`)."""
        feed = queue.changes()
        self._feeds.append(feed)
        if self.queue_interest:
            self._selector.register(feed.fileno(), selectors.EVENT_READ, (_QUEUE, feed))

    def want_queue(self, wanted: bool) -> None:
        """Say whether queue changes should wake the loop. A busy worker cannot claim, so
        the commits of the other workers need not wake it (each wake-up is a whole step):
        its feeds leave the selector, and the kernel keeps (and coalesces) what comes
        meanwhile. Turning interest back on also sets the wake-up once, so a change that
        came while it was off is looked at rather than lost."""
        if wanted == self.queue_interest:
            return
        self.queue_interest = wanted
        for feed in self._feeds:
            if wanted:
                self._selector.register(feed.fileno(), selectors.EVENT_READ, (_QUEUE, feed))
            else:
                self._selector.unregister(feed.fileno())
        if wanted:
            self.set()

    def keep_view(self, queue: QueueBackend) -> None:
        """Keep ``queue``'s jq view fresh (QueueBackend.keep_view_fresh) until :meth:`stop`."""
        self._queue_stops.append(queue.keep_view_fresh())

    def watch_io(self, owner: object | None, fds: Iterable[int],
                 on_ready: Callable[[int], bool] | None = None) -> None:
        """Also wait on ``fds`` (readable), for ``owner`` (e.g. a running task), replacing
        what was watched before; ``on_ready(fd)`` runs in :meth:`wait` and returns whether
        the loop should wake (a chatty task's output is copied without a whole step).
        ``watch_io(None, ())`` stops. The owner keys the set because a closed descriptor's
        number may come back for another owner's descriptor."""
        fds = tuple(fds)
        if owner is self._io_owner and fds == self._io_fds:
            self._io_ready = on_ready
            return
        for fd in self._io_fds:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fd)
        self._io_owner, self._io_fds, self._io_ready = owner, (), on_ready
        registered = []
        for fd in fds:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.register(fd, selectors.EVENT_READ, (_IO, fd))
                registered.append(fd)
        self._io_fds = tuple(registered)

    def stop(self) -> None:
        """Stop following everything and release every descriptor (idempotent); the
        wake-up cannot be used afterwards."""
        if self._poke_r < 0:
            return
        for stop_queue in self._queue_stops:
            stop_queue()
        self._queue_stops.clear()
        self.watch_io(None, ())
        for feed in self._feeds:
            if self.queue_interest:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(feed.fileno())
            feed.close()
        self._feeds.clear()
        if self._inotify is not None:
            self._selector.unregister(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
        if self._signals:
            self._signals = False
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._old_wakeup_fd if self._old_wakeup_fd is not None
                                     else -1)
        self._selector.close()
        os.close(self._poke_r)
        os.close(self._poke_w)
        self._poke_r = self._poke_w = -1

    def __enter__(self) -> Wakeup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the wake-up ---------------------------------------------------------------------
    def set(self) -> None:
        """Wake the loop (any thread): the next :meth:`wait` returns at once until
        :meth:`clear`."""
        fd = self._poke_w
        if fd >= 0:  # else stopped: never write to a number that may be reused
            with contextlib.suppress(BlockingIOError, OSError):  # full: readable already
                os.write(fd, b"x")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._poke_r, 4096):
                pass

    def wait(self, timeout: float | None) -> bool:
        """Block until woken or ``timeout`` seconds pass (None: no limit); True when woken.
        Events that do not concern the loop (a name nobody watches, a task's output) are
        consumed here and the wait goes on."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = self._selector.select(left)
            woke = False
            for key, _ in ready:
                woke = self._handle(key.data) or woke
            if woke:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _handle(self, what: Any) -> bool:
        if what == _POKE:
            return True
        if what == _HOME:
            if self._home_changed():
                self.fs_wakeups += 1
                return True
            return False
        kind, item = what
        if kind == _QUEUE:
            if item.drain():
                self.queue_changes += 1
                return True
            return False
        on_ready = self._io_ready
        return True if on_ready is None else bool(on_ready(item))

    def _home_changed(self) -> bool:
        assert self._inotify is not None
        changed = False
        for event in pending_events(self._inotify):
            if event.mask & Q_OVERFLOW:
                changed = True
                continue
            relevant = self._watched.get(event.wd)
            name = event.name
            if relevant is not None and name and not name.startswith(".") and relevant(name):
                changed = True
        return changed


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
