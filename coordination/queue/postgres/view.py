"""Keeping a postgres home's jq view fresh (docs/multi-host.md, "The jq view").

:class:`ViewKeeper` runs one thread that republishes the view (``publish``, the queue's
``sync``) whenever it is told the database changed (LISTEN/NOTIFY, through the queue's
``on_change``), at most once every :data:`MIN_INTERVAL_S`: a burst of commits costs one
republish per interval, and the view is never more than MIN_INTERVAL_S plus one publish
behind the last commit. A failed publish (the server away) is retried at the next
change or after :data:`RETRY_S`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg

from ...errors import HarnessError

#: Least time between two republishes (the file backend's SNAPSHOT_INTERVAL_S).
MIN_INTERVAL_S = 0.4
#: After a failed publish, try again this soon even without a change.
RETRY_S = 1.0

log = logging.getLogger("harness.queue")


class ViewKeeper:
    """Republish through ``publish`` after each :meth:`changed`, rate limited."""

    def __init__(self, publish: Callable[[], None]) -> None:
        self._publish = publish
        self._due = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harness-jq-view",
                                        daemon=True)

    def start(self) -> None:
        self._due.set()  # publish once at start: the view may be old
        self._thread.start()

    def changed(self) -> None:
        """The database may have changed (called from the listener thread)."""
        self._due.set()

    def stop(self) -> None:
        self._stop.set()
        self._due.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last = 0.0
        failed = False
        while not self._stop.is_set():
            if not self._due.wait(RETRY_S if failed else None) and not failed:
                continue
            if self._stop.is_set():
                return
            pause = last + MIN_INTERVAL_S - time.monotonic()
            if pause > 0 and self._stop.wait(pause):
                return
            self._due.clear()  # changes from here on ask for the next publish
            last = time.monotonic()
            try:
                self._publish()
                failed = False
            except (HarnessError, OSError, psycopg.Error) as exc:  # keep going
                failed = True
                log.warning("jq view not republished: %s", exc)
