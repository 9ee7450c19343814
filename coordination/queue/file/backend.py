"""The file backend of the queue port (docs/coordination.md, "Queue", and
docs/architecture.md, "The file queue").

Files, all under ``coordination/`` and ``locks/queue.lock``:
- ``task-queue.journal``: the record of every committed transaction (see :mod:`.journal`).
  A commit is one ``pwrite`` of one line and one ``fdatasync``: the commit point.
- ``task-queue.json``: the jq view, a snapshot of the live tasks republished by rename at
  most every ``SNAPSHOT_INTERVAL_S`` while the queue changes; exact once the queue has been
  quiet for 1 s, never more than 1 s behind. A compaction publishes it durably and starts
  a new journal with only the lines after it.
- ``inbox/``, ``dead-letters/``, ``task-history.jsonl``: as before (group commit through
  the inbox; dead letters by rename; history appended under ``locks/history.lock``).

Each process keeps the live queue in memory (:class:`~.state.LiveState`) and applies only
the journal lines it has not seen, so an operation costs O(its change), not O(backlog).

Order within a commit (commit first, then side effects): history lines, dead-letter files,
the journal line (durable: the commit point), then inbox and dead-letter unlinks; events
after the lock is released; the snapshot after that, at its own pace. The history append is
not fsynced by itself: the journal line carries the same records, and compaction fsyncs the
history file before it drops journal lines, so a power loss is repaired from the journal
(``check(repair=True)``).

A hand edit of ``task-queue.json`` (jq and mv under ``flock locks/queue.lock``) is
honoured: a snapshot no process published is the base, and the journal lines after its
``revision`` are applied on top, so every edit of a task that did not change since that
snapshot holds; the next writer records the difference in the journal.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ... import clock
from ...config import load_system
from ...control import paused_types, read_control
from ...errors import (
    Backpressure,
    CorruptFileError,
    HarnessError,
    InvalidTransition,
    LockTimeout,
    NotFound,
)
from ...events import append_events, make_event
from ...locks import lock_for
from ...paths import Home
from ...store import (
    Durability,
    append_bytes,
    dumps,
    iter_jsonl,
    jsonl_archives,
    parse_record,
    read_json,
    replace_json,
    scan_jsonl_gz,
)
from ...tasks import PRIORITIES, check_task_id
from .. import admission, ops, rules
from ..contract import QueueFinding
from .journal import Journal
from .snapshot import Sig, parse, publish_temp, render, stat_sig, write_temp
from .state import LiveState

SOURCE = "queue"
SNAPSHOT_INTERVAL_S = 0.4  # at most this often; with the write time, under the 1 s bound
COMPACT_BYTES = 64 << 20  # a snapshot after the journal holds this much becomes durable
LOCK_RETRY_MIN_S = 0.0002
LOCK_RETRY_MAX_S = 0.001
FILE_MODE = 0o600


@dataclass
class _Txn:
    """One locked section: the changes to commit and what to do after."""

    state: LiveState
    now: float
    now_iso: str
    puts: dict[str, dict[str, Any]] = field(default_factory=dict)
    dels: dict[str, str | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    drop_dead_letters: list[str] = field(default_factory=list)
    inbox_done: list[Path] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    dedup: dict[str, str] = field(default_factory=dict)  # new task_id -> holder task_id
    note: str | None = None  # why (a hand edit merge)

    def get(self, task_id: str) -> dict[str, Any] | None:
        task = self.puts.get(task_id)
        if task is not None:
            return task
        if task_id in self.dels:
            return None
        return self.state.task(task_id)

    def put(self, task: dict[str, Any], *, touch: bool = True) -> None:
        if touch:
            task["updated_at"] = self.now_iso
        task_id = task["task_id"]
        self.dels.pop(task_id, None)
        self.puts[task_id] = task
        self.state.put(task)

    def remove(self, task_id: str, status: str | None) -> None:
        self.puts.pop(task_id, None)
        self.dels[task_id] = status
        self.state.remove(task_id, status)

    def lock(self, task_id: str) -> dict[str, Any] | None:
        """The whole queue is locked already: :meth:`get`."""
        return self.get(task_id)

    def waiters(self, task_id: str) -> list[dict[str, Any]]:
        return [t for t in map(self.get, list(self.state.waiters.get(task_id, ())))
                if t is not None]

    @property
    def changed(self) -> bool:
        return bool(self.puts or self.dels)

    def event(self, event_type: str, message: str, task: dict[str, Any] | None = None,
              severity: str = "info", **data: Any) -> None:
        self.events.append(make_event(
            event_type, severity=severity, source=SOURCE, message=message,
            task_id=task["task_id"] if task else None,
            worker_id=task.get("worker_id") if task else None,
            correlation_id=task.get("correlation_id") if task else None,
            data=data, now=self.now))


class FileQueue(ops.Operations):
    """The file backend over one harness home. One instance per process and home is
    enough; it is safe to share between threads."""

    backend_name = "file"

    def __init__(self, home: Home) -> None:
        self.home = home.require()
        self._lock = lock_for(home.lock_path("queue"))
        self._mutex = threading.RLock()
        self._journal = Journal(home.queue_journal, FILE_MODE)
        self._state: LiveState | None = None
        self._gen = 0
        # The newest snapshot we know was published (by any process): its sig, revision
        # and time, from the journal's snapshot notes.
        self._snap_sig: Sig | None = None
        self._snap_rev = -1
        self._snap_at = 0.0
        self._seen_sig: Sig | None = None  # a hand edit already merged into our view
        self._owe_snapshot = False  # this process committed what no snapshot shows yet
        self._timer: threading.Timer | None = None
        self._control_cache: tuple[tuple[int, int, int] | None, dict[str, Any]] | None = None
        self._watchers: list[Any] = []
        self._closed = False
        ref = weakref.ref(self)
        atexit.register(_close_at_exit, ref)

    # ================================================================== sync
    def _sync(self, *, locked: bool) -> LiveState:
        """Bring the in-memory queue up to the journal's end (and merge a hand edit)."""
        state = self._state
        if state is None:
            state = self._load(locked=locked)
        else:
            read = self._journal.read_new(locked=locked, after_rev=state.rev)
            if read.rotated:
                self._gen = int((self._journal.header or {}).get("gen", self._gen))
            for line in read.lines:
                if not self._apply(state, line):
                    state = self._load(locked=locked)
                    break
        self._check_snapshot(state, locked=locked)
        return self._state if self._state is not None else state

    def _apply(self, state: LiveState, line: dict[str, Any]) -> bool:
        """Apply one journal line; False when it does not follow (a gap: reload)."""
        snap = line.get("snap")
        if snap is not None:
            self._note_snapshot(snap)
            return True
        rev = line.get("rev")
        if not isinstance(rev, int) or rev <= state.rev:
            return True
        if rev != state.rev + 1:
            return False
        state.apply_commit(line)
        return True

    def _note_snapshot(self, snap: dict[str, Any]) -> None:
        rev = snap.get("rev")
        sig = snap.get("sig")
        if not isinstance(sig, list) or len(sig) != 3:
            return
        if snap.get("edit"):
            # A hand-edited file someone merged: known (no need to merge it again), but it
            # shows no particular revision, so it does not count as an up-to-date view.
            self._snap_sig = (int(sig[0]), int(sig[1]), int(sig[2]))
            self._snap_rev = -1
            return
        if isinstance(rev, int) and rev >= self._snap_rev:
            self._snap_rev, self._snap_sig = rev, (int(sig[0]), int(sig[1]), int(sig[2]))
            try:
                self._snap_at = clock.parse_iso(str(snap.get("at")))
            except ValueError:
                self._snap_at = 0.0

    def _load(self, *, locked: bool) -> LiveState:
        """The whole queue: the snapshot, then every journal line after its revision."""
        snap = parse(self.home.queue_file)
        state = LiveState(snap.revision if snap else 0)
        if snap is not None:
            try:
                for task, blob in snap.tasks():
                    state.put(task, blob)
            except CorruptFileError:
                self._state = None
                raise
            snap.data = b""
        self._journal.close()
        read = self._journal.read_new(locked=locked, after_rev=state.rev if snap else -1)
        self._gen = int((self._journal.header or {}).get("gen", 0))
        base = (self._journal.header or {}).get("base")
        if snap is None and isinstance(base, int) and base > 0:
            state.rev = base  # no snapshot at all: the journal is all we have
        for line in read.lines:
            if not self._apply(state, line):
                # The snapshot is older than the journal's first line (restored or written
                # by hand): apply what the journal has.
                state.rev = int(line["rev"]) - 1
                self._apply(state, line)
        self._state = state
        if snap is not None and snap.sig != self._snap_sig:
            self._seen_sig = snap.sig  # loaded as the base: a hand edit is in our view
        return state

    def _check_snapshot(self, state: LiveState, *, locked: bool) -> None:
        """A task-queue.json nobody published is a hand edit: it becomes the base and the
        journal after its revision is applied on top (so an edit of a task that did not
        change since holds, and every later change too). Under the lock the difference is
        recorded by the transaction (:meth:`_record_merge`)."""
        sig = stat_sig(self.home.queue_file)
        if sig is None or sig == self._snap_sig:
            return
        if sig != self._seen_sig:
            self._load(locked=locked)
            self._seen_sig = sig
        if locked:
            self._pending_merge = sig

    _pending_merge: Sig | None = None

    def _record_merge(self, txn: _Txn) -> None:
        """Write what a hand edit changed, against what the journal alone says, as this
        transaction's first changes: every process learns it by reading the journal."""
        sig, self._pending_merge = self._pending_merge, None
        if sig is None:
            return
        from .rebuild import journal_truth
        truth = journal_truth(self.home)
        merged = txn.state
        if truth is not None:
            for task_id, blob in merged.blobs.items():
                if truth.blobs.get(task_id) != blob:
                    txn.puts[task_id] = orjson.loads(blob)
            for task_id in truth.blobs:
                if task_id not in merged.blobs:
                    txn.dels[task_id] = None
        self._merged_sig = sig
        if txn.puts or txn.dels:
            txn.note = "hand edit"
            txn.event("queue_edited", f"task-queue.json was edited by hand: {len(txn.puts)} "
                      f"task(s) changed or added, {len(txn.dels)} removed",
                      severity="warning", changed=len(txn.puts), removed=len(txn.dels))

    _merged_sig: Sig | None = None

    # ================================================================== transactions
    def _transaction(self, now: float | None, body: Callable[[_Txn], Any], *,
                     drain: bool = True,
                     events_out: list[dict[str, Any]] | None = None,
                     lock_timeout: float | None = None) -> Any:
        """Run ``body(txn)`` under the queue lock, commit, then emit events. Any exception
        before the commit leaves the queue as it was (this process re-reads it if the
        body had changed its view)."""
        cfg = load_system(self.home)
        ts = clock.now() if now is None else now
        with self._mutex:
            self._acquire(cfg.lock_timeout if lock_timeout is None else lock_timeout)
            try:
                state = self._sync(locked=True)
                txn = _Txn(state, ts, clock.iso(ts))
                try:
                    self._record_merge(txn)
                    if drain:
                        self._drain_inbox(txn)
                    out = body(txn)
                    self._commit(txn, cfg.durability)
                except BaseException:
                    if txn.changed:
                        self._state = None
                    raise
            finally:
                self._lock.release()
            if txn.changed:
                self._owe_snapshot = True
        if events_out is not None:
            events_out.extend(txn.events)
        else:
            self._emit(txn.events)
        if txn.changed:
            self._snapshot_due(ts)
        return out

    def _acquire(self, timeout: float | None) -> None:
        """Take the queue lock, waiting at most ``timeout`` (LockTimeout after that). A
        transaction holds it well under a millisecond, so a busy lock is re-tried every
        LOCK_RETRY_MAX_S at most."""
        try:
            self._lock.acquire(timeout=0)
            return
        except LockTimeout:
            if timeout is not None and timeout <= 0:
                raise
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = LOCK_RETRY_MIN_S
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise LockTimeout(
                    f"timed out after {timeout}s waiting for {self._lock.path}; another "
                    f"process holds it (see `fuser {self._lock.path}`)")
            time.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(delay * 2, LOCK_RETRY_MAX_S)
            try:
                self._lock.acquire(timeout=0)
                return
            except LockTimeout:
                continue

    def _commit(self, txn: _Txn, durability: Durability) -> None:
        if not txn.changed:
            for path in txn.inbox_done:  # requests found already admitted
                _unlink_quietly(path)
            return
        if self._journal.fd is None:
            self._start_journal(txn.state.rev, txn.now_iso, durability)
        hpos: list[int] | None = None
        if txn.history:
            hpos = self._append_history(txn.history)
        for task in txn.dead_letters:
            replace_json(self.home.dead_letter(task["task_id"]), task, durability, pretty=True)
        rev = txn.state.rev + 1
        line: dict[str, Any] = {"rev": rev, "at": txn.now_iso}
        if txn.puts:
            for task in txn.puts.values():
                txn.state.put(task)  # the stored form is the committed one
            line["put"] = list(txn.puts.values())
        if txn.dels:
            line["del"] = [[task_id, status] for task_id, status in txn.dels.items()]
        if txn.history:
            line["hist"] = txn.history
            line["hpos"] = hpos
        if txn.note:
            line["note"] = txn.note
        self._journal.append(dumps(line) + b"\n", durability)
        txn.state.rev = rev
        merged = self._merged_sig
        if merged is not None:
            self._merged_sig = None
            self._journal.append(dumps({"snap": {"rev": rev, "sig": list(merged),
                                                 "at": txn.now_iso, "edit": True}})
                                 + b"\n", "none")
            self._snap_sig, self._snap_rev = merged, -1
            self._owe_snapshot = True
        for task_id in txn.drop_dead_letters:
            _unlink_quietly(self.home.dead_letter(task_id))
        for path in txn.inbox_done:
            _unlink_quietly(path)

    def _append_history(self, records: list[dict[str, Any]]) -> list[int]:
        """Append history lines under the history lock (not fsynced: the journal line holds
        them too). Returns ``[inode, offset]`` of where they went."""
        path = self.home.history_file
        with lock_for(self.home.lock_path("history")).held_for(
                load_system(self.home).lock_timeout):
            try:
                st = os.stat(path)
                pos = [st.st_ino, st.st_size]
            except FileNotFoundError:
                pos = [0, 0]
            append_bytes(path, b"".join(dumps(r) + b"\n" for r in records), "none")
            if pos[0] == 0:
                pos = [os.stat(path).st_ino, 0]
        return pos

    def _emit(self, events: list[dict[str, Any]]) -> None:
        """Append events of a committed change. The change is durable already, so failing
        here must not fail the caller (a retrying producer would enqueue twice)."""
        if not events:
            return
        try:
            append_events(self.home, events)
        except HarnessError as exc:
            import logging
            logging.getLogger("harness.queue").warning(
                "%d event(s) not recorded: %s", len(events), exc)

    # ================================================================== snapshot
    def _snapshot_due(self, now: float) -> None:
        """Have the jq view published SNAPSHOT_INTERVAL_S after the last one, by a timer
        thread (a daemon's work is never held up by it; a short-lived process publishes
        what it owes in :meth:`close`, at exit at the latest)."""
        self._schedule(max(0.0, self._snap_at + SNAPSHOT_INTERVAL_S - time.time()))

    def _schedule(self, delay: float) -> None:
        with self._mutex:
            if self._closed or (self._timer is not None and self._timer.is_alive()):
                return
            timer = threading.Timer(delay, self._timer_fired)
            timer.daemon = True
            timer.name = "harness-queue-snapshot"
            self._timer = timer
            timer.start()

    def _timer_fired(self) -> None:
        """A background publish: a failure is logged and retried later, never raised into
        a thread nobody joins (the journal holds every commit either way)."""
        if not self.home.coordination.is_dir():
            return  # the home is gone
        try:
            self.sync()
        except (HarnessError, OSError) as exc:
            import logging
            logging.getLogger("harness.queue").warning("snapshot not published: %s", exc)
            self._schedule(SNAPSHOT_INTERVAL_S)

    def sync(self, *, durable: bool = False) -> None:
        """Publish task-queue.json for the newest revision unless a snapshot of it exists
        already. The file is written outside the queue lock (only the rename holds it);
        ``durable`` (or a journal past COMPACT_BYTES) fsyncs it and starts a new journal
        with only the lines after it."""
        for _ in range(3):
            try:
                self._sync_once(durable)
                return
            except _Skip:
                continue  # a hand edit was merged first; publish the merged queue

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
        tmp: Path | None = write_temp(self.home.queue_file, render(rev, now, parts), dur,
                                      FILE_MODE)
        try:
            with self._mutex:
                self._acquire(cfg.lock_timeout)
                try:
                    assert tmp is not None
                    self._publish_locked(tmp, rev, now, compact, dur)
                    tmp = None
                finally:
                    self._lock.release()
        finally:
            if tmp is not None:
                _unlink_quietly(tmp)

    def _publish_locked(self, tmp: Path, rev: int, now: float, compact: bool,
                        dur: Durability, *, force: bool = False) -> None:
        state = self._sync(locked=True)
        if self._pending_merge is not None:
            # A hand edit arrived meanwhile: record it first; our file predates it.
            self._transaction_locked_merge(now)
            raise _Skip()
        if rev <= self._snap_rev and not compact and not force:
            self._owe_snapshot = state.rev > self._snap_rev
            _unlink_quietly(tmp)
            return
        sig = publish_temp(tmp, self.home.queue_file, dur)
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
            self._schedule(SNAPSHOT_INTERVAL_S)

    def _transaction_locked_merge(self, now: float) -> None:
        state = self._state
        assert state is not None
        txn = _Txn(state, now, clock.iso(now))
        self._record_merge(txn)
        self._commit(txn, load_system(self.home).durability)
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

    def _start_journal(self, rev: int, at: str, dur: Durability) -> None:
        """The first journal of a home (or after one was removed): it starts from the
        snapshot as it is, which becomes the base."""
        self._link_base()
        self._journal.create(self._gen + 1, rev, at, [], dur)
        self._journal.read_new(locked=True)
        self._gen = int((self._journal.header or {}).get("gen", self._gen + 1))

    def _link_base(self) -> None:
        """Keep the current task-queue.json as task-queue.base.json (a hard link, no copy):
        the state the next journal starts from, which ``doctor --repair`` rebuilds from."""
        base = self.home.queue_base_file
        tmp = base.with_name(f".{base.name}.tmp-{os.getpid()}")
        try:
            os.link(self.home.queue_file, tmp)
            os.replace(tmp, base)
        except FileNotFoundError:
            _unlink_quietly(base)  # no snapshot: the journal starts from an empty queue
        except OSError:
            pass
        finally:
            _unlink_quietly(tmp)

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
            except (HarnessError, OSError, _Skip):
                pass
        with self._mutex:
            self._closed = True
            for stop in list(self._watchers):
                stop()
            self._journal.close()

    # ================================================================== inbox
    def _inbox_names(self) -> list[str]:
        return admission.inbox_names(self.home)

    def _drain_inbox(self, txn: _Txn) -> None:
        admission.drain_inbox(self.home, txn, self._completed_ids)

    def _completed_ids(self, wanted: set[str]) -> set[str]:
        """Which of ``wanted`` have a final ``completed`` record in history (streams), also
        in the janitor's archives of it (newest first, only while some are not found)."""
        found: set[str] = set()
        for _, record in iter_jsonl(self.home.history_file):
            if record and record.get("final") and record.get("task_id") in wanted \
                    and record.get("status") == "completed":
                found.add(record["task_id"])
        for archive in jsonl_archives(self.home.history_file):
            rest = wanted - found
            if not rest:
                break
            for record in scan_jsonl_gz(archive, [t.encode() for t in rest]):
                if record.get("final") and record.get("task_id") in rest \
                        and record.get("status") == "completed":
                    found.add(record["task_id"])
        return found

    # ================================================================== producers
    def _check_backpressure(self, limit: int, adding: int) -> None:
        with self._mutex:
            queued = self._sync(locked=False).queued_count()
        if queued + adding > limit:
            raise Backpressure(
                f"backpressure: {queued} tasks queued, max_queue_depth is {limit}; retry later"
                " or pass --force")

    def ingest(self, *, now: float | None = None, timeout: float | None = None) -> int:
        """Drain the inbox into the queue; returns how many tasks were added (no lock is
        taken when the inbox is empty). ``timeout``: wait at most that long for the queue
        lock (0: only if it is free at once), LockTimeout after; default lock_timeout_s."""
        if not self._inbox_names():
            return 0

        def body(txn: _Txn) -> int:
            return sum(1 for e in txn.events if e["type"] == "task_enqueued")
        count: int = self._transaction(now, body, lock_timeout=timeout)
        return count

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
                                 load_system(self.home).durability, FILE_MODE)
                self._publish_locked(tmp, state.rev, ts, False,
                                     load_system(self.home).durability, force=True)
            finally:
                self._lock.release()
        return True

    # ================================================================== workers
    def _claim_in(self, txn: _Txn, worker_id: str, wanted: set[str] | None,
                  paused: set[str]) -> dict[str, Any] | None:
        task_id = txn.state.best_runnable(txn.now_iso, wanted, paused)
        if task_id is None:
            return None
        task = txn.get(task_id)
        assert task is not None
        return ops.take(txn, task, worker_id)

    def _paused(self, now: float) -> set[str]:
        return paused_types(self._control(), now)

    def _control(self) -> dict[str, Any]:
        """control.json, re-read only when its inode, size or mtime changed."""
        sig = stat_sig(self.home.control_file)
        cached = self._control_cache
        if cached is not None and cached[0] == sig and sig is not None:
            return cached[1]
        state = read_control(self.home)
        self._control_cache = (sig, state)
        return state

    # ================================================================== operators
    def requeue_dead(self, task_id: str, *, reset_attempts: bool = True,
                     now: float | None = None) -> dict[str, Any]:
        """Move a dead letter back into the queue as a fresh queued task; the dead-letter
        file is removed after the commit."""
        check_task_id(task_id)

        def body(txn: _Txn) -> dict[str, Any]:
            path = self.home.dead_letter(task_id)
            try:
                task = read_json(path)
            except FileNotFoundError:
                raise NotFound(f"no dead letter {task_id} ({path})") from None
            if task_id in txn.state:
                raise InvalidTransition(f"task {task_id} is already live")
            key = task.get("dedup_key")
            holder = txn.state.by_dedup.get(key) if key else None
            if holder is not None:
                raise InvalidTransition(f"dedup_key {key!r} of {task_id} is held by live task "
                                        f"{holder}; cancel or finish it first")
            rules.requeued_from_dead(task, reset_attempts=reset_attempts)
            txn.put(task)
            txn.drop_dead_letters.append(task_id)
            txn.event("task_requeued", "requeued from dead letters", task)
            return dict(task)
        out: dict[str, Any] = self._transaction(now, body)
        return out

    def purge_dead(self, task_ids: Iterable[str] | None = None) -> list[str]:
        """Delete dead letters (all when ``task_ids`` is None); returns the ids removed.
        Their final history records stay."""
        ids = [d["task_id"] for d in self.dead_letters()] if task_ids is None \
            else [check_task_id(t) for t in task_ids]
        removed = [t for t in ids if self.home.dead_letter(t).exists()]
        with self._mutex:
            self._acquire(load_system(self.home).lock_timeout)
            try:
                for task_id in removed:
                    _unlink_quietly(self.home.dead_letter(task_id))
            finally:
                self._lock.release()
        if removed:
            self._emit([make_event("dlq_purged", source=SOURCE,
                                   message=f"purged {len(removed)} dead letter(s)",
                                   data={"task_ids": removed[:100], "count": len(removed)})])
        return removed

    # ================================================================== reads
    def _view(self) -> LiveState:
        with self._mutex:
            return self._sync(locked=False)

    def live_tasks(self, status: str | None = None) -> list[dict[str, Any]]:
        """Queued and running tasks (only ``status`` ones when given), in snapshot order:
        a consistent view, no lock taken."""
        with self._mutex:
            state = self._sync(locked=False)
            if status is None:
                return list(state.tasks())
            return [t for t in map(state.task, state.ids_with_status(status)) if t]

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The task as live, else its dead letter, else its newest final history record;
        None when unknown. The history lookup streams the file."""
        with self._mutex:
            live = self._sync(locked=False).task(task_id)
        if live is not None:
            return live
        dead = self.home.dead_letter(task_id)
        try:
            return dict(read_json(dead))
        except FileNotFoundError:
            pass
        found = None
        for _, record in iter_jsonl(self.home.history_file):
            if record and record.get("task_id") == task_id and record.get("final"):
                found = record
        return found

    def history_of(self, task_id: str | None, *, correlation_id: str | None = None,
                   archives: bool = False) -> list[dict[str, Any]]:
        """Every history record of ``task_id`` (or of ``correlation_id``) in file order ([]
        when none). With ``archives``, the records in ``task-history.N.jsonl.gz`` come
        first, oldest archive first (this decompresses every archive)."""
        if (task_id is None) == (correlation_id is None):
            raise ValueError("give exactly one of task_id and correlation_id")
        key, value = ("task_id", task_id) if task_id is not None \
            else ("correlation_id", correlation_id)
        needle = orjson.dumps(value)
        older: list[dict[str, Any]] = []
        if archives:
            for archive in reversed(jsonl_archives(self.home.history_file)):
                older.extend(r for r in scan_jsonl_gz(archive, [needle])
                             if r.get(key) == value)
        return older + [r for _, r in iter_jsonl(self.home.history_file)
                        if r is not None and r.get(key) == value]

    def history_since(self, cursor: str | None, *, start_at: float | None = None,
                      limit: int | None = None) -> tuple[list[dict[str, Any]], str]:
        """History records after ``cursor`` (``"INODE:OFFSET"`` of task-history.jsonl):
        whole lines only (a line being written is left for the next call). No cursor:
        from the beginning, or with ``start_at`` only records recorded since then (read
        backwards from the end). A rotated file starts over."""
        from .history import read_since
        return read_since(self.home.history_file, cursor, start_at=start_at, limit=limit)

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter, oldest task id first ([] when none)."""
        out = []
        try:
            names = sorted(n for n in os.listdir(self.home.dead_letters)
                           if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            return []
        for name in names:
            try:
                out.append(read_json(self.home.dead_letters / name))
            except FileNotFoundError:
                continue
        return out

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """Counts by status and priority, runnable tasks per worker type, oldest queued age,
        inbox and dead-letter sizes, revision. O(1) but for the runnable count."""
        ts = clock.now() if now is None else now
        with self._mutex:
            state = self._sync(locked=False)
            by_status = {"queued": 0, "running": 0}
            by_priority = {p: {"queued": 0, "running": 0} for p in PRIORITIES}
            for (status, priority), n in state.counts.items():
                by_status[status] += n
                by_priority[priority][status] += n
            oldest = state.oldest_queued()
            runnable = state.runnable_by_type(clock.iso(ts), paused_types(self._control(), ts))
            live, revision = len(state), state.rev
        try:
            dead = sum(1 for n in os.listdir(self.home.dead_letters) if n.endswith(".json"))
        except FileNotFoundError:
            dead = 0
        return {
            "live": live, "by_status": by_status, "by_priority": by_priority,
            "runnable": sum(runnable.values()), "runnable_by_type": runnable,
            "inbox_pending": len(self._inbox_names()), "dead_letters": dead,
            "oldest_queued_at": oldest,
            "oldest_queued_age_s": round(ts - clock.parse_iso(oldest), 3) if oldest else None,
            "revision": revision,
        }

    # ================================================================== wake-ups
    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """inotify on the journal (every commit writes it), the inbox (a new request) and
        task-queue.json (a hand edit); see :mod:`.watch`."""
        from .watch import watch_queue
        stop = watch_queue(self.home, callback)

        def unsubscribe() -> None:
            stop()
            if unsubscribe in self._watchers:
                self._watchers.remove(unsubscribe)
        self._watchers.append(unsubscribe)
        return unsubscribe

    # ================================================================== check
    def check(self, *, repair: bool = False, now: float | None = None) -> list[QueueFinding]:
        """The queue's part of ``harness doctor`` (see :mod:`.check`)."""
        from .check import check_queue
        return check_queue(self, repair=repair, now=clock.now() if now is None else now)


class _Skip(Exception):
    """A snapshot publish gave way to a hand edit that arrived meanwhile."""


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _close_at_exit(ref: weakref.ref[FileQueue]) -> None:
    queue = ref()
    if queue is not None:
        queue.close()


def parse_history_line(raw: bytes) -> dict[str, Any] | None:
    return parse_record(raw)
