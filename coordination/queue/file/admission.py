"""Producers of the file queue: ``enqueue``, ``enqueue_batch``, the lock-free inbox
(``submit``) and its group commit (every transaction drains it first), with the shared
admission rules: dedup, dependencies, cycles (docs/coordination.md, "inbox/", "Enqueue
paths")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ... import clock
from ...config import load_system, load_worker_types
from ...errors import (
    Backpressure,
    CorruptFileError,
    NotFound,
    UsageError,
)
from ...store import (
    dumps,
    iter_jsonl,
    jsonl_archives,
    read_json,
    replace_bytes,
    scan_jsonl_gz,
)
from ...tasks import REQUEST_FIELDS, new_task
from .. import rules
from ..contract import EnqueueResult
from .publisher import Publisher
from .txn import Txn


class Admission(Publisher):
    """Admission of new tasks for :class:`~.backend.FileQueue`."""

    def submit(self, request: dict[str, Any], *, now: float | None = None,
               durable: bool = False) -> str:
        """Validate ``request`` and publish it in the inbox without taking the queue lock.
        Returns the task id; the task is admitted by the next queue operation of any
        process. ``durable`` fsyncs the inbox file (when nothing else acknowledges it)."""
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

    def _drain_inbox(self, txn: Txn) -> None:
        names = self._inbox_names()
        if not names:
            return
        cfg = load_system(self.home)
        types = load_worker_types(self.home)
        accepted: list[tuple[dict[str, Any], Path | None]] = []
        for name in names:
            path = self.home.inbox / name
            stem = name[:-5]
            if stem in txn.state:
                txn.inbox_done.append(path)  # committed before a crash; unlink is pending
                continue
            try:
                request = read_json(path)
                if isinstance(request, dict) and "task_id" not in request:
                    request["task_id"] = stem
                task = new_task(request, worker_types=types, limits=cfg.values, now=txn.now,
                                where=str(path))
                if task["task_id"] != stem:
                    raise UsageError(f"{path}: task_id {task['task_id']!r} differs from the "
                                     "file name")
            except FileNotFoundError:
                continue
            except (CorruptFileError, UsageError) as exc:
                self._reject(txn, path, str(exc))
                continue
            accepted.append((task, path))
        self._admit(txn, accepted)

    def _reject(self, txn: Txn, path: Path, reason: str) -> None:
        target = self.home.inbox_rejected / path.name
        try:
            replace_bytes(target.with_suffix(".reason"), reason.encode() + b"\n", "none")
            os.replace(path, target)
        except FileNotFoundError:
            return
        txn.event("inbox_rejected", reason, severity="warning", file=str(target))

    def _admit(self, txn: Txn, batch: list[tuple[dict[str, Any], Path | None]]) -> None:
        """Add validated new tasks: dedup, dependency and cycle checks, then queue them.
        A task from an inbox file (path given) that fails a check is rejected into
        ``inbox/rejected/``; a direct request (path None) raises UsageError, which aborts
        the whole transaction (a batch is all-or-nothing)."""
        state = txn.state
        group_ids = {t["task_id"] for t, _ in batch}
        unknown = {d for t, _ in batch for d in t["depends_on"]
                   if d not in state and d not in group_ids
                   and state.finished.get(d) != "completed"}
        completed = self._completed_ids(unknown) if unknown else set()
        completed.update(d for t, _ in batch for d in t["depends_on"]
                         if state.finished.get(d) == "completed")
        sources: dict[str, Path | None] = {}
        for task, path in batch:
            if task["task_id"] in state:
                raise UsageError(f"task id {task['task_id']} is already live")
            key = task.get("dedup_key")
            holder_id = state.by_dedup.get(key) if key else None
            if holder_id is not None:
                existing = txn.get(holder_id) or {"task_id": holder_id}
                txn.dedup[task["task_id"]] = holder_id
                if path is not None:
                    txn.inbox_done.append(path)
                txn.event("task_deduplicated", f"dedup_key {key} is held by {holder_id}",
                          existing, duplicate_task_id=task["task_id"])
                continue
            missing = [d for d in task["depends_on"]
                       if d not in state and d not in group_ids and d not in completed]
            if missing:
                reason = (f"{path or 'request'}: depends_on names unknown or not-completed "
                          f"task(s): {', '.join(missing)}")
                if path is None:
                    raise UsageError(reason)
                self._reject(txn, path, reason)
                group_ids.discard(task["task_id"])
                continue
            txn.put(task, touch=False)
            sources[task["task_id"]] = path
            if path is not None:
                txn.inbox_done.append(path)
            txn.event("task_enqueued", f"{task['priority']} task queued", task,
                      priority=task["priority"], worker_type=task["worker_type"])
        if txn.dedup:
            # A request of this batch that names a deduplicated one depends on the live
            # task that holds its dedup_key (the duplicate's id never exists).
            for task_id in sources:
                task = txn.puts[task_id]
                if any(d in txn.dedup for d in task["depends_on"]):
                    task["depends_on"] = list(dict.fromkeys(
                        txn.dedup.get(d, d) for d in task["depends_on"]))
                    txn.put(task, touch=False)
        rejected = {t["task_id"] for t, _ in batch} - set(sources) - set(txn.dedup)
        # Only a new task can close a cycle; every cycle goes, and with it whatever new
        # task depends on a rejected one (it would otherwise run at once).
        while any(txn.puts[t]["depends_on"] for t in sources):
            cycle = rules.find_cycle(list(sources), state.deps_of)
            if not cycle:
                break
            reason = f"depends_on forms a cycle: {' -> '.join(cycle)}"
            for task_id in dict.fromkeys(cycle):
                if task_id in sources:
                    self._unadmit(txn, task_id, sources.pop(task_id), reason)
                    rejected.add(task_id)
        while rejected:
            orphans = [tid for tid in sources if rejected & set(txn.puts[tid]["depends_on"])]
            if not orphans:
                break
            for task_id in orphans:
                deps = sorted(rejected & set(txn.puts[task_id]["depends_on"]))
                self._unadmit(txn, task_id, sources.pop(task_id),
                              f"depends_on names rejected task(s): {', '.join(deps)}")
                rejected.add(task_id)

    def _unadmit(self, txn: Txn, task_id: str, path: Path | None, reason: str) -> None:
        """Take back a task admitted earlier in this transaction and reject its request
        (a direct request: UsageError, which aborts the whole transaction)."""
        if path is None:
            raise UsageError(f"request: {reason}")
        txn.puts.pop(task_id, None)
        txn.state.remove(task_id, None)
        txn.inbox_done.remove(path)
        txn.events = [e for e in txn.events if e["task_id"] != task_id]
        self._reject(txn, path, f"{path}: {reason}")

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

    def enqueue(self, request: dict[str, Any], *, force: bool = False,
                now: float | None = None) -> EnqueueResult:
        """Add one task and return once it is durable (see the port)."""
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

        def direct(txn: Txn) -> list[EnqueueResult]:
            self._admit(txn, [(dict(task), None) for task in validated])
            return [self._resolve(txn, task_id) for task_id in ids]
        results: list[EnqueueResult] = self._transaction(ts, direct)
        return results

    def _resolve(self, txn: Txn, task_id: str) -> EnqueueResult:
        task = txn.get(task_id)
        if task is not None:
            return EnqueueResult(dict(task), True)
        holder = txn.dedup.get(task_id)
        if holder is not None:
            return EnqueueResult(dict(txn.get(holder) or {"task_id": holder}), False)
        raise NotFound(f"task {task_id} vanished during its own enqueue")

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

        def body(txn: Txn) -> int:
            return sum(1 for e in txn.events if e["type"] == "task_enqueued")
        count: int = self._transaction(now, body, lock_timeout=timeout)
        return count
