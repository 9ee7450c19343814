"""Wake-ups of the file backend: inotify through watchdog.

What means "the queue may have changed": a write to ``task-queue.journal`` (every commit
is one; IN_MODIFY), a request published in ``inbox/`` (IN_MOVED_TO / IN_CREATE of a
``*.json``), and ``task-queue.json`` replaced (a hand edit; our own snapshots wake a
watcher at most twice a second under load). Temp files, lock files and every other file
are ignored, so appends to the event log do not wake anybody.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from ...paths import Home


def _no_move_pairing_delay(emitter: Any) -> None:
    """watchdog holds each IN_MOVED_FROM up to 0.5 s to pair it with its IN_MOVED_TO, and
    every event queued behind it waits too: publish-by-rename makes one of every write.
    We only need to know that a watched name appeared; turn the delay off where the
    installed watchdog keeps it (its internal queue), and leave it otherwise."""
    inotify = getattr(emitter, "_inotify", None)
    for holder in (getattr(inotify, "_move_event_grouper", None), inotify):
        queue = getattr(holder, "_queue", None)
        if queue is not None and isinstance(getattr(queue, "delay", None), int | float):
            queue.delay = 0
            return


def watch_queue(home: Home, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` from a watchdog thread on every queue change; returns stop().

    The journal is watched as a file (IN_MODIFY of that inode only), not through its
    folder: a folder watch for IN_MODIFY would also deliver every append to the event log
    and the history file beside it, several per task, each a Python dispatch in every
    process that follows the queue. The folder is watched for IN_CREATE / IN_MOVED_TO
    only: a new journal (compaction, or the first one) re-arms the file watch, then calls
    ``callback`` (so a write between the rename and the re-arm is never missed: the
    reader woken reads the new file from its start), and a hand-edited task-queue.json."""
    import threading

    from watchdog.events import (
        FileCreatedEvent,
        FileModifiedEvent,
        FileMovedEvent,
        FileSystemEvent,
        FileSystemEventHandler,
    )
    from watchdog.observers import Observer
    from watchdog.observers.api import ObservedWatch

    coordination, inbox = str(home.coordination), str(home.inbox)
    journal, snapshot = str(home.queue_journal), str(home.queue_file)
    observer = Observer(timeout=30)
    armed: list[ObservedWatch] = []
    arm_lock = threading.Lock()

    def arm() -> None:
        """(Re-)watch the current journal file; quiet when there is none yet."""
        with arm_lock:
            for old in armed:
                with contextlib.suppress(KeyError, OSError):
                    observer.unschedule(old)
            armed.clear()
            if os.path.exists(journal):
                with contextlib.suppress(OSError):  # replaced or removed meanwhile
                    armed.append(observer.schedule(handler, journal, recursive=False,
                                                   event_filter=[FileModifiedEvent]))
            _no_move_pairing_delay_all(observer)

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            kind = event.event_type
            for raw in (getattr(event, "dest_path", ""), event.src_path):
                path = os.fsdecode(raw) if isinstance(raw, bytes) else str(raw)
                if not path:
                    continue
                if path == journal:
                    if kind in ("created", "moved"):
                        arm()
                    if kind in ("modified", "created", "moved"):
                        callback()
                        return
                    continue
                if kind in ("created", "moved"):
                    folder, name = os.path.split(path)
                    if name.startswith("."):
                        continue
                    if (folder == inbox and name.endswith(".json")) or path == snapshot:
                        callback()
                        return

    handler = Handler()
    # Only the inotify events that can mean a change (watchdog builds the kernel's mask from
    # the filter): opens, closes and attribute changes would each cost a Python dispatch.
    for folder in (coordination, inbox):
        if os.path.isdir(folder):
            observer.schedule(handler, folder, recursive=False,
                              event_filter=[FileCreatedEvent, FileMovedEvent])
    observer.daemon = True
    observer.start()
    # Armed once the observer runs (a watch that cannot start then raises here, not in
    # start()). Re-arms run in the dispatcher thread, which holds the observer's lock
    # while it calls ``callback``: the caller must not hold, while subscribing, a lock
    # that ``callback`` takes (QueueCore.wait subscribes outside its condition).
    arm()

    def stop() -> None:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    return stop


def _no_move_pairing_delay_all(observer: Any) -> None:
    for emitter in list(observer.emitters):
        _no_move_pairing_delay(emitter)
