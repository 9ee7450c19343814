"""inotify as harness uses it: exact masks on one non-blocking descriptor, read by whoever
selects on it (inotify_simple; no thread).

Used by the file backend's change feed (:mod:`coordination.queue.file.watch`) and the
daemons' wake-ups (:mod:`daemons.wakeup`).
"""

from __future__ import annotations

from typing import Any

from inotify_simple import INotify, flags

#: A name appearing in a folder: created in place, or renamed into it (publish by rename).
APPEARS = flags.CREATE | flags.MOVED_TO | flags.ONLYDIR
MODIFY = flags.MODIFY
DONT_FOLLOW = flags.DONT_FOLLOW
Q_OVERFLOW = flags.Q_OVERFLOW

__all__ = ["APPEARS", "DONT_FOLLOW", "MODIFY", "Q_OVERFLOW", "INotify", "pending_events"]


def pending_events(inotify: INotify) -> list[Any]:
    """Every event ``inotify`` holds now (``wd``, ``mask``, ``cookie``, ``name``), without
    blocking; [] when there is none. ``Q_OVERFLOW`` in a mask means events were lost."""
    out: list[Any] = []
    while True:
        try:
            events = inotify.read(timeout=0)
        except BlockingIOError:
            events = []
        if not events:
            return out
        out.extend(events)
