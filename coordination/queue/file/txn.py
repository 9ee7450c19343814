"""One file-queue transaction: the changes it makes to the in-memory queue and what to
write and emit when it commits (:mod:`.core` runs it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...events import Event
from ...tasks import HistoryRecord, Task
from ..ops import SOURCE, queue_event
from .state import LiveState

__all__ = ["SOURCE", "Txn", "unlink_quietly"]


@dataclass
class Txn:
    """One locked section: the changes to commit and what to do after."""

    state: LiveState
    now: float
    now_iso: str
    puts: dict[str, Task] = field(default_factory=dict)
    dels: dict[str, str | None] = field(default_factory=dict)
    history: list[HistoryRecord] = field(default_factory=list)
    dead_letters: list[Task] = field(default_factory=list)
    drop_dead_letters: list[str] = field(default_factory=list)
    inbox_done: list[Path] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    dedup: dict[str, str] = field(default_factory=dict)  # new task_id -> holder task_id
    note: str | None = None  # why (a hand edit merge)

    def get(self, task_id: str) -> Task | None:
        task = self.puts.get(task_id)
        if task is not None:
            return task
        if task_id in self.dels:
            return None
        return self.state.task(task_id)

    def put(self, task: Task, *, touch: bool = True) -> None:
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

    def lock(self, task_id: str) -> Task | None:
        """The whole queue is locked already (the queue lock): :meth:`get`."""
        return self.get(task_id)

    def waiters(self, task_id: str) -> list[Task]:
        """The live tasks that wait for ``task_id`` (the state's dependency index)."""
        return [t for t in map(self.get, list(self.state.waiters.get(task_id, ())))
                if t is not None]

    @property
    def changed(self) -> bool:
        return bool(self.puts or self.dels)

    def event(self, event_type: str, message: str, task: Task | None = None,
              severity: str = "info", **data: Any) -> None:
        self.events.append(queue_event(event_type, message, task, severity=severity,
                                       now=self.now, data=data))


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
