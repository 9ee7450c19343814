"""The jq view of the file queue: ``task-queue.json`` republished by a timer thread at most
every SNAPSHOT_INTERVAL_S (longer for a view that takes long to write, within the 1 s
bound) while the queue changes (written off the lock, renamed under
it), and compaction: a durable view that starts a new journal (docs/coordination.md,
"task-queue.json", "task-queue.journal")."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from ... import clock
from ...config import load_system
from ...errors import (
    HarnessError,
)
from ...store import (
    Durability,
    dumps,
)
from .core import QueueCore, Skip
from .snapshot import publish_temp, render, stat_sig, write_temp
from .txn import Txn, unlink_quietly

SNAPSHOT_INTERVAL_S = 0.4  # at most this often; with the write time, under the 1 s bound
VIEW_BOUND_S = 1.0  # the view is never more than this behind (docs/coordination.md)
COMPACT_BYTES = 64 << 20  # a snapshot after the journal holds this much becomes durable


class Publisher(QueueCore):
    """Publishing and compaction for :class:`~.backend.FileQueue`."""

    _render_s = 0.0  # how long our last render and write of the view took

    def _interval(self) -> float:
        """The least time between two publishes: SNAPSHOT_INTERVAL_S, longer for a view
        that takes long to write (about 7 writes' time: a 100,000-task view takes ~0.1 s,
        which every 0.4 s was a quarter of a core), as long as the interval and two writes
        stay within VIEW_BOUND_S less a tenth of a second."""
        return max(SNAPSHOT_INTERVAL_S,
                   min(7 * self._render_s, VIEW_BOUND_S - 0.1 - 2 * self._render_s))

    def _snapshot_due(self, now: float) -> None:
        """Have the jq view published an interval (:meth:`_interval`) after the last one,
        by a timer thread (a daemon's work is never held up by it; a short-lived process
        publishes what it owes in :meth:`close`, at exit at the latest)."""
        self._schedule(max(0.0, self._snap_at + self._interval() - time.time()))

    def _schedule(self, delay: float) -> None:
        """Ask the timer thread for a publish after ``delay`` (start it when none runs). A
        request that arrives while it runs makes it publish again after the interval, so a
        commit is never left out of the view (see :meth:`_timer_fired`)."""
        with self._mutex:
            if self._closed:
                return
            self._publish_wanted = True
            if self._timer is not None and self._timer.is_alive():
                return
            timer = threading.Timer(delay, self._timer_fired)
            timer.daemon = True
            timer.name = "harness-queue-snapshot"
            self._timer = timer
            timer.start()

    _publish_wanted = False

    def _timer_fired(self) -> None:
        """The background publisher: publish, then again after an interval while
        requests keep coming; it ends (under the mutex, so no request is lost) when none
        came. A failure is logged, never raised into a thread nobody joins (the journal
        holds every commit either way)."""
        while True:
            with self._mutex:
                if self._closed:
                    self._timer = None
                    return
                self._publish_wanted = False
            if not self.home.coordination.is_dir():
                return  # the home is gone
            try:
                later = self._sync_timed()
                if later > 0:
                    # Another process published less than an interval ago: come
                    # back when the interval since its publish is over (one render per
                    # interval for the whole fleet, not one per process that commits).
                    time.sleep(later)
                    continue
            except (HarnessError, OSError) as exc:
                # Logged once; the next commit asks again (a corrupt view stops commits too,
                # so this never spins).
                import logging
                logging.getLogger("harness.queue").warning("snapshot not published: %s", exc)
            with self._mutex:
                if self._closed or not self._publish_wanted:
                    self._timer = None
                    return
            time.sleep(self._interval())

    def sync(self, *, durable: bool = False) -> None:
        """Publish task-queue.json for the newest revision unless a snapshot of it exists
        already. The file is written outside the queue lock (only the rename holds it);
        ``durable`` (or a journal past COMPACT_BYTES) fsyncs it and starts a new journal
        with only the lines after it."""
        for _ in range(3):
            try:
                self._sync_once(durable)
                return
            except Skip:
                continue  # a hand edit was merged first; publish the merged queue

    def _sync_timed(self) -> float:
        """The timer's publish: 0.0 when done, else how long to wait first because
        another process published a view less than an interval ago (the bound on the
        view's staleness holds either way: that publish, or ours after the wait, comes
        within the interval of our commit)."""
        interval = self._interval()
        with self._mutex:
            self._sync(locked=False)
            wait = self._snap_at + interval - time.time()
            if self._snap_rev >= 0 and wait > 0.01 \
                    and self._journal.data_size() <= COMPACT_BYTES:
                self._publish_wanted = True
                return min(wait, interval)
        self.sync()
        return 0.0

    def _sync_once(self, durable: bool) -> None:
        cfg = load_system(self.home)
        now = time.time()
        with self._mutex:
            state = self._sync(locked=False)
            if state.rev <= self._snap_rev and not durable \
                    and stat_sig(self.home.queue_file) is not None:
                self._owe_snapshot = False
                return
            rev, parts = state.rev, state.snapshot_parts()
            compact = durable or self._journal.data_size() > COMPACT_BYTES
        dur: Durability = cfg.durability if compact else "none"
        started = time.monotonic()
        tmp: Path | None = write_temp(self.home.queue_file, render(rev, now, parts), dur,
                                      self._mode)
        self._render_s = time.monotonic() - started
        replaced: list[int] = []
        try:
            with self._mutex:
                self._acquire(cfg.lock_timeout)
                try:
                    assert tmp is not None
                    self._publish_locked(tmp, rev, now, compact, dur, replaced=replaced)
                    tmp = None
                finally:
                    self._lock.release()
        finally:
            for fd in replaced:  # the old view's blocks are freed now, off the lock
                os.close(fd)
            if tmp is not None:
                unlink_quietly(tmp)

    def _publish_locked(self, tmp: Path, rev: int, now: float, compact: bool,
                        dur: Durability, *, force: bool = False,
                        replaced: list[int] | None = None) -> None:
        state = self._sync(locked=True)
        if self._pending_merge is not None:
            # A hand edit arrived meanwhile: record it first; our file predates it.
            self._transaction_locked_merge(now)
            raise Skip()
        if rev <= self._snap_rev and not compact and not force:
            self._owe_snapshot = state.rev > self._snap_rev
            unlink_quietly(tmp)
            return
        sig = publish_temp(tmp, self.home.queue_file, dur, keep_replaced=replaced)
        at = clock.iso(now)
        if self._journal.fd is None:
            self._start_journal(rev, at, dur)
        self._journal.append(dumps({"snap": {"rev": rev, "sig": list(sig), "at": at}})
                             + b"\n", "none")
        self._snap_rev, self._snap_sig, self._snap_at = rev, sig, now
        if compact:
            self._compact(rev, at, dur)
        self._owe_snapshot = state.rev > rev
        if self._owe_snapshot:
            self._schedule(self._interval())

    def _transaction_locked_merge(self, now: float) -> None:
        state = self._state
        assert state is not None
        txn = Txn(state, now, clock.iso(now))
        self._record_merge(txn)
        if self._commit(txn, load_system(self.home).durability):
            self._journal.sync_written()  # under the lock here: a rare hand-edit merge
        self._emit(txn.events)

    def _compact(self, rev: int, at: str, dur: Durability) -> None:
        """Start a new journal holding only the lines after ``rev`` (the durable snapshot
        just published holds the rest). The history file is fsynced first: the dropped
        lines' history records must be on disk before the journal copy of them goes."""
        from .journal import read_all

        try:
            fd = os.open(self.home.history_file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            pass
        _, lines, _ = read_all(self.home.queue_journal)
        keep = [dumps(line) + b"\n" for line in lines
                if isinstance(line.get("rev"), int) and line["rev"] > rev]
        keep.append(dumps({"snap": {"rev": rev, "sig": list(self._snap_sig or (0, 0, 0)),
                                    "at": at}}) + b"\n")
        self._link_base()
        self._journal.create(self._gen + 1, rev, at, keep, dur)
        self._journal.read_new(locked=True)
        self._gen = int((self._journal.header or {}).get("gen", self._gen + 1))

    def ensure_published(self, *, now: float | None = None) -> bool:
        """Publish task-queue.json when there is none (a new home: jq finds an empty
        queue); True when it wrote one. Never replaces an existing file."""
        if self.home.queue_file.exists():
            return False
        with self._mutex:
            self._acquire(load_system(self.home).lock_timeout)
            try:
                if self.home.queue_file.exists():
                    return False
                state = self._sync(locked=True)
                ts = clock.now() if now is None else now
                tmp = write_temp(self.home.queue_file,
                                 render(state.rev, ts, state.snapshot_parts()),
                                 load_system(self.home).durability, self._mode)
                self._publish_locked(tmp, state.rev, ts, False,
                                     load_system(self.home).durability, force=True)
            finally:
                self._lock.release()
        return True

    def close(self) -> None:
        """Publish what this process owes the jq view, stop timers and watchers."""
        if self._closed:
            return
        timer = self._timer
        if timer is not None:
            timer.cancel()
        if self._owe_snapshot:
            try:
                self.sync()
            except (HarnessError, OSError, Skip):
                pass
        super().close()
