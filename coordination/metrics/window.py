"""The history window and its attempt statistics.

:class:`HistoryWindow` is the one reader of a sliding window of task-history records, used
by status, snapshots and the supervisor (:class:`AttemptWindow`, its health and circuits);
:func:`window_stats` turns a window's records into throughput, success rate, durations,
waits and tokens.

Cost bound (so that ``harness status`` and ``harness check`` stay fast on a large home):
only the newest records are read (through the queue port's history cursor; the file
backend reads backwards), until a record older than the window is met or
:data:`HISTORY_TAIL_MAX_RECORDS` records were taken; the window then says it is not
complete. (:data:`HISTORY_TAIL_MAX_BYTES` bounds what status reads in all.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from ..paths import Home
from ..tasks import HistoryRecord
from .values import as_number, ts_of

if TYPE_CHECKING:
    from ..queue import QueueBackend

T = TypeVar("T")

#: Newest bytes of task-history.jsonl that a window computation reads at most.
HISTORY_TAIL_MAX_BYTES = 8 << 20
HISTORY_TAIL_MAX_RECORDS = 20_000


class HistoryWindow(Generic[T]):
    """What ``keep`` takes from the queue's history records of a sliding window, oldest
    first: the one history-window reader of status, snapshots and the supervisor.

    Reads through the queue port's history cursor: the first :meth:`refresh` takes only the
    records of the window (at most ``max_records``, the newest: :attr:`complete` is then
    False; the file backend reads backwards from the end, so a long history costs nothing);
    later ones take only what was recorded since, and drop what left the window. A
    rotation (the cursor names another stream) starts over. ``keep`` returns what to hold
    of a record (None: nothing), so a long-lived window can hold a few fields, not records.
    """

    def __init__(self, queue: QueueBackend, keep: Callable[[HistoryRecord], T | None], *,
                 max_records: int | None = None) -> None:
        self.queue = queue
        self.keep = keep
        self.max_records = max_records
        self.records: deque[T] = deque()
        self.stamps: deque[float] = deque()  # recorded_at of each of ``records``
        self.complete = True
        self._cursor: str | None = None

    def refresh(self, since: float) -> None:
        """Read what was recorded since the last refresh; keep what is in ``[since, ...]``."""
        first = self._cursor is None
        records, cursor = self.queue.history_since(
            self._cursor, start_at=since if first else None,
            limit=self.max_records if first else None)
        # The part before the last ":" names the stream; another one: history started over.
        restarted = not first and \
            cursor.rsplit(":", 1)[0] != (self._cursor or "").rsplit(":", 1)[0]
        self._cursor = cursor
        if first:
            self.complete = self.max_records is None or len(records) < self.max_records
        new: list[tuple[float, T]] = []
        for record in records:
            stamp = ts_of(record.get("recorded_at"))
            kept = None if stamp is None else self.keep(record)
            if stamp is not None and kept is not None:
                new.append((stamp, kept))
        if first or restarted:
            new.sort(key=lambda entry: entry[0])
            self.stamps, self.records = deque(e[0] for e in new), deque(e[1] for e in new)
        else:
            self.stamps.extend(e[0] for e in new)
            self.records.extend(e[1] for e in new)
        if self.stamps and self.stamps[0] < since:
            # Concurrent writers append slightly out of order: filter, not pop from the left.
            pairs = [(t, r) for t, r in zip(self.stamps, self.records, strict=True) if t >= since]
            self.stamps, self.records = deque(p[0] for p in pairs), deque(p[1] for p in pairs)

    def between(self, since: float, until: float | None = None) -> Iterator[T]:
        """What was kept of the records recorded in ``[since, until]``."""
        for stamp, item in zip(self.stamps, self.records, strict=True):
            if stamp >= since and (until is None or stamp <= until):
                yield item


def history_window(home: Home, since: float, max_records: int = HISTORY_TAIL_MAX_RECORDS
                   ) -> HistoryWindow[HistoryRecord]:
    """The history records recorded since ``since`` (at most ``max_records``, the newest:
    ``complete`` is then False), read once through the queue port."""
    from ..queue import open_queue  # the queue package is the heaviest import; keep it local

    window: HistoryWindow[HistoryRecord] = HistoryWindow(
        open_queue(home), lambda record: record, max_records=max_records)
    window.refresh(since)
    return window


def attempt_result(record: HistoryRecord) -> str | None:
    """``completed`` or ``failed`` for a record that ends an attempt; None otherwise
    (released attempts, cancellations and dependency failures are not attempts' results)."""
    status = record.get("status")
    if status == "completed":
        return "completed"
    if status == "failed" and record.get("started_at"):
        return "failed"
    return None


def attempt_kind(record: HistoryRecord) -> tuple[bool, str] | None:
    """``(succeeded, worker_type)`` of a record that ends an attempt (:func:`attempt_result`),
    None for any other record."""
    result = attempt_result(record)
    if result is None:
        return None
    return result == "completed", str(record.get("worker_type") or "default")


class AttemptWindow(HistoryWindow[tuple[bool, str]]):
    """The attempt outcomes of a sliding window of history (the supervisor's health and
    circuits): a :class:`HistoryWindow` that holds ``(succeeded, worker_type)`` only."""

    def __init__(self, queue: QueueBackend) -> None:
        super().__init__(queue, attempt_kind)

    def counts(self, since: float, until: float | None = None) -> dict[str, list[int]]:
        """``{worker_type: [succeeded, failed]}`` for attempts recorded in [since, until]."""
        out: dict[str, list[int]] = {}
        for ok, wtype in self.between(since, until):
            pair = out.setdefault(wtype, [0, 0])
            pair[0 if ok else 1] += 1
        return out


def attempt_duration(record: HistoryRecord) -> float | None:
    """Seconds from the attempt's ``started_at`` to its ``recorded_at``."""
    start, end = ts_of(record.get("started_at")), ts_of(record.get("recorded_at"))
    if start is None or end is None:
        return None
    return max(0.0, end - start)


def queue_wait(record: HistoryRecord) -> float | None:
    """Seconds the attempt waited to be claimed: from ``created_at`` (first attempt) or its
    ``not_before`` (a retry, or a deferred first attempt) to ``started_at``."""
    started = ts_of(record.get("started_at"))
    if started is None:
        return None
    not_before = ts_of(record.get("not_before"))
    attempts = record.get("attempts")
    if isinstance(attempts, int) and attempts > 1:
        base = not_before
    else:
        created = ts_of(record.get("created_at"))
        base = created if not_before is None or created is None else max(created, not_before)
    if base is None:
        return None
    return max(0.0, started - base)


def tokens_of(record: HistoryRecord) -> float | None:
    result = record.get("result")
    if isinstance(result, dict):
        return as_number(result.get("tokens_used"))
    return None


@dataclass
class WindowStats:
    window_s: float
    completed_1m: int = 0
    failed_1m: int = 0
    completed: int = 0
    failed: int = 0
    durations: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    tokens: float = 0.0
    complete: bool = True

    @property
    def success_rate(self) -> float | None:
        total = self.completed + self.failed
        return None if total == 0 else self.completed / total

    @property
    def error_rate(self) -> float | None:
        total = self.completed + self.failed
        return None if total == 0 else self.failed / total


def window_stats(records: Iterable[HistoryRecord], now: float, window_s: float,
                 complete: bool = True) -> WindowStats:
    """Throughput, success rate, durations, waits and tokens of the attempts that ended in
    ``(now - window_s, now]`` (and the last minute for the per-minute rates)."""
    stats = WindowStats(window_s, complete=complete)
    since, minute = now - window_s, now - 60.0
    for record in records:
        recorded = ts_of(record.get("recorded_at"))
        if recorded is None or recorded < since or recorded > now + 60:
            continue
        tokens = tokens_of(record)
        if tokens is not None:
            stats.tokens += tokens
        result = attempt_result(record)
        if result is None:
            continue
        if result == "completed":
            stats.completed += 1
            stats.completed_1m += recorded >= minute
        else:
            stats.failed += 1
            stats.failed_1m += recorded >= minute
        duration = attempt_duration(record)
        if duration is not None:
            stats.durations.append(duration)
        wait = queue_wait(record)
        if wait is not None:
            stats.waits.append(wait)
    return stats
