"""Admission of new tasks, shared by every backend: this host's inbox (create-task.sh's
path, docs/coordination.md "Inbox") and the checks a new task passes before it is queued
(dedup, dependencies, cycles).

The inbox is a per-host directory whatever the backend: :func:`submit` publishes a request
file there without touching the queue, and the next transaction of any process on this
host drains it (:func:`drain_inbox`). A request that fails a check is moved to
``inbox/rejected/`` with a ``.reason`` file beside it; a direct request (an enqueue) that
fails raises UsageError, which aborts its whole transaction (a batch is all-or-nothing).

A backend's transaction object provides what :class:`AdmitTxn` names; its ``state`` is the
live queue as that transaction sees it (its own uncommitted puts included).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..config import load_system, load_worker_types
from ..errors import CorruptFileError, UsageError
from ..events import Event
from ..paths import Home
from ..store import dumps, read_json, replace_bytes
from ..tasks import REQUEST_FIELDS, Task, new_task, stored_task
from . import rules


class LiveView(Protocol):
    """The live queue as a transaction sees it."""

    finished: Any  # task_id -> final status, for ids the backend remembers ({}: none)
    by_dedup: Any  # dedup_key -> task_id of the live holder (``.get``)

    def __contains__(self, task_id: object) -> bool: ...
    def deps_of(self, task_id: str) -> Iterable[str] | None: ...
    def remove(self, task_id: str, final_status: str | None) -> None: ...


class AdmitTxn(Protocol):
    """What admission needs of a backend's open transaction."""

    now: float
    puts: dict[str, Task]
    dedup: dict[str, str]
    inbox_done: list[Path]
    events: list[Event]

    @property
    def state(self) -> Any: ...
    def get(self, task_id: str) -> Task | None: ...
    def put(self, task: Task, *, touch: bool = True) -> None: ...
    def event(self, event_type: str, message: str, task: Task | None = None,
              severity: str = "info", **data: Any) -> None: ...


def inbox_names(home: Home) -> list[str]:
    """The pending request files of this host's inbox, sorted ([] when none)."""
    try:
        with os.scandir(home.inbox) as entries:
            return sorted(e.name for e in entries
                          if e.name.endswith(".json") and not e.name.startswith(".")
                          and e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return []


def submit(home: Home, request: dict[str, Any], *, now: float, durable: bool) -> str:
    """Validate ``request`` and publish it in the inbox; returns the task id."""
    cfg = load_system(home)
    task = new_task(dict(request), worker_types=load_worker_types(home),
                    limits=cfg.values, now=now, where="request")
    fields: Mapping[str, Any] = task  # REQUEST_FIELDS are names, not literal keys
    stored = {k: fields[k] for k in REQUEST_FIELDS if fields.get(k) is not None}
    path = home.inbox / f"{task['task_id']}.json"
    if path.exists():
        raise UsageError(f"task id {task['task_id']} is already pending in the inbox")
    replace_bytes(path, dumps(stored) + b"\n", "fsync" if durable else "none")
    return str(task["task_id"])


def drain_inbox(home: Home, txn: AdmitTxn,
                completed_ids: Callable[[set[str]], set[str]]) -> None:
    """Admit every pending inbox request in ``txn`` (see :func:`admit`). A file whose task
    is live already was committed before a crash: only its unlink was pending."""
    names = inbox_names(home)
    if not names:
        return
    cfg = load_system(home)
    types = load_worker_types(home)
    accepted: list[tuple[Task, Path | None]] = []
    for name in names:
        path = home.inbox / name
        stem = name[:-5]
        if stem in txn.state:
            txn.inbox_done.append(path)
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
            reject(home, txn, path, str(exc))
            continue
        accepted.append((task, path))
    admit(home, txn, accepted, completed_ids)


def reject(home: Home, txn: AdmitTxn, path: Path, reason: str) -> None:
    """Move an inbox request to ``inbox/rejected/`` with its reason beside it."""
    target = home.inbox_rejected / path.name
    try:
        replace_bytes(target.with_suffix(".reason"), reason.encode() + b"\n", "none")
        os.replace(path, target)
    except FileNotFoundError:
        return
    txn.event("inbox_rejected", reason, severity="warning", file=str(target))


def admit(home: Home, txn: AdmitTxn, batch: list[tuple[Task, Path | None]],
          completed_ids: Callable[[set[str]], set[str]]) -> None:
    """Add validated new tasks: dedup, dependency and cycle checks, then queue them.
    A task from an inbox file (path given) that fails a check is rejected into
    ``inbox/rejected/``; a direct request (path None) raises UsageError, which aborts
    the whole transaction (a batch is all-or-nothing). ``completed_ids(ids)`` returns which
    of ``ids`` finished ``completed`` (the backend's history)."""
    state = txn.state
    group_ids = {t["task_id"] for t, _ in batch}
    unknown = {d for t, _ in batch for d in t["depends_on"]
               if d not in state and d not in group_ids
               and state.finished.get(d) != "completed"}
    completed = completed_ids(unknown) if unknown else set()
    completed.update(d for t, _ in batch for d in t["depends_on"]
                     if state.finished.get(d) == "completed")
    sources: dict[str, Path | None] = {}
    for task, path in batch:
        if task["task_id"] in state:
            raise UsageError(f"task id {task['task_id']} is already live")
        key = task.get("dedup_key")
        holder_id = state.by_dedup.get(key) if key else None
        if holder_id is not None:
            # A holder gone from the view is known by its id only.
            existing = txn.get(holder_id) or stored_task({"task_id": holder_id})
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
            reject(home, txn, path, reason)
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
                _unadmit(home, txn, task_id, sources.pop(task_id), reason)
                rejected.add(task_id)
    while rejected:
        orphans = [tid for tid in sources if rejected & set(txn.puts[tid]["depends_on"])]
        if not orphans:
            break
        for task_id in orphans:
            deps = sorted(rejected & set(txn.puts[task_id]["depends_on"]))
            _unadmit(home, txn, task_id, sources.pop(task_id),
                     f"depends_on names rejected task(s): {', '.join(deps)}")
            rejected.add(task_id)


def _unadmit(home: Home, txn: AdmitTxn, task_id: str, path: Path | None, reason: str) -> None:
    """Take back a task admitted earlier in this transaction and reject its request
    (a direct request: UsageError, which aborts the whole transaction)."""
    if path is None:
        raise UsageError(f"request: {reason}")
    txn.puts.pop(task_id, None)
    txn.state.remove(task_id, None)
    txn.inbox_done.remove(path)
    txn.events = [e for e in txn.events if e["task_id"] != task_id]
    reject(home, txn, path, f"{path}: {reason}")
