"""Wake-ups of the file backend: inotify, read by whoever waits, with no thread of ours.

What means "the queue may have changed": a write to ``task-queue.journal`` (every commit
is one; IN_MODIFY of that inode), a request published in ``inbox/`` (IN_MOVED_TO /
IN_CREATE of a ``*.json``), and ``task-queue.json`` replaced (a hand edit; our own
snapshots wake a watcher at most twice a second under load). Temp files, lock files and
every other file are ignored, so appends to the event log and the history file wake
nobody.

Why inotify_simple and not watchdog here: the kernel's masks must be exactly these.
watchdog (7.x) watches a *file* through its folder, so a watch of the journal for
IN_MODIFY delivered every append to the event log and the history file beside it, several
per task, and its observer, emitter and dispatcher threads each took the GIL for every one
of them, in every process that follows the queue (about a millisecond per task on two
cores). :class:`QueueChanges` is one descriptor a loop can select on next to its other
descriptors; :func:`watch_queue` runs one small thread around it for callers that want a
callback.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
from collections.abc import Callable
from typing import Any

from ...inotify import APPEARS, DONT_FOLLOW, MODIFY, Q_OVERFLOW, INotify, pending_events
from ...paths import Home
from ..contract import ChangeFeed


class QueueChanges:
    """A change feed of the file backend: :meth:`fileno` becomes readable when the queue
    may have changed, :meth:`drain` consumes what the kernel queued and says whether any
    of it was a queue change. Not thread-safe: one reader.

    The journal is watched as a file (IN_MODIFY of its inode), re-armed when a new journal
    appears (the first one, or a compaction's rename); the change is reported either way,
    so a write between the rename and the re-arm is never missed: the reader woken reads
    the new file from its start. If the kernel's event queue overflowed, that counts as a
    change."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._journal_name = home.queue_journal.name
        self._snapshot_name = home.queue_file.name
        self._inotify = INotify(nonblocking=True)
        self._folder_wd: int | None = None
        self._inbox_wd: int | None = None
        self._journal_wd: int | None = None
        try:
            for folder in (home.coordination, home.inbox):
                if folder.is_dir():
                    wd = self._inotify.add_watch(folder, APPEARS)
                    if folder == home.inbox:
                        self._inbox_wd = wd
                    else:
                        self._folder_wd = wd
            self._arm_journal()
        except BaseException:
            self._inotify.close()
            raise

    def _arm_journal(self) -> None:
        """(Re-)watch the current journal file; quiet when there is none yet."""
        old, self._journal_wd = self._journal_wd, None
        if old is not None:
            with contextlib.suppress(OSError):  # gone with its inode already
                self._inotify.rm_watch(old)
        with contextlib.suppress(FileNotFoundError):
            self._journal_wd = self._inotify.add_watch(
                self.home.queue_journal, MODIFY | DONT_FOLLOW)

    def fileno(self) -> int:
        return int(self._inotify.fileno())

    def drain(self) -> bool:
        """Read every queued event without blocking; True when one was a queue change."""
        changed = False
        rearm = False
        for event in pending_events(self._inotify):
            if event.mask & Q_OVERFLOW:
                changed = rearm = True
            elif event.wd == self._journal_wd:
                changed = changed or bool(event.mask & MODIFY)
            elif event.wd == self._folder_wd:
                if event.name == self._journal_name:
                    changed = rearm = True
                elif event.name == self._snapshot_name:
                    changed = True
            elif event.wd == self._inbox_wd and event.name.endswith(".json") \
                    and not event.name.startswith("."):
                changed = True
        if rearm:
            self._arm_journal()
        return changed

    def close(self) -> None:
        self._inotify.close()


def watch_queue(home: Home, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` from one thread of ours on every queue change (a
    :class:`QueueChanges` feed); returns stop(), which joins the thread."""
    feed = QueueChanges(home)
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC)

    def follow() -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(feed.fileno(), selectors.EVENT_READ, "feed")
                selector.register(stop_r, selectors.EVENT_READ, "stop")
                while True:
                    ready = selector.select()
                    if any(key.data == "stop" for key, _ in ready):
                        return
                    if feed.drain():
                        callback()
        finally:  # the thread owns the descriptors: stop() may come from ``callback``
            for fd in (stop_r, stop_w):
                os.close(fd)
            feed.close()

    thread = threading.Thread(target=follow, name="harness-queue-watch", daemon=True)
    thread.start()
    stopped = threading.Lock()

    def stop() -> None:
        if not stopped.acquire(blocking=False):
            return  # stopped already
        os.write(stop_w, b"x")
        if thread is not threading.current_thread():
            thread.join(timeout=5)
    return stop


class QueueWakeups:
    """The file queue's wake-up methods of the port (``on_change``, ``changes``,
    ``wait``), mixed into :class:`~.core.QueueCore`, which owns the state they use."""

    home: Home
    _mutex: Any  # threading.RLock: the instance's in-process lock
    _watchers: list[Any]  # the unsubscribe functions close() calls
    _changed: threading.Condition

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """inotify on the journal (every commit writes it), the inbox (a new request) and
        task-queue.json (a hand edit); see :mod:`.watch`."""
        stop = watch_queue(self.home, callback)

        def unsubscribe() -> None:
            stop()
            if unsubscribe in self._watchers:
                self._watchers.remove(unsubscribe)
        self._watchers.append(unsubscribe)
        return unsubscribe

    def changes(self) -> ChangeFeed:
        """inotify on the journal, the inbox and task-queue.json, as one descriptor (see
        :mod:`.watch`): the caller selects on it, no thread of ours."""
        return QueueChanges(self.home)

    def wait(self, timeout: float | None) -> bool:
        """Block until the queue changes after this call, or ``timeout``; True when woken.
        One inotify watcher serves every wait of this instance (started by the first,
        stopped by :meth:`close`): a loop of short waits costs no thread start each."""
        if self._wait_watch is None:
            # Subscribed outside the condition: the watcher's thread calls
            # _note_change, which takes it, while holding locks of its own.
            with self._mutex:
                if self._wait_watch is None:
                    self._wait_watch = self.on_change(self._note_change)
        with self._changed:
            seen = self._change_count
            self._changed.wait_for(lambda: self._change_count != seen, timeout)
            return self._change_count != seen

    _wait_watch: Callable[[], None] | None = None

    _change_count = 0

    def _note_change(self) -> None:
        with self._changed:
            self._change_count += 1
            self._changed.notify_all()

