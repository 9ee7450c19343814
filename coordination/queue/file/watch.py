"""Wake-ups of the file backend: inotify through watchdog.

What means "the queue may have changed": a write to ``task-queue.journal`` (every commit
is one; IN_MODIFY), a request published in ``inbox/`` (IN_MOVED_TO / IN_CREATE of a
``*.json``), and ``task-queue.json`` replaced (a hand edit; our own snapshots wake a
watcher at most twice a second under load). Temp files, lock files and every other file
are ignored, so appends to the event log do not wake anybody.
"""

from __future__ import annotations

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
    """Call ``callback`` from a watchdog thread on every queue change; returns stop()."""
    from watchdog.events import (
        FileCreatedEvent,
        FileModifiedEvent,
        FileMovedEvent,
        FileSystemEvent,
        FileSystemEventHandler,
    )
    from watchdog.observers import Observer

    coordination, inbox = str(home.coordination), str(home.inbox)
    journal, snapshot = str(home.queue_journal), str(home.queue_file)

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            kind = event.event_type
            for raw in (getattr(event, "dest_path", ""), event.src_path):
                path = os.fsdecode(raw) if isinstance(raw, bytes) else str(raw)
                if not path:
                    continue
                if path == journal and kind in ("modified", "created", "moved"):
                    callback()
                    return
                if kind in ("created", "moved"):
                    folder, name = os.path.split(path)
                    if name.startswith("."):
                        continue
                    if (folder == inbox and name.endswith(".json")) or path == snapshot:
                        callback()
                        return

    observer = Observer(timeout=30)
    handler = Handler()
    # Only the inotify events that can mean a change (watchdog builds the kernel's mask from
    # the filter): opens, closes and attribute changes of every file there would each cost
    # a Python dispatch, several per task.
    filters = {coordination: [FileModifiedEvent, FileCreatedEvent, FileMovedEvent],
               inbox: [FileCreatedEvent, FileMovedEvent]}
    for folder, wanted in filters.items():
        if os.path.isdir(folder):
            observer.schedule(handler, folder, recursive=False, event_filter=wanted)
    observer.daemon = True
    observer.start()
    for emitter in observer.emitters:
        _no_move_pairing_delay(emitter)

    def stop() -> None:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    return stop
