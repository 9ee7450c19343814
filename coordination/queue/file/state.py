"""The live queue held in memory by each process of the file backend.

Guarantees
- Every change goes through :meth:`LiveState.put` or :meth:`LiveState.remove`, which keep
  the indexes in step, so each costs O(log n) and no operation scans the backlog.
- Tasks are kept as their compact JSON (the exact bytes the snapshot publishes) plus a slim
  :class:`Meta` record for the indexes: about 0.7 kB a task, so 100,000 queued tasks fit in
  well under 100 MB. A task dict is parsed only when an operation needs it.
- The indexes are hints checked on use: a heap entry that no longer matches its task is
  dropped (lazy deletion), and a task found blocked or not yet due is filed again where it
  belongs, so an index can never make a task unclaimable.
"""

from __future__ import annotations

import heapq
import sys
from collections import OrderedDict
from collections.abc import Container, Iterator
from typing import Any

import orjson

from ...store import dumps
from ...tasks import PRIORITIES, PRIORITY_RANK, Task, stored_task
from ..rules import ClaimKey

#: How many finished task ids (and their final status) a process remembers, so that a
#: dependency on a task that just finished needs no history scan.
RECENT_FINISHED = 50_000


class Meta:
    """What the indexes need of one live task."""

    __slots__ = (
        "created_at",
        "dedup_key",
        "deps",
        "not_before",
        "priority",
        "status",
        "updated_at",
        "worker_id",
        "wtype",
    )

    def __init__(self, task: Task) -> None:
        # Interned: a handful of distinct values, shared by every task instead of a copy each.
        self.status: str = sys.intern(task["status"])
        self.priority: str = sys.intern(task["priority"])
        self.created_at: str = task.get("created_at") or ""
        self.wtype: str = sys.intern(task.get("worker_type") or "default")
        self.not_before: str | None = task.get("not_before")
        deps = task.get("depends_on") or ()
        self.deps: tuple[str, ...] = tuple(deps) if deps else ()
        self.dedup_key: str | None = task.get("dedup_key")

    def key(self, task_id: str) -> ClaimKey:
        return (PRIORITY_RANK[self.priority], self.created_at, task_id)


class LiveState:
    """The live tasks at revision :attr:`rev`, with claim indexes."""

    def __init__(self, rev: int = 0) -> None:
        self.rev = rev
        self.blobs: dict[str, bytes] = {}  # insertion order is the snapshot's task order
        self.meta: dict[str, Meta] = {}
        self.counts: dict[tuple[str, str], int] = {
            (s, p): 0 for s in ("queued", "running") for p in PRIORITIES}
        self.by_dedup: dict[str, str] = {}
        self.ready: dict[str, list[ClaimKey]] = {}  # worker type -> heap of claim keys
        self.delayed: list[tuple[str, str]] = []  # heap of (not_before, task_id)
        self.waiters: dict[str, set[str]] = {}  # live dependency -> queued tasks waiting
        self.oldest: list[tuple[str, str]] = []  # heap of (created_at, task_id), queued
        self.finished: OrderedDict[str, str] = OrderedDict()  # task_id -> final status
        self.queued_by_type: dict[str, int] = {}  # worker type -> queued tasks
        # Queued tasks with dependencies or a not_before: all that runnable counts and
        # next_due look at (a task leaves it when it stops being queued).
        self.held: set[str] = set()
        self.running: set[str] = set()  # running tasks (what expired_leases looks at)

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return len(self.meta)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.meta

    def task(self, task_id: str) -> Task | None:
        """A fresh dict of the live task (changing it changes nothing until :meth:`put`)."""
        blob = self.blobs.get(task_id)
        if blob is None:
            return None
        return stored_task(orjson.loads(blob))

    def tasks(self) -> Iterator[Task]:
        for blob in list(self.blobs.values()):
            yield orjson.loads(blob)

    def ids_with_status(self, status: str) -> list[str]:
        return [tid for tid, m in self.meta.items() if m.status == status]

    def queued_count(self) -> int:
        return sum(n for (s, _), n in self.counts.items() if s == "queued")

    def oldest_queued(self) -> str | None:
        """``created_at`` of the oldest queued task (O(1) amortised)."""
        heap = self.oldest
        while heap:
            created, task_id = heap[0]
            m = self.meta.get(task_id)
            if m is not None and m.status == "queued" and m.created_at == created:
                return created
            heapq.heappop(heap)
        return None

    def deps_of(self, task_id: str) -> tuple[str, ...] | None:
        m = self.meta.get(task_id)
        return None if m is None else m.deps

    def runnable_by_type(self, now_iso: str, paused: Container[str]) -> dict[str, int]:
        """Queued tasks that a claim could take now, per worker type (types with none, and
        paused types, are left out). O(queued tasks with dependencies or a not_before): the
        queued count per type, less those of them held back now."""
        out = {wtype: n for wtype, n in self.queued_by_type.items()
               if n and wtype not in paused}
        meta = self.meta
        for task_id in self.held:
            m = meta[task_id]
            if m.wtype not in out:
                continue
            if (m.not_before is not None and m.not_before > now_iso) \
                    or any(d in meta for d in m.deps):
                out[m.wtype] -= 1
        return {wtype: n for wtype, n in out.items() if n}

    # ------------------------------------------------------------------ changes
    def put(self, task: Task, blob: bytes | None = None) -> None:
        """Insert or replace a live task (status queued or running)."""
        task_id = task["task_id"]
        old = self.meta.get(task_id)
        if old is not None:
            self._uncount(task_id, old)
            if old.dedup_key and self.by_dedup.get(old.dedup_key) == task_id:
                del self.by_dedup[old.dedup_key]
        m = Meta(task)
        self.meta[task_id] = m
        self.blobs[task_id] = dumps(task) if blob is None else blob
        self.counts[(m.status, m.priority)] += 1
        if m.status == "queued":
            self.queued_by_type[m.wtype] = self.queued_by_type.get(m.wtype, 0) + 1
            if m.deps or m.not_before is not None:
                self.held.add(task_id)
        elif m.status == "running":
            self.running.add(task_id)
        if m.dedup_key:
            self.by_dedup[m.dedup_key] = task_id
        self.finished.pop(task_id, None)
        if m.status == "queued":
            if old is None or old.status != "queued" or old.created_at != m.created_at:
                heapq.heappush(self.oldest, (m.created_at, task_id))
            self._file(task_id, m)

    def remove(self, task_id: str, final_status: str | None) -> None:
        """Drop a live task (it finished with ``final_status``, or was dropped by hand when
        None) and re-file the queued tasks that waited for it."""
        m = self.meta.pop(task_id, None)
        if m is None:
            return
        del self.blobs[task_id]
        self._uncount(task_id, m)
        if m.dedup_key and self.by_dedup.get(m.dedup_key) == task_id:
            del self.by_dedup[m.dedup_key]
        if final_status is not None:
            self.finished[task_id] = final_status
            if len(self.finished) > RECENT_FINISHED:
                self.finished.popitem(last=False)
        for waiter in self.waiters.pop(task_id, ()):
            wm = self.meta.get(waiter)
            if wm is not None and wm.status == "queued":
                self._file(waiter, wm)

    def _uncount(self, task_id: str, m: Meta) -> None:
        """Take ``m`` (the task's record until now) out of the counts."""
        self.counts[(m.status, m.priority)] -= 1
        if m.status == "queued":
            self.queued_by_type[m.wtype] -= 1
            self.held.discard(task_id)
        elif m.status == "running":
            self.running.discard(task_id)

    def _file(self, task_id: str, m: Meta) -> None:
        """File a queued task where it belongs: waiting on a live dependency, delayed until
        ``not_before``, or ready to claim."""
        for dep in m.deps:
            if dep in self.meta:
                self.waiters.setdefault(dep, set()).add(task_id)
                return
        if m.not_before is not None:
            heapq.heappush(self.delayed, (m.not_before, task_id))
            return
        heapq.heappush(self.ready.setdefault(m.wtype, []), m.key(task_id))

    # ------------------------------------------------------------------ claim
    def best_runnable(self, now_iso: str, wanted: Container[str] | None,
                      paused: Container[str]) -> str | None:
        """The task a claim takes now (see rules.claim_key), or None. O(log n) amortised:
        due delayed tasks move to the ready heaps, then the best valid heap top wins."""
        delayed = self.delayed
        while delayed and delayed[0][0] <= now_iso:
            nb, task_id = heapq.heappop(delayed)
            m = self.meta.get(task_id)
            if m is None or m.status != "queued" or m.not_before != nb:
                continue
            if any(d in self.meta for d in m.deps):
                self._file(task_id, m)
                continue
            heapq.heappush(self.ready.setdefault(m.wtype, []), m.key(task_id))
        best: ClaimKey | None = None
        for wtype, heap in self.ready.items():
            if (wanted is not None and wtype not in wanted) or wtype in paused:
                continue
            while heap:
                key = heap[0]
                task_id = key[2]
                m = self.meta.get(task_id)
                if m is None or m.status != "queued" or m.key(task_id) != key \
                        or m.wtype != wtype:
                    heapq.heappop(heap)
                    continue
                if (m.not_before is not None and m.not_before > now_iso) \
                        or any(d in self.meta for d in m.deps):
                    heapq.heappop(heap)
                    self._file(task_id, m)
                    continue
                break
            if heap and (best is None or heap[0] < best):
                best = heap[0]
        return None if best is None else best[2]

    def apply_commit(self, line: dict[str, Any]) -> None:
        """Apply one journal commit line (its puts, its removals) and take its revision."""
        for task in line.get("put") or ():
            self.put(task)
        for task_id, status in line.get("del") or ():
            self.remove(task_id, status)
        self.rev = int(line["rev"])

    # ------------------------------------------------------------------ snapshot
    def snapshot_parts(self) -> list[bytes]:
        """The published task lines, in order (a list of references: cheap to take under the
        lock; joining them can happen after)."""
        return list(self.blobs.values())
