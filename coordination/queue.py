"""The task queue: the one API the daemons and the CLI use (docs/coordination.md, "Queue").

Files
- ``task-queue.json``: live tasks only (queued, running), republished by rename under
  ``locks/queue.lock`` after every change; the previous revision stays as
  ``task-queue.prev.json`` (a hard link) for ``harness doctor --repair``.
- ``inbox/<task_id>.json``: task requests from producers, published by rename with no lock.
  Whoever next holds the queue lock drains the whole inbox in the same commit (group
  commit), then unlinks the drained files. Unparseable or invalid requests move to
  ``inbox/rejected/`` with a ``.reason`` file.
- ``task-history.jsonl``: one record per finished attempt (``final`` false) and per terminal
  task (``final`` true), appended under ``locks/history.lock``.
- ``dead-letters/<task_id>.json``: tasks that failed after ``max_attempts``, one per file
  (requeue and purge are O(1)); written only under the queue lock.

Ordering (commit first, then side effects): history and dead letters are written before the
queue stops listing a task, so a crash never loses one (at-least-once: a task may show in
both for an instant; ``doctor`` reports and repairs that). Inbox files are unlinked only
after the queue holding their tasks is durable. Events are appended after the lock is
released.

Each public method of :class:`TaskQueue` states its guarantee; tests/test_queue_contract.py
runs the same suite against any backend that implements :class:`QueueBackend`.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, overload

import orjson

from . import clock
from .config import load_system, load_worker_types
from .control import paused_types, read_control
from .errors import (
    Backpressure,
    CorruptFileError,
    HarnessError,
    InvalidTransition,
    LockTimeout,
    NotFound,
    UsageError,
)
from .events import append_events, make_event
from .locks import lock_for
from .paths import Home
from .redact import redact, redact_text
from .store import (
    Durability,
    append_bytes,
    dumps,
    iter_jsonl,
    jsonl_archives,
    parse_json,
    read_json,
    replace_bytes,
    replace_json,
    scan_jsonl_gz,
)
from .tasks import (
    PRIORITIES,
    PRIORITY_RANK,
    REQUEST_FIELDS,
    check_priority,
    check_stored_task,
    check_task_id,
    new_task,
)

QUEUE_FORMAT_VERSION = 1
SOURCE = "queue"
LOCK_RETRY_MIN_S = 0.0002  # first re-try of a busy queue lock
LOCK_RETRY_MAX_S = 0.001  # and at least this often after


@dataclass
class EnqueueResult:
    """What became of one enqueued request."""

    task: dict[str, Any]
    created: bool  # False: deduplicated onto an existing live task (``task`` is that one)


@dataclass
class _Loaded:
    """The parsed queue file and the per-task JSON we publish (cache for unchanged tasks)."""

    sig: tuple[int, int, int] | None
    revision: int
    tasks: dict[str, dict[str, Any]]
    # Serialised tasks in file order. Only tasks marked dirty are serialised again, and a
    # rewritten entry keeps its place, so publishing is one C-level join, not a Python loop.
    blobs: dict[str, bytes] = field(default_factory=dict)
    dirty: dict[str, None] = field(default_factory=dict)  # ordered: new tasks append in order
    status_of: dict[str, str] = field(default_factory=dict)  # status as last published
    queued: int = 0

    def __post_init__(self) -> None:
        self.dirty.update(dict.fromkeys(self.tasks))

    def queued_count(self) -> int:
        """Queued tasks as of the last publish or load (O(1))."""
        if self.dirty:
            self.flush()
        return self.queued

    def remove(self, task_id: str) -> None:
        del self.tasks[task_id]
        self.dirty[task_id] = None

    def flush(self) -> None:
        """Serialise dirty tasks and keep ``queued`` in step (O(dirty))."""
        for task_id in self.dirty:
            old = self.status_of.pop(task_id, None)
            self.queued -= old == "queued"
            task = self.tasks.get(task_id)
            if task is None:
                self.blobs.pop(task_id, None)
                continue
            self.blobs[task_id] = dumps(task)
            self.status_of[task_id] = task["status"]
            self.queued += task["status"] == "queued"
        self.dirty.clear()


@dataclass
class _Txn:
    """One locked section: the tasks plus what to write and emit when it commits."""

    state: _Loaded
    now: float
    changed: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    drop_dead_letters: list[str] = field(default_factory=list)
    inbox_done: list[Path] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    dedup: dict[str, str] = field(default_factory=dict)  # new task_id -> existing task_id
    admitted: list[dict[str, Any]] = field(default_factory=list)

    def touch(self, task: dict[str, Any]) -> None:
        task["updated_at"] = clock.iso(self.now)
        self.state.dirty[task["task_id"]] = None
        self.changed = True

    def event(self, event_type: str, message: str, task: dict[str, Any] | None = None,
              severity: str = "info", **data: Any) -> None:
        self.events.append(make_event(
            event_type, severity=severity, source=SOURCE, message=message,
            task_id=task["task_id"] if task else None,
            worker_id=task.get("worker_id") if task else None,
            correlation_id=task.get("correlation_id") if task else None,
            data=data, now=self.now))


class QueueBackend(Protocol):
    """The queue contract. Every method is atomic with respect to every other caller."""

    def enqueue(self, request: dict[str, Any], *, force: bool = False,
                now: float | None = None) -> EnqueueResult: ...
    def enqueue_batch(self, requests: list[dict[str, Any]], *, force: bool = False,
                      now: float | None = None) -> list[EnqueueResult]: ...
    def claim(self, worker_id: str, *, types: Iterable[str] | None = None,
              now: float | None = None) -> dict[str, Any] | None: ...
    def complete(self, task_id: str, worker_id: str, *, exit_code: int = 0,
                 result: dict[str, Any] | None = None,
                 now: float | None = None) -> dict[str, Any]: ...
    def fail(self, task_id: str, worker_id: str | None, *, error: str,
             exit_code: int | None = None, retry: bool = True,
             result: dict[str, Any] | None = None,
             now: float | None = None) -> dict[str, Any]: ...
    def release(self, task_id: str, worker_id: str, *, reason: str,
                now: float | None = None) -> dict[str, Any]: ...
    def cancel(self, task_id: str, *, reason: str = "cancelled by operator",
               now: float | None = None) -> dict[str, Any]: ...
    def reprioritize(self, task_id: str, priority: str, *,
                     now: float | None = None) -> dict[str, Any]: ...
    def requeue_dead(self, task_id: str, *, now: float | None = None) -> dict[str, Any]: ...
    def purge_dead(self, task_ids: Iterable[str] | None = None) -> list[str]: ...
    def get(self, task_id: str) -> dict[str, Any] | None: ...
    def live_tasks(self) -> list[dict[str, Any]]: ...
    def dead_letters(self) -> list[dict[str, Any]]: ...


def is_runnable(task: dict[str, Any], live: Container[str], now_iso: str,
                paused: Container[str], wanted: Container[str] | None = None) -> bool:
    """Whether ``task`` may be claimed now (docs/coordination.md, "Claim order"): queued,
    its ``not_before`` due (timestamps compare as text), no ``depends_on`` task still in
    ``live``, its worker type not in ``paused`` and, when ``wanted`` is given, in it."""
    if task["status"] != "queued":
        return False
    wtype = task.get("worker_type") or "default"
    if (wanted is not None and wtype not in wanted) or wtype in paused:
        return False
    nb = task.get("not_before")
    if nb is not None and nb > now_iso:
        return False
    return not any(dep in live for dep in task.get("depends_on") or ())


class TaskQueue:
    """The file backend of :class:`QueueBackend` over one harness home.

    One instance per process and home is enough (it caches the parsed queue and re-reads
    it only when the file's inode, size or mtime changed, e.g. after another process or an
    operator holding ``flock`` replaced it).
    """

    def __init__(self, home: Home) -> None:
        self.home = home.require()
        self._loaded: _Loaded | None = None
        self._lock = lock_for(home.lock_path("queue"))
        self._control_cache: tuple[tuple[int, int, int] | None, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ loading / saving
    def _sig(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.home.queue_file)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> _Loaded:
        """The current queue; raises CorruptFileError (naming file and position) if bad."""
        sig = self._sig()
        if self._loaded is not None and self._loaded.sig == sig:
            return self._loaded
        if sig is None:
            self._loaded = _Loaded(None, 0, {})
            return self._loaded
        path = self.home.queue_file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._loaded = _Loaded(None, 0, {})
            return self._loaded
        fast = self._parse_published(data, sig, self._loaded)
        if fast is not None:
            self._loaded = fast
            return fast
        raw = parse_json(path, data)
        if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list):
            raise CorruptFileError(path, "top level must be an object with a 'tasks' list")
        tasks: dict[str, dict[str, Any]] = {}
        for index, task in enumerate(raw["tasks"]):
            problems = check_stored_task(task, f"tasks[{index}]")
            if problems:
                raise CorruptFileError(path, "; ".join(problems))
            if task["task_id"] in tasks:
                raise CorruptFileError(path, f"tasks[{index}]: duplicate task_id "
                                             f"{task['task_id']}")
            tasks[task["task_id"]] = task
        revision = raw.get("revision", 0)
        self._loaded = _Loaded(sig, revision if isinstance(revision, int) else 0, tasks)
        return self._loaded

    @staticmethod
    def _parse_published(data: bytes, sig: tuple[int, int, int] | None,
                         prev: _Loaded | None) -> _Loaded | None:
        """Parse a queue file in the exact layout :meth:`_publish` writes (head line, one
        compact task per line, ``]}``), re-using the tasks of ``prev`` whose line is byte for
        byte what we last published for them: after another worker's commit only the tasks
        it changed are parsed and checked. Compact JSON never holds a raw newline, so lines
        are tasks. None when the file is laid out otherwise (hand-edited, or an empty queue):
        the caller then parses it in full, reporting any corruption as before."""
        marker = b',"tasks":[\n'
        head_end = data.find(marker)
        if head_end <= 0 or not data.endswith(b"\n]}\n"):
            return None
        body = data[head_end + len(marker):-4]
        if not body:
            return None
        try:
            head = orjson.loads(data[:head_end] + b"}")
        except orjson.JSONDecodeError:
            return None
        if not isinstance(head, dict) or "tasks" in head:
            return None
        known: dict[bytes, dict[str, Any]] = {}
        if prev is not None:
            for task_id, blob in prev.blobs.items():
                task = prev.tasks.get(task_id)
                if task is not None and task_id not in prev.dirty:
                    known[blob] = task
        tasks: dict[str, dict[str, Any]] = {}
        blobs: dict[str, bytes] = {}
        lines = body.split(b"\n")
        last = len(lines) - 1
        for index, line in enumerate(lines):
            if index < last:
                if not line.endswith(b","):
                    return None
                line = line[:-1]
            task = known.get(line)
            if task is None:
                try:
                    task = orjson.loads(line)
                except orjson.JSONDecodeError:
                    return None
                if not isinstance(task, dict) or check_stored_task(task, f"tasks[{index}]"):
                    return None
            task_id = task["task_id"]
            if task_id in tasks:
                return None
            tasks[task_id] = task
            blobs[task_id] = line
        revision = head.get("revision", 0)
        state = _Loaded(sig, revision if isinstance(revision, int) else 0, tasks)
        state.dirty.clear()
        state.blobs = blobs
        state.status_of = {task_id: task["status"] for task_id, task in tasks.items()}
        state.queued = sum(1 for status in state.status_of.values() if status == "queued")
        return state

    def _publish(self, state: _Loaded, now: float, durability: str) -> None:
        state.flush()
        parts = state.blobs.values()
        state.revision += 1
        head = dumps({"version": QUEUE_FORMAT_VERSION, "revision": state.revision,
                      "updated_at": clock.iso(now)})
        data = head[:-1] + b',"tasks":[\n' + b",\n".join(parts) + b"\n]}\n"
        queue, prev = self.home.queue_file, self.home.queue_prev_file
        if state.sig is not None:
            # Keep the revision we are replacing for doctor --repair (hard link: no copy).
            suffix = f"{os.getpid()}-{random.getrandbits(24):06x}"
            tmp_prev = prev.with_name(f".{prev.name}.tmp-{suffix}")
            try:
                os.link(queue, tmp_prev)
                os.replace(tmp_prev, prev)
            except OSError:
                try:
                    os.unlink(tmp_prev)
                except FileNotFoundError:
                    pass
        replace_bytes(queue, data, "fsync" if durability == "fsync" else "none")
        state.sig = self._sig()

    def _transaction(self, now: float | None, body: Any, *, drain: bool = True,
                     events_out: list[dict[str, Any]] | None = None) -> Any:
        """Run ``body(txn)`` under the queue lock, commit, then emit events.

        Commit order: history lines, dead-letter files, the queue file, the admitted-task
        record for repair, then dead-letter and inbox unlinks; events only after all of it,
        once this process no longer holds the lock (with ``events_out`` the caller takes
        the events and appends them after releasing an outer hold of the lock). Any
        exception before the queue file is published leaves the queue as it was (the cache
        is dropped so the next call re-reads the disk).
        """
        cfg = load_system(self.home)
        ts = clock.now() if now is None else now
        self._acquire(cfg.lock_timeout)
        try:
            try:
                txn = _Txn(self._load(), ts)
                if drain:
                    self._drain_inbox(txn)
                out = body(txn)
                self._commit(txn, cfg.durability)
            except BaseException:
                self._loaded = None
                raise
        finally:
            self._lock.release()
        if events_out is not None:
            events_out.extend(txn.events)
        else:
            self._emit(txn.events)
        return out

    def _acquire(self, timeout: float | None) -> None:
        """Take the queue lock, waiting at most ``timeout`` (LockTimeout after that).

        A queue transaction holds the lock for a millisecond or two, so a busy lock is
        re-tried every LOCK_RETRY_MAX_S at most: FileLock's own back-off grows to 20 ms,
        which under a steady stream of short transactions (workers claiming back to back)
        left the lock idle most of the time a waiter slept."""
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

    def _commit(self, txn: _Txn, durability: str) -> None:
        dur: Durability = "fsync" if durability == "fsync" else "none"
        if txn.history:
            with lock_for(self.home.lock_path("history")).held_for(
                    load_system(self.home).lock_timeout):
                append_bytes(self.home.history_file,
                             b"".join(dumps(r) + b"\n" for r in txn.history), dur)
        for task in txn.dead_letters:
            replace_json(self.home.dead_letter(task["task_id"]), task, dur, pretty=True)
        if txn.changed:
            self._publish(txn.state, txn.now, durability)
            self._keep_admitted(txn)
        for task_id in txn.drop_dead_letters:
            try:
                os.unlink(self.home.dead_letter(task_id))
            except FileNotFoundError:
                pass
        for path in txn.inbox_done:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _keep_admitted(self, txn: _Txn) -> None:
        """Keep the tasks this revision admitted in ``inbox/.ingested/rev-N.jsonl``.

        ``task-queue.prev.json`` lacks them, so ``doctor --repair`` needs them to rebuild a
        lost current revision. The file of the previous revision goes: the revision that
        just became ``prev`` contains its tasks. Not fsynced: it matters only if the queue
        file is also lost, and the queue file itself was fsynced.
        """
        folder = self.home.inbox_ingested
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            folder.mkdir(parents=True, exist_ok=True)
            names = []
        for name in names:
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                pass
        if txn.admitted:
            data = b"".join(dumps(t) + b"\n" for t in txn.admitted)
            replace_bytes(folder / f"rev-{txn.state.revision}.jsonl", data, "none")

    def _emit(self, events: list[dict[str, Any]]) -> None:
        """Append events of a committed change. The change is durable already, so failing
        here must not fail the caller (a retrying producer would enqueue twice): the
        problem is reported on stderr instead."""
        if not events:
            return
        try:
            append_events(self.home, events)
        except HarnessError as exc:
            print(f"harness: warning: {len(events)} event(s) not recorded: {exc}",
                  file=sys.stderr)

    # ------------------------------------------------------------------ inbox
    def submit(self, request: dict[str, Any], *, now: float | None = None,
               durable: bool = False) -> str:
        """Validate ``request`` and publish it in the inbox without taking the queue lock.

        Returns the task id. The task becomes visible in task-queue.json at the next queue
        operation by any process. ``durable`` fsyncs the inbox file (needed when nothing
        else will acknowledge the task, as in create-task.sh's contract).
        """
        ts = clock.now() if now is None else now
        cfg = load_system(self.home)
        task = new_task(dict(request), worker_types=load_worker_types(self.home),
                        limits=cfg.values, now=ts, where="request")
        stored = {k: task[k] for k in REQUEST_FIELDS if task.get(k) is not None}
        path = self.home.inbox / f"{task['task_id']}.json"
        if path.exists():
            raise UsageError(f"task id {task['task_id']} is already pending in the inbox")
        replace_bytes(path, dumps(stored) + b"\n", "fsync" if durable else "none")
        return str(task["task_id"])

    def _drain_inbox(self, txn: _Txn) -> None:
        try:
            names = sorted(e.name for e in os.scandir(self.home.inbox)
                           if e.name.endswith(".json") and not e.name.startswith(".")
                           and e.is_file())
        except FileNotFoundError:
            return
        if not names:
            return
        cfg = load_system(self.home)
        types = load_worker_types(self.home)
        tasks = txn.state.tasks
        accepted: list[tuple[dict[str, Any], Path | None]] = []
        for name in names:
            path = self.home.inbox / name
            where = f"{path}"
            stem = name[:-5]
            if stem in tasks:
                txn.inbox_done.append(path)  # committed before a crash; unlink is pending
                continue
            try:
                request = read_json(path)
                if isinstance(request, dict) and "task_id" not in request:
                    request["task_id"] = stem
                task = new_task(request, worker_types=types, limits=cfg.values, now=txn.now,
                                where=where)
                if task["task_id"] != stem:
                    raise UsageError(f"{where}: task_id {task['task_id']!r} differs from the "
                                     "file name")
            except FileNotFoundError:
                continue
            except (CorruptFileError, UsageError) as exc:
                self._reject(txn, path, str(exc))
                continue
            accepted.append((task, path))
        self._admit(txn, accepted)

    def _reject(self, txn: _Txn, path: Path, reason: str) -> None:
        target = self.home.inbox_rejected / path.name
        try:
            replace_bytes(target.with_suffix(".reason"), reason.encode() + b"\n", "none")
            os.replace(path, target)
        except FileNotFoundError:
            return
        txn.event("inbox_rejected", reason, severity="warning", file=str(target))

    def _admit(self, txn: _Txn, batch: list[tuple[dict[str, Any], Path | None]]) -> None:
        """Add validated new tasks: dedup, dependency and cycle checks, then queue them.

        A task from an inbox file (path given) that fails a check is rejected into
        ``inbox/rejected/``; a direct request (path None) raises UsageError, which aborts
        the whole transaction (a batch is all-or-nothing).
        """
        tasks = txn.state.tasks
        by_dedup = {t["dedup_key"]: t["task_id"] for t in tasks.values() if t.get("dedup_key")} \
            if any(t.get("dedup_key") for t, _ in batch) else {}
        group_ids = {t["task_id"] for t, _ in batch}
        unknown_deps = {d for t, _ in batch for d in t["depends_on"]
                        if d not in tasks and d not in group_ids}
        completed = self._completed_ids(unknown_deps) if unknown_deps else set()
        sources: dict[str, Path | None] = {}
        for task, path in batch:
            if task["task_id"] in tasks:
                raise UsageError(f"task id {task['task_id']} is already live")
            key = task.get("dedup_key")
            if key and key in by_dedup:
                existing = tasks[by_dedup[key]]
                txn.dedup[task["task_id"]] = existing["task_id"]
                if path is not None:
                    txn.inbox_done.append(path)
                txn.event("task_deduplicated", f"dedup_key {key} is held by "
                          f"{existing['task_id']}", existing, duplicate_task_id=task["task_id"])
                continue
            missing = [d for d in task["depends_on"]
                       if d not in tasks and d not in group_ids and d not in completed]
            if missing:
                reason = (f"{path or 'request'}: depends_on names unknown or not-completed "
                          f"task(s): {', '.join(missing)}")
                if path is None:
                    raise UsageError(reason)
                self._reject(txn, path, reason)
                group_ids.discard(task["task_id"])
                continue
            tasks[task["task_id"]] = task
            txn.admitted.append(task)
            sources[task["task_id"]] = path
            if key:
                by_dedup[key] = task["task_id"]
            txn.touch(task)
            if path is not None:
                txn.inbox_done.append(path)
            txn.event("task_enqueued", f"{task['priority']} task queued", task,
                      priority=task["priority"], worker_type=task["worker_type"])
        if txn.dedup:
            # A request of this batch that names a deduplicated one depends on the live
            # task that holds its dedup_key (the duplicate's id never exists).
            for task_id in sources:
                deps = tasks[task_id]["depends_on"]
                if any(d in txn.dedup for d in deps):
                    tasks[task_id]["depends_on"] = list(dict.fromkeys(
                        txn.dedup.get(d, d) for d in deps))
        rejected = {t["task_id"] for t, _ in batch} - set(sources) - set(txn.dedup)
        # Only a new task can close a cycle: older ones were checked when they arrived.
        # Every cycle goes (one is found at a time), and with it whatever new task depends
        # on a rejected one: it would otherwise run at once, its dependency never existing.
        while any(t["depends_on"] for t, _ in batch):
            cycle = self._find_cycle(tasks)
            if not cycle:
                break
            reason = f"depends_on forms a cycle: {' -> '.join(cycle)}"
            for task_id in dict.fromkeys(cycle):
                if task_id in sources:
                    self._unadmit(txn, task_id, sources.pop(task_id), reason)
                    rejected.add(task_id)
        while rejected:
            orphans = [tid for tid in sources if rejected & set(tasks[tid]["depends_on"])]
            if not orphans:
                break
            for task_id in orphans:
                deps = sorted(rejected & set(tasks[task_id]["depends_on"]))
                self._unadmit(txn, task_id, sources.pop(task_id),
                              f"depends_on names rejected task(s): {', '.join(deps)}")
                rejected.add(task_id)

    def _unadmit(self, txn: _Txn, task_id: str, path: Path | None, reason: str) -> None:
        """Take back a task admitted earlier in this transaction and reject its request
        (a direct request: UsageError, which aborts the whole transaction)."""
        if path is None:
            raise UsageError(f"request: {reason}")
        txn.state.remove(task_id)
        txn.admitted = [t for t in txn.admitted if t["task_id"] != task_id]
        txn.inbox_done.remove(path)
        txn.events = [e for e in txn.events if e["task_id"] != task_id]
        self._reject(txn, path, f"{path}: {reason}")

    @staticmethod
    def _find_cycle(tasks: dict[str, dict[str, Any]]) -> list[str]:
        """A dependency cycle among live tasks, as a list of ids ([] when acyclic)."""
        state: dict[str, int] = {}
        for root in tasks:
            if state.get(root):
                continue
            stack: list[tuple[str, Iterable[str]]] = [(root, iter(tasks[root]["depends_on"]))]
            path = [root]
            state[root] = 1
            while stack:
                node, deps = stack[-1]
                for dep in deps:
                    if dep not in tasks:
                        continue
                    if state.get(dep) == 1:
                        return [*path[path.index(dep):], dep]
                    if not state.get(dep):
                        state[dep] = 1
                        path.append(dep)
                        stack.append((dep, iter(tasks[dep]["depends_on"])))
                        break
                else:
                    state[node] = 2
                    stack.pop()
                    path.pop()
        return []

    def _completed_ids(self, wanted: set[str]) -> set[str]:
        """Which of ``wanted`` have a final ``completed`` record in history (streams), also
        in the janitor's archives of it (newest first, only while some are not found), so a
        dependency on a task whose record was rotated away is still known as completed."""
        found: set[str] = set()
        for _, record in iter_jsonl(self.home.history_file):
            if record and record.get("final") and record.get("task_id") in wanted \
                    and record.get("status") == "completed":
                found.add(record["task_id"])
        for archive in jsonl_archives(self.home.history_file):
            rest = wanted - found
            if not rest:
                break
            needles = [task_id.encode() for task_id in rest]
            for record in scan_jsonl_gz(archive, needles):
                if record.get("final") and record.get("task_id") in rest \
                        and record.get("status") == "completed":
                    found.add(record["task_id"])
        return found

    # ------------------------------------------------------------------ producers
    def enqueue(self, request: dict[str, Any], *, force: bool = False,
                now: float | None = None) -> EnqueueResult:
        """Add one task and return once it is durable and visible in task-queue.json.

        Raises UsageError on bad input (nothing is queued), Backpressure (exit 75) when
        more than ``max_queue_depth`` tasks are queued and ``force`` is False. With a
        ``dedup_key`` held by a live task, returns that task with ``created`` False.
        """
        return self.enqueue_batch([request], force=force, now=now)[0]

    def enqueue_batch(self, requests: list[dict[str, Any]], *, force: bool = False,
                      now: float | None = None) -> list[EnqueueResult]:
        """Add many tasks in one commit; all requests are validated before any is queued."""
        ts = clock.now() if now is None else now
        cfg = load_system(self.home)
        if not force:
            self._check_backpressure(cfg.values["max_queue_depth"], len(requests))
        types = load_worker_types(self.home)
        validated = []
        seen: set[str] = set()
        for index, request in enumerate(requests):
            where = "request" if len(requests) == 1 else f"request[{index}]"
            task = new_task(dict(request), worker_types=types, limits=cfg.values, now=ts,
                            where=where)
            if task["task_id"] in seen:
                raise UsageError(f"{where}: duplicate task_id {task['task_id']} in the batch")
            seen.add(task["task_id"])
            validated.append(task)
        ids = [task["task_id"] for task in validated]
        if len(validated) > 1 or self._try_lock():
            # Uncontended (or a batch, which is one commit anyway): admit directly under the
            # lock, draining whatever other producers left in the inbox in the same commit.
            events: list[dict[str, Any]] = []
            try:
                def direct(txn: _Txn) -> list[EnqueueResult]:
                    self._admit(txn, [(dict(task), None) for task in validated])
                    return [self._resolve(txn, task_id) for task_id in ids]
                results: list[EnqueueResult] = self._transaction(ts, direct,
                                                                 events_out=events)
            finally:
                if len(validated) == 1:
                    self._lock.release()
            self._emit(events)
            return results
        # Contended: publish in the inbox, then wait for the lock. Whoever holds it now
        # drains our request in its commit (group commit), so the wait is usually short.
        live = self._load().tasks
        for task in validated:
            if task["task_id"] in live:
                raise UsageError(f"task id {task['task_id']} is already live")
            stored = {k: task[k] for k in REQUEST_FIELDS if task.get(k) is not None}
            path = self.home.inbox / f"{task['task_id']}.json"
            # Not fsynced: the caller is acknowledged only after the queue commit below.
            replace_bytes(path, dumps(stored) + b"\n", "none")

        keys = {task["task_id"]: task.get("dedup_key") for task in validated}

        def body(txn: _Txn) -> list[EnqueueResult]:
            return [self._resolve(txn, task_id, keys[task_id]) for task_id in ids]

        results = self._transaction(ts, body)
        return results

    def _try_lock(self) -> bool:
        """Take the queue lock if nobody holds it; never waits."""
        try:
            self._lock.acquire(timeout=0)
        except LockTimeout:
            return False
        return True

    def _resolve(self, txn: _Txn, task_id: str,
                 dedup_key: str | None = None) -> EnqueueResult:
        tasks = txn.state.tasks
        if task_id in tasks:
            return EnqueueResult(dict(tasks[task_id]), True)
        existing = txn.dedup.get(task_id)
        if existing is None:
            reason_file = self.home.inbox_rejected / f"{task_id}.reason"
            if reason_file.exists():
                raise UsageError(reason_file.read_text().strip())
            # Drained by another holder: it was deduplicated, or it already finished.
            found = self.get(task_id)
            if found is not None:
                return EnqueueResult(found, True)
            # Another holder's drain deduplicated it onto a live task: return that one.
            holder = next((t for t in tasks.values()
                           if dedup_key and t.get("dedup_key") == dedup_key), None)
            if holder is not None:
                return EnqueueResult(dict(holder), False)
            raise NotFound(f"task {task_id} vanished from the inbox without trace")
        return EnqueueResult(dict(tasks[existing]), False)

    def _check_backpressure(self, limit: int, adding: int) -> None:
        queued = self._load().queued_count()
        if queued + adding > limit:
            raise Backpressure(
                f"backpressure: {queued} tasks queued, max_queue_depth is {limit}; retry later"
                " or pass --force")

    def ingest(self, *, now: float | None = None) -> int:
        """Drain the inbox into the queue; returns how many tasks were added."""
        def body(txn: _Txn) -> int:
            return sum(1 for e in txn.events if e["type"] == "task_enqueued")
        count: int = self._transaction(now, body)
        return count

    # ------------------------------------------------------------------ workers
    def claim(self, worker_id: str, *, types: Iterable[str] | None = None,
              now: float | None = None,
              events_out: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """Atomically take the best runnable task for ``worker_id``; None when none is.

        Best: highest priority, then oldest ``created_at``, then task_id. Runnable: queued,
        ``not_before`` passed, every ``depends_on`` finished, its type among ``types`` (when
        given) and not paused. The task becomes ``running`` with ``attempts`` + 1.
        With ``events_out`` the committed transaction's events are handed to the caller,
        who appends them (after the commit, e.g. together with its own) instead.
        """
        wanted = set(types) if types is not None else None
        ts = clock.now() if now is None else now
        paused = paused_types(self._control(), ts)

        def body(txn: _Txn) -> dict[str, Any] | None:
            return self._claim_in(txn, worker_id, wanted, paused)

        claimed: dict[str, Any] | None = self._transaction(ts, body, events_out=events_out)
        return claimed

    def complete_and_claim(self, task_id: str, worker_id: str, *, exit_code: int = 0,
                           result: dict[str, Any] | None = None,
                           types: Iterable[str] | None = None, now: float | None = None,
                           events_out: list[dict[str, Any]] | None = None,
                           ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """:meth:`complete` then :meth:`claim` for the same worker, in one transaction: one
        lock hold, one history append, one queue publish. Returns ``(completed task, newly
        claimed task or None)``. Exactly as atomic and durable as the two calls in a row
        (the history record of the completion is appended before the queue revision that
        drops the task and marks the next one running is published); a crash after the
        commit leaves the claimed task running under ``worker_id``, which is reclaimed
        like any task of a dead worker. Raises like :meth:`complete` (nothing is claimed
        then)."""
        wanted = set(types) if types is not None else None
        ts = clock.now() if now is None else now
        paused = paused_types(self._control(), ts)

        def body(txn: _Txn) -> tuple[dict[str, Any], dict[str, Any] | None]:
            task = self._running(txn, task_id, worker_id)
            task.update(exit_code=exit_code, last_error=None)
            self._finish(txn, task, "completed", "completed", result)
            txn.event("task_completed", f"completed on attempt {task['attempts']}", task,
                      exit_code=exit_code)
            return dict(task), self._claim_in(txn, worker_id, wanted, paused)

        out: tuple[dict[str, Any], dict[str, Any] | None] = self._transaction(
            ts, body, events_out=events_out)
        return out

    def _claim_in(self, txn: _Txn, worker_id: str, wanted: set[str] | None,
                  paused: Container[str]) -> dict[str, Any] | None:
        """The claim step of a transaction (see :meth:`claim`)."""
        tasks = txn.state.tasks
        best: dict[str, Any] | None = None
        best_key: tuple[int, str, str] | None = None
        now_iso = clock.iso(txn.now)
        for task in tasks.values():
            if not is_runnable(task, tasks, now_iso, paused, wanted):
                continue
            key = (PRIORITY_RANK[task["priority"]], task["created_at"] or "",
                   task["task_id"])
            if best_key is None or key < best_key:
                best, best_key = task, key
        if best is None:
            return None
        best.update(status="running", worker_id=worker_id, started_at=now_iso,
                    completed_at=None, attempts=best["attempts"] + 1, exit_code=None)
        txn.touch(best)
        txn.event("task_claimed", f"attempt {best['attempts']}/{best['max_attempts']}",
                  best, attempt=best["attempts"])
        return dict(best)

    def _control(self) -> dict[str, Any]:
        """control.json, re-read only when its inode, size or mtime changed (it is
        published by rename, so a change always shows there)."""
        try:
            st = os.stat(self.home.control_file)
            sig: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            sig = None
        cached = self._control_cache
        if cached is not None and cached[0] == sig and sig is not None:
            return cached[1]
        state = read_control(self.home)
        self._control_cache = (sig, state)
        return state

    def _running(self, txn: _Txn, task_id: str, worker_id: str | None) -> dict[str, Any]:
        task = txn.state.tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id} is not live (see `harness task show {task_id}`)")
        if task["status"] != "running":
            raise InvalidTransition(f"task {task_id} is {task['status']}, not running")
        if worker_id is not None and task.get("worker_id") != worker_id:
            raise InvalidTransition(f"task {task_id} is held by {task.get('worker_id')}, "
                                    f"not {worker_id}")
        return task

    def _history_record(self, txn: _Txn, task: dict[str, Any], *, final: bool, outcome: str,
                        result: dict[str, Any] | None = None) -> None:
        record = dict(task)
        record.update(final=final, outcome=outcome, recorded_at=clock.iso(txn.now),
                      result=None if result is None else redact(result))
        # History is a record for people: mask secrets there (the live task and its dead
        # letter keep the exact text, which a retry needs).
        for key in ("last_error", "description"):
            if isinstance(record.get(key), str):
                record[key] = redact_text(record[key])
        txn.history.append(record)

    def _finish(self, txn: _Txn, task: dict[str, Any], status: str, outcome: str,
                result: dict[str, Any] | None = None) -> None:
        """Move a task out of the live queue into history (and dead letters if failed),
        cancelling live tasks that depend on it unless it completed."""
        task.update(status=status, completed_at=clock.iso(txn.now),
                    updated_at=clock.iso(txn.now))
        self._history_record(txn, task, final=True, outcome=outcome, result=result)
        if status == "failed":
            txn.dead_letters.append(dict(task))
        txn.state.remove(task["task_id"])
        txn.changed = True
        if status != "completed":
            for other in list(txn.state.tasks.values()):
                if task["task_id"] in (other.get("depends_on") or ()) \
                        and other["status"] == "queued":
                    other["last_error"] = f"dependency {task['task_id']} ended {status}"
                    self._finish(txn, other, "cancelled", "dependency_failed")
                    txn.event("task_cancelled", other["last_error"], other, severity="warning")

    def complete(self, task_id: str, worker_id: str, *, exit_code: int = 0,
                 result: dict[str, Any] | None = None,
                 now: float | None = None) -> dict[str, Any]:
        """Mark a running task completed: it leaves the queue for a final history record.

        Raises NotFound / InvalidTransition when the task is not running under
        ``worker_id`` (e.g. it was reclaimed meanwhile); nothing changes then.
        """
        def body(txn: _Txn) -> dict[str, Any]:
            task = self._running(txn, task_id, worker_id)
            task.update(exit_code=exit_code, last_error=None)
            self._finish(txn, task, "completed", "completed", result)
            txn.event("task_completed", f"completed on attempt {task['attempts']}", task,
                      exit_code=exit_code)
            return dict(task)
        done: dict[str, Any] = self._transaction(now, body)
        return done

    def backoff(self, attempts: int, cfg_values: dict[str, Any]) -> float:
        """Retry delay after ``attempts`` attempts: exponential, with jitter, capped (the
        cap applies last, so no retry is ever scheduled beyond ``retry_backoff_max_s``)."""
        base = float(cfg_values["retry_backoff_base_s"])
        cap = float(cfg_values["retry_backoff_max_s"])
        delay = min(base * (2 ** max(attempts - 1, 0)), cap)
        jitter = float(cfg_values["retry_jitter"])
        return float(min(delay * random.uniform(1 - jitter, 1 + jitter), cap))

    def fail(self, task_id: str, worker_id: str | None, *, error: str,
             exit_code: int | None = None, retry: bool = True,
             result: dict[str, Any] | None = None, outcome: str = "failed",
             now: float | None = None) -> dict[str, Any]:
        """Record a failed attempt of a running task.

        With attempts left and ``retry``, the task is queued again with ``not_before`` set
        by :meth:`backoff` (history gets a non-final record). Otherwise it becomes
        ``failed``: a final history record and a dead letter. ``worker_id`` None skips the
        owner check (used by reclaim). Returns the task as it now is.
        """
        cfg = load_system(self.home).values

        def body(txn: _Txn) -> dict[str, Any]:
            task = self._running(txn, task_id, worker_id)
            task.update(exit_code=exit_code, last_error=error[:4096])
            if retry and task["attempts"] < task["max_attempts"] \
                    and not task.get("cancel_requested"):
                self._history_record(txn, dict(task, status="failed"), final=False,
                                     outcome=outcome, result=result)
                delay = self.backoff(task["attempts"], cfg)
                task.update(status="queued", worker_id=None,
                            not_before=clock.iso(txn.now + delay))
                txn.touch(task)
                txn.event("task_retry_scheduled", f"attempt {task['attempts']} {outcome}: "
                          f"{error[:200]}; retry in {delay:.1f}s", task, severity="warning",
                          attempt=task["attempts"], delay_s=round(delay, 3), outcome=outcome)
            elif task.get("cancel_requested"):
                self._finish(txn, task, "cancelled", "cancelled", result)
                txn.event("task_cancelled", "cancelled while running", task)
            else:
                self._finish(txn, task, "failed", outcome, result)
                txn.event("task_failed", f"failed after {task['attempts']} attempt(s): "
                          f"{error[:200]}", task, severity="error", outcome=outcome)
                txn.event("task_dead_lettered", "moved to dead letters", task,
                          severity="warning")
            return dict(task)
        out: dict[str, Any] = self._transaction(now, body)
        return out

    def release(self, task_id: str, worker_id: str, *, reason: str,
                now: float | None = None) -> dict[str, Any]:
        """Hand a running task back to the queue without spending an attempt (graceful
        worker shutdown). Returns the queued task."""
        def body(txn: _Txn) -> dict[str, Any]:
            task = self._running(txn, task_id, worker_id)
            if task.get("cancel_requested"):
                self._finish(txn, task, "cancelled", "cancelled")
                txn.event("task_cancelled", "cancelled while running", task)
                return dict(task)
            self._history_record(txn, dict(task, status="queued"), final=False,
                                 outcome="released")
            task.update(status="queued", worker_id=None, attempts=task["attempts"] - 1,
                        last_error=reason)
            txn.touch(task)
            txn.event("task_released", reason, task)
            return dict(task)
        out: dict[str, Any] = self._transaction(now, body)
        return out

    @overload
    def reclaim(self, task_id: str, *, reason: str, worker_id: None = None,
                now: float | None = None) -> dict[str, Any]: ...
    @overload
    def reclaim(self, task_id: str, *, reason: str, worker_id: str,
                now: float | None = None) -> dict[str, Any] | None: ...

    def reclaim(self, task_id: str, *, reason: str, worker_id: str | None = None,
                now: float | None = None) -> dict[str, Any] | None:
        """Take a running task back from a worker proven dead: the attempt counts, so it is
        queued again or dead-lettered exactly like a failure (``outcome`` reclaimed).

        With ``worker_id`` (the owner the caller proved dead), the check is made under the
        queue lock: unless the task is still ``running`` under that worker, nothing changes
        and None is returned (it finished, or was requeued and claimed by another worker
        since the caller looked). Without ``worker_id`` there is no owner check, and a task
        that is not running raises NotFound / InvalidTransition as :meth:`fail` does.
        """
        if worker_id is None:
            return self.fail(task_id, None, error=f"reclaimed: {reason}",
                             outcome="reclaimed", now=now)
        try:
            return self.fail(task_id, worker_id, error=f"reclaimed: {reason}",
                             outcome="reclaimed", now=now)
        except (NotFound, InvalidTransition):
            return None

    # ------------------------------------------------------------------ operators
    def cancel(self, task_id: str, *, reason: str = "cancelled by operator",
               now: float | None = None) -> dict[str, Any]:
        """Cancel a live task. Queued: finished at once (``cancelled``). Running: sets
        ``cancel_requested``; its worker stops it and records the cancellation."""
        def body(txn: _Txn) -> dict[str, Any]:
            task = txn.state.tasks.get(task_id)
            if task is None:
                raise NotFound(f"task {task_id} is not live; only queued or running tasks "
                               "can be cancelled")
            if task["status"] == "queued":
                task["last_error"] = reason
                self._finish(txn, task, "cancelled", "cancelled")
                txn.event("task_cancelled", reason, task)
            elif not task.get("cancel_requested"):
                task["cancel_requested"] = True
                txn.touch(task)
                txn.event("task_cancel_requested", reason, task)
            return dict(task)
        out: dict[str, Any] = self._transaction(now, body)
        return out

    def reprioritize(self, task_id: str, priority: str, *,
                     now: float | None = None) -> dict[str, Any]:
        """Change the priority of a live task (claims pick it up at once)."""
        check_priority(priority)

        def body(txn: _Txn) -> dict[str, Any]:
            task = txn.state.tasks.get(task_id)
            if task is None:
                raise NotFound(f"task {task_id} is not live")
            old = task["priority"]
            if old != priority:
                task["priority"] = priority
                txn.touch(task)
                txn.event("task_reprioritized", f"{old} -> {priority}", task, old=old,
                          new=priority)
            return dict(task)
        out: dict[str, Any] = self._transaction(now, body)
        return out

    def requeue_dead(self, task_id: str, *, reset_attempts: bool = True,
                     now: float | None = None) -> dict[str, Any]:
        """Move a dead letter back into the queue as a fresh queued task (attempts reset,
        ``not_before`` cleared); the dead-letter file is removed after the queue commit."""
        check_task_id(task_id)

        def body(txn: _Txn) -> dict[str, Any]:
            path = self.home.dead_letter(task_id)
            try:
                task = read_json(path)
            except FileNotFoundError:
                raise NotFound(f"no dead letter {task_id} ({path})") from None
            if task_id in txn.state.tasks:
                raise InvalidTransition(f"task {task_id} is already live")
            key = task.get("dedup_key")
            holder = next((t["task_id"] for t in txn.state.tasks.values()
                           if key and t.get("dedup_key") == key), None)
            if holder is not None:
                raise InvalidTransition(f"dedup_key {key!r} of {task_id} is held by live task "
                                        f"{holder}; cancel or finish it first")
            task.update(status="queued", worker_id=None, not_before=None, started_at=None,
                        completed_at=None, cancel_requested=False, exit_code=None)
            if reset_attempts:
                task["attempts"] = 0
            txn.state.tasks[task_id] = task
            txn.touch(task)
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

        def body(txn: _Txn) -> list[str]:
            removed = [t for t in ids if self.home.dead_letter(t).exists()]
            txn.drop_dead_letters.extend(removed)
            if removed:
                txn.event("dlq_purged", f"purged {len(removed)} dead letter(s)",
                          task_ids=removed[:100], count=len(removed))
            return removed
        out: list[str] = self._transaction(None, body, drain=False)
        return out

    # ------------------------------------------------------------------ reads
    def live_tasks(self) -> list[dict[str, Any]]:
        """Queued and running tasks, in file order (a consistent snapshot, no lock)."""
        return [dict(t) for t in self._load().tasks.values()]

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The task as live, else its dead letter, else its newest final history record;
        None when unknown. The history lookup streams the file."""
        live = self._load().tasks.get(task_id)
        if live is not None:
            return dict(live)
        dead = self.home.dead_letter(task_id)
        if dead.exists():
            try:
                return dict(read_json(dead))
            except FileNotFoundError:
                pass
        found = None
        for _, record in iter_jsonl(self.home.history_file):
            if record and record.get("task_id") == task_id and record.get("final"):
                found = record
        return found

    def history_of(self, task_id: str, *, archives: bool = False) -> list[dict[str, Any]]:
        """Every history record of ``task_id`` in file order ([] when none). With
        ``archives``, the records in the janitor's ``task-history.N.jsonl.gz`` come first,
        oldest archive first (this decompresses every archive: slow when they are big)."""
        older: list[dict[str, Any]] = []
        if archives:
            needle = [orjson.dumps(task_id)]
            for archive in reversed(jsonl_archives(self.home.history_file)):
                older.extend(r for r in scan_jsonl_gz(archive, needle)
                             if r.get("task_id") == task_id)
        return older + [r for _, r in iter_jsonl(self.home.history_file)
                        if r is not None and r.get("task_id") == task_id]

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
        """Counts by status and priority, oldest queued age, inbox and dead-letter sizes."""
        ts = clock.now() if now is None else now
        tasks = self._load().tasks.values()
        by_status = {"queued": 0, "running": 0}
        by_priority = {p: {"queued": 0, "running": 0} for p in PRIORITIES}
        oldest: str | None = None
        for t in tasks:
            by_status[t["status"]] += 1
            by_priority[t["priority"]][t["status"]] += 1
            if t["status"] == "queued" and (oldest is None or t["created_at"] < oldest):
                oldest = t["created_at"]
        try:
            inbox = sum(1 for n in os.listdir(self.home.inbox)
                        if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            inbox = 0
        try:
            dead = sum(1 for n in os.listdir(self.home.dead_letters) if n.endswith(".json"))
        except FileNotFoundError:
            dead = 0
        return {
            "live": len(self._load().tasks), "by_status": by_status,
            "by_priority": by_priority, "inbox_pending": inbox, "dead_letters": dead,
            "oldest_queued_at": oldest,
            "oldest_queued_age_s": round(ts - clock.parse_iso(oldest), 3) if oldest else None,
            "revision": self._load().revision,
        }
