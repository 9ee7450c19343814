"""The file queue's core: the in-memory queue kept in step with the journal (and a hand
edit of the view merged), transactions and their commit, the reads and the wake-ups.
:mod:`.publisher` adds the jq view, :mod:`.admission` the producers, :mod:`.backend` the
worker and operator operations (docs/architecture.md, "The file queue")."""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from ... import clock
from ...config import load_system
from ...control import paused_types, read_control
from ...errors import (
    CorruptFileError,
    HarnessError,
    LockTimeout,
)
from ...events import Event, append_events
from ...jsonl import iter_jsonl, jsonl_archives, scan_jsonl_gz
from ...locks import lock_for
from ...paths import Home
from ...store import (
    FILE_MODE,
    FILE_MODE_GROUP,
    Durability,
    append_bytes,
    dumps,
    read_json,
    replace_json,
)
from ...tasks import PRIORITIES, HistoryRecord, Task, stored_record, stored_task
from .journal import Journal
from .snapshot import Sig, parse, publish_temp, render, stat_sig, write_temp
from .state import LiveState
from .txn import Txn, unlink_quietly
from .watch import QueueWakeups

LOCK_RETRY_MIN_S = 0.0002
LOCK_RETRY_MAX_S = 0.001


class QueueCore(QueueWakeups):
    """The state and the transaction machinery of :class:`~.backend.FileQueue` (its
    wake-ups: :class:`~.watch.QueueWakeups`)."""

    def __init__(self, home: Home) -> None:
        self.home = home.require()
        self._lock = lock_for(home.lock_path("queue"))
        self._mutex = threading.RLock()
        # 0600, or 0640 in a home shared with an operator group (harness init --group).
        self._mode = FILE_MODE_GROUP if home.shared() else FILE_MODE
        self._journal = Journal(home.queue_journal, self._mode)
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
        self._changed = threading.Condition()
        self._closed = False
        ref = weakref.ref(self)
        atexit.register(_close_at_exit, ref)

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

    def _record_merge(self, txn: Txn) -> None:
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

    def _transaction(self, now: float | None, body: Callable[[Txn], Any], *,
                     drain: bool = True,
                     events_out: list[Event] | None = None,
                     lock_timeout: float | None = None,
                     after_write: Callable[[Any], None] | None = None) -> Any:
        """Run ``body(txn)`` under the queue lock, commit, then emit events. Any exception
        before the commit leaves the queue as it was (this process re-reads it if the
        body had changed its view). ``after_write(out)`` runs after the lock is released
        and before the fdatasync (its metadata work then joins the same journal commit of
        the file system instead of waiting behind it); the fdatasync runs even if it
        raises, and its exception propagates after."""
        cfg = load_system(self.home)
        ts = clock.now() if now is None else now
        with self._mutex:
            self._acquire(cfg.lock_timeout if lock_timeout is None else lock_timeout)
            try:
                state = self._sync(locked=True)
                txn = Txn(state, ts, clock.iso(ts))
                try:
                    self._record_merge(txn)
                    if drain:
                        self._drain_inbox(txn)
                    out = body(txn)
                    owed = self._commit(txn, cfg.durability)
                except BaseException:
                    if txn.changed:
                        self._state = None
                    raise
            finally:
                self._lock.release()
            try:
                if after_write is not None:
                    after_write(out)
            finally:
                self._made_durable(txn, owed)
        if events_out is not None:
            events_out.extend(txn.events)
        else:
            self._emit(txn.events)
        if txn.changed:
            self._snapshot_due(ts)
        return out

    def _made_durable(self, txn: Txn, owed: bool) -> None:
        if not txn.changed:
            return
        self._owe_snapshot = True
        if owed:
            # Group commit: the line was written under the lock, its fdatasync runs after
            # the release, so the next process's transaction overlaps our flush. Nothing of
            # ours happens before it returns (the caller and the events wait), and a later
            # line that builds on ours is flushed by its own writer's fdatasync, which
            # covers ours (one file, written in order): no one acts on a change that may
            # not survive.
            self._journal.sync_written()

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

    def _commit(self, txn: Txn, durability: Durability) -> bool:
        """Write the transaction (see docs/coordination.md, "Commit order and crashes").
        True when the journal line still owes its fdatasync: the caller runs
        ``self._journal.sync_written()`` once it has released the queue lock (group
        commit), before anything else."""
        if not txn.changed:
            for path in txn.inbox_done:  # requests found already admitted
                unlink_quietly(path)
            if self._merged_sig is not None and self._journal.fd is not None:
                # A "hand edit" that changed nothing: the view of a publisher killed
                # between its rename and its journal line. Known from now on, and owed
                # a fresh view (else every sync() would merge it again and publish none).
                self._note_merged(txn.state.rev, txn.now_iso)
            return False
        if self._journal.fd is None:
            self._start_journal(txn.state.rev, txn.now_iso, durability, txn.state)
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
        self._journal.append(dumps(line) + b"\n", "none")
        owed = durability == "fsync"
        if owed and (txn.drop_dead_letters or txn.inbox_done):
            # Unlinking a drained request or a requeued dead letter must come after the
            # line that replaces it is on disk (a power loss between would lose the task):
            # flushed here, under the lock. Other commits flush after the release.
            self._journal.sync_written()
            owed = False
        txn.state.rev = rev
        if self._merged_sig is not None:
            self._note_merged(rev, txn.now_iso)
        for task_id in txn.drop_dead_letters:
            unlink_quietly(self.home.dead_letter(task_id))
        for path in txn.inbox_done:
            unlink_quietly(path)
        return owed

    def _note_merged(self, rev: int, at: str) -> None:
        """Journal the signature of the hand-edited view just merged (an ``edit`` snap
        line: known to every process, but no up-to-date view), so it is merged once."""
        merged, self._merged_sig = self._merged_sig, None
        assert merged is not None
        self._journal.append(dumps({"snap": {"rev": rev, "sig": list(merged), "at": at,
                                             "edit": True}}) + b"\n", "none")
        self._snap_sig, self._snap_rev = merged, -1
        self._owe_snapshot = True

    def _append_history(self, records: list[HistoryRecord]) -> list[int]:
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

    def _emit(self, events: list[Event]) -> None:
        """Append events of a committed change. The change is durable already, so failing
        here must not fail the caller (a retrying producer would enqueue twice)."""
        if not events:
            return
        try:
            append_events(self.home, events, durability="none")  # the journal has it
        except HarnessError as exc:
            import logging
            logging.getLogger("harness.queue").warning(
                "%d event(s) not recorded: %s", len(events), exc)

    def _start_journal(self, rev: int, at: str, dur: Durability,
                       state: LiveState | None = None) -> None:
        """The first journal of a home (or after one was removed): it starts from the
        snapshot, which becomes the base. With ``state`` (our live state, under the lock),
        a view that is not of that state's revision is first replaced by a durable one of
        it: a journal deleted while daemons run must not restart from a view up to a
        second stale, which would drop that second's commits for every later reader."""
        if state is not None and (self._snap_rev != rev
                                  or stat_sig(self.home.queue_file) != self._snap_sig):
            rendered_at = time.time()  # the view's updated_at, and when we published it
            tmp = write_temp(self.home.queue_file,
                             render(rev, rendered_at, state.snapshot_parts()), dur,
                             self._mode)
            try:
                self._snap_sig = publish_temp(tmp, self.home.queue_file, dur)
            finally:
                unlink_quietly(tmp)
            self._snap_rev, self._snap_at = rev, rendered_at
        # The new journal names the view it starts from (as a compaction's does), so
        # other processes know it for ours, not a hand edit.
        first = [] if self._snap_sig is None or self._snap_rev != rev else [
            dumps({"snap": {"rev": rev, "sig": list(self._snap_sig), "at": at}}) + b"\n"]
        self._link_base()
        self._journal.create(self._gen + 1, rev, at, first, dur)
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
            unlink_quietly(base)  # no snapshot: the journal starts from an empty queue
        except OSError:
            pass
        finally:
            unlink_quietly(tmp)

    def _inbox_names(self) -> list[str]:
        try:
            with os.scandir(self.home.inbox) as entries:
                return sorted(e.name for e in entries
                              if e.name.endswith(".json") and not e.name.startswith(".")
                              and e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def _control(self) -> dict[str, Any]:
        """control.json, re-read only when its inode, size or mtime changed."""
        sig = stat_sig(self.home.control_file)
        cached = self._control_cache
        if cached is not None and cached[0] == sig and sig is not None:
            return cached[1]
        state = read_control(self.home)
        self._control_cache = (sig, state)
        return state

    def _view(self) -> LiveState:
        with self._mutex:
            return self._sync(locked=False)

    def live_tasks(self, status: str | None = None) -> list[Task]:
        """Queued and running tasks (only ``status`` ones when given), in snapshot order:
        a consistent view, no lock taken."""
        with self._mutex:
            state = self._sync(locked=False)
            if status is None:
                return list(state.tasks())
            return [t for t in map(state.task, state.ids_with_status(status)) if t]

    def get(self, task_id: str) -> Task | None:
        """The task as live, else its dead letter, else its newest final history record;
        None when unknown. The history lookup streams the file."""
        with self._mutex:
            live = self._sync(locked=False).task(task_id)
        if live is not None:
            return live
        dead = self.home.dead_letter(task_id)
        try:
            return stored_task(dict(read_json(dead)))
        except FileNotFoundError:
            pass
        found = None
        for _, record in iter_jsonl(self.home.history_file):
            if record and record.get("task_id") == task_id and record.get("final"):
                found = record
        return stored_record(found) if found is not None else None

    def history_of(self, task_id: str | None, *, correlation_id: str | None = None,
                   archives: bool = False) -> list[HistoryRecord]:
        """Every history record of ``task_id`` (or of ``correlation_id``) in file order ([]
        when none). With ``archives``, the records in ``task-history.N.jsonl.gz`` come
        first, oldest archive first (this decompresses every archive)."""
        if (task_id is None) == (correlation_id is None):
            raise ValueError("give exactly one of task_id and correlation_id")
        key, value = ("task_id", task_id) if task_id is not None \
            else ("correlation_id", correlation_id)
        needle = orjson.dumps(value)
        older: list[HistoryRecord] = []
        if archives:
            for archive in reversed(jsonl_archives(self.home.history_file)):
                older.extend(stored_record(r) for r in scan_jsonl_gz(archive, [needle])
                             if r.get(key) == value)
        return older + [stored_record(r) for _, r in iter_jsonl(self.home.history_file)
                        if r is not None and r.get(key) == value]

    def history_since(self, cursor: str | None, *, start_at: float | None = None,
                      limit: int | None = None) -> tuple[list[HistoryRecord], str]:
        """History records after ``cursor`` (``"INODE:OFFSET"`` of task-history.jsonl):
        whole lines only (a line being written is left for the next call). No cursor:
        from the beginning, or with ``start_at`` only records recorded since then (read
        backwards from the end). A rotated file starts over."""
        from .history import read_since
        records, next_cursor = read_since(self.home.history_file, cursor, start_at=start_at,
                                          limit=limit)
        return [stored_record(r) for r in records], next_cursor

    def dead_letters(self) -> list[Task]:
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

    def next_due(self, *, types: Iterable[str] | None = None,
                 now: float | None = None) -> str | None:
        """The earliest future ``not_before`` of a queued task (see the port): a pass over
        the queued tasks held back (LiveState.held: those with a not_before or
        dependencies), not over the backlog; no task parsed."""
        now_iso = clock.iso(clock.now() if now is None else now)
        wanted = set(types) if types is not None else None
        with self._mutex:
            state = self._sync(locked=False)
            meta = state.meta
            found = [m.not_before for m in (meta[task_id] for task_id in state.held)
                     if m.not_before is not None and m.not_before > now_iso
                     and (wanted is None or m.wtype in wanted)]
        return min(found) if found else None

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """Counts by status and priority, runnable tasks per worker type, oldest queued age,
        inbox and dead-letter sizes, revision. O(1) but for the runnable count (O(queued
        tasks with dependencies or a not_before)) and the inbox and dead-letter listings."""
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

    # -- hooks the subclasses fill ---------------------------------------------------
    def _snapshot_due(self, now: float) -> None:
        """After a commit: the view owes a republish (:mod:`.publisher`)."""

    def _drain_inbox(self, txn: Txn) -> None:
        """At the start of a transaction: admit the inbox (:mod:`.admission`)."""

    def close(self) -> None:
        """Stop the watchers and close the journal."""
        with self._mutex:
            self._closed = True
            for stop in list(self._watchers):
                stop()
            self._journal.close()


class Skip(Exception):
    """A snapshot publish gave way to a hand edit that arrived meanwhile."""


def _close_at_exit(ref: weakref.ref[QueueCore]) -> None:
    queue = ref()
    if queue is not None:
        queue.close()
