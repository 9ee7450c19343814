"""The metrics snapshot and the health rule, computed from the coordination files.

Pure computation over the home (docs/observability.md): no long loop, no subprocess. This
module owns ``metrics-snapshots.jsonl`` (its schema, :func:`snapshot_from`, and the append,
:func:`take_snapshot`), the health rule (:func:`compute_health`, :func:`health_document`:
the supervisor publishes it as ``coordination/health.json``), the stall rule
(:func:`stall_reason`) and what they are computed from: one :func:`observe` of the home,
the history window (:class:`HistoryWindow`) and its attempt statistics. The reporting built
on top (``harness status``, ``check``, ``timeline``) lives in :mod:`daemons.reporting`.

Cost bounds (so that ``harness status`` and ``harness check`` stay fast on a large home)
- History: only the newest records are read (through the queue port's history cursor; the
  file backend reads backwards), until a record older than the window (minus a minute) is
  met or :data:`HISTORY_TAIL_MAX_RECORDS` records were taken; the result says whether the
  window was complete. (:data:`HISTORY_TAIL_MAX_BYTES` bounds what status reads in all.)
- Counters (``harness_tasks_total`` and friends) are cumulative and incremental: every
  snapshot stores a cursor (history inode and byte offset, newest ``recorded_at``; completed
  spec mtimes) and the next one reads only what was appended since. A rotation of the
  history file (new inode or smaller size) is detected and the new file is counted from its
  first record newer than the cursor, so the counters stay monotonic.

Stalled workers: :func:`stall_reason`, the rule the supervisor applies too (with its own
progress watermark). From the files alone (until the supervisor publishes its own list):
a busy, draining or stopping spec whose ``heartbeat_at`` is older than
``heartbeat_timeout_s``; or whose ``progress_at`` (or ``progress_updated_at``), when the
worker reports one, is ``worker_stall_timeout_s`` old; or, without such a timestamp, whose
task has run that long while ``progress`` is still 0/null.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson

from . import clock
from .config import SystemConfig, load_system
from .control import paused_types, read_control
from .errors import CorruptFileError
from .locks import lock_for
from .paths import Home
from .specs import liveness, read_specs
from .store import append_line, iter_lines_reverse, parse_record, read_json, tail_jsonl
from .tasks import PRIORITIES

if TYPE_CHECKING:
    from .queue import QueueBackend

T = TypeVar("T")

SNAPSHOT_VERSION = 1
#: Newest bytes of task-history.jsonl that a window computation reads at most.
HISTORY_TAIL_MAX_BYTES = 8 << 20
HISTORY_TAIL_MAX_RECORDS = 20_000
#: Records may be appended slightly out of time order by concurrent processes.
WINDOW_SLACK_S = 300.0
#: Health rule (see :func:`compute_health`).
HEALTHY_SUCCESS_RATE = 0.8
UNHEALTHY_SUCCESS_RATE = 0.5
UNHEALTHY_STALLED = 2
HEALTH_STATES = ("healthy", "degraded", "unhealthy")
WORKER_STATES = ("starting", "idle", "busy", "draining", "stopping")
_MB = 1024 * 1024
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


# ---------------------------------------------------------------------------- small helpers
@lru_cache(maxsize=1024)
def _day_seconds(day: str) -> int:
    return (date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL) * 86400


def ts_of(value: Any) -> float | None:
    """Epoch seconds of a contract timestamp, None when absent or malformed.

    The contract's ``YYYY-MM-DDTHH:MM:SS.mmmZ`` is parsed by slicing (a cached day plus the
    time of day), several times faster than strptime; other forms go through
    clock.parse_iso."""
    if not isinstance(value, str):
        return None
    if len(value) == 24 and value[10] == "T" and value[19] == "." and value[23] == "Z":
        try:
            return (_day_seconds(value[:10]) + int(value[11:13]) * 3600
                    + int(value[14:16]) * 60 + int(value[17:19]) + int(value[20:23]) / 1000)
        except ValueError:
            return None
    try:
        return clock.parse_iso(value)
    except ValueError:
        return None


def as_number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1), None for no values: the one definition behind every p50,
    p95 and p99 harness reports (snapshots, ``harness bench``, the load test).

    Linear interpolation between the closest ranks: position ``(n - 1) * q`` of the sorted
    values (type 7 of Hyndman and Fan, numpy's default, Excel's PERCENTILE.INC), so the
    median of an even count is the mean of the middle two and a single value is every
    quantile."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


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

    def __init__(self, queue: QueueBackend, keep: Callable[[dict[str, Any]], T | None], *,
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
                   ) -> HistoryWindow[dict[str, Any]]:
    """The history records recorded since ``since`` (at most ``max_records``, the newest:
    ``complete`` is then False), read once through the queue port."""
    from .queue import open_queue  # the queue package is the heaviest import; keep it local

    window: HistoryWindow[dict[str, Any]] = HistoryWindow(
        open_queue(home), lambda record: record, max_records=max_records)
    window.refresh(since)
    return window


# ---------------------------------------------------------------------------- attempts
def attempt_result(record: dict[str, Any]) -> str | None:
    """``completed`` or ``failed`` for a record that ends an attempt; None otherwise
    (released attempts, cancellations and dependency failures are not attempts' results)."""
    status = record.get("status")
    if status == "completed":
        return "completed"
    if status == "failed" and record.get("started_at"):
        return "failed"
    return None


def attempt_kind(record: dict[str, Any]) -> tuple[bool, str] | None:
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


def attempt_duration(record: dict[str, Any]) -> float | None:
    """Seconds from the attempt's ``started_at`` to its ``recorded_at``."""
    start, end = ts_of(record.get("started_at")), ts_of(record.get("recorded_at"))
    if start is None or end is None:
        return None
    return max(0.0, end - start)


def queue_wait(record: dict[str, Any]) -> float | None:
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


def tokens_of(record: dict[str, Any]) -> float | None:
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


def window_stats(records: Iterable[dict[str, Any]], now: float, window_s: float,
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


# ---------------------------------------------------------------------------- workers
#: Worker states in which a worker runs a task, so can stall (the worker's own states).
STALL_STATES = ("busy", "draining", "stopping")


def stall_reason(spec: dict[str, Any], now: float, heartbeat_timeout_s: float | None,
                 stall_timeout_s: float, *, unchanged_since: float | None = None
                 ) -> str | None:
    """Why a worker counts as stalled, or None: the one stall rule, shared by status,
    check and snapshots (:func:`worker_rows`) and the supervisor, which fences what it
    finds (docs/supervisor.md).

    A worker in a :data:`STALL_STATES` state is stalled when its heartbeat is older than
    ``heartbeat_timeout_s`` (when given), or when its progress has not changed for
    ``stall_timeout_s`` or longer. Since when it has not changed: ``unchanged_since`` when
    the caller watched it (the supervisor's watermark: when it first saw this progress of
    this task); else the spec's ``progress_at`` (or ``progress_updated_at``); else, while
    ``progress`` is still 0/null, the task's ``task_started_at``."""
    if spec.get("state") not in STALL_STATES:
        return None
    if heartbeat_timeout_s is not None:
        beat = ts_of(spec.get("heartbeat_at"))
        if beat is not None and now - beat > heartbeat_timeout_s:
            return f"heartbeat {now - beat:.0f}s old (limit {heartbeat_timeout_s:g}s)"
    since = unchanged_since
    if since is None:
        since = ts_of(spec.get("progress_at") or spec.get("progress_updated_at"))
    if since is None:
        started = ts_of(spec.get("task_started_at"))
        if started is not None and now - started >= stall_timeout_s \
                and not spec.get("progress"):
            return (f"task running {now - started:.0f}s with no progress reported "
                    f"(limit {stall_timeout_s:g}s)")
        return None
    if now - since >= stall_timeout_s:
        return f"no progress for {now - since:.0f}s (limit {stall_timeout_s:g}s)"
    return None


def worker_rows(home: Home, cfg: SystemConfig, now: float) -> list[dict[str, Any]]:
    """One row per active spec: id, state, task, heartbeat age, stalled and why, alive.

    Liveness is :func:`coordination.specs.liveness`, the proof the supervisor and doctor
    use (pid gone, pid reused per psutil ``create_time`` vs ``process_start_time``, or
    heartbeat older than ``heartbeat_timeout_s``). A proven-dead worker's row has
    ``state`` ``dead`` (what its spec still claims is ``spec_state``), ``alive`` False and
    ``dead_reason`` the proof, so it is never counted as busy or idle. ``stalled`` is
    judged as before, from the spec alone."""
    rows: list[dict[str, Any]] = []
    hb_limit = float(cfg["heartbeat_timeout_s"])
    stall_limit = float(cfg["worker_stall_timeout_s"])
    for read in read_specs(home):
        spec = read.spec
        if spec is None:
            rows.append({"worker_id": read.path.stem, "state": "unreadable", "error": read.error,
                         "spec_state": None, "alive": None, "dead_reason": None,
                         "current_task_id": None, "heartbeat_age_s": None,
                         "task_age_s": None, "stalled": False, "stall_reason": None})
            continue
        beat = ts_of(spec.get("heartbeat_at"))
        started = ts_of(spec.get("task_started_at"))
        reason = stall_reason(spec, now, hb_limit, stall_limit)
        dead = liveness(spec, now, hb_limit)
        rows.append({
            "worker_id": spec.get("worker_id"), "instance": spec.get("instance"),
            "state": "dead" if dead else spec.get("state"), "spec_state": spec.get("state"),
            "alive": dead is None, "dead_reason": dead,
            "current_task_id": spec.get("current_task_id"),
            "heartbeat_at": spec.get("heartbeat_at"),
            "heartbeat_age_s": _round(None if beat is None else now - beat, 1),
            "task_started_at": spec.get("task_started_at"),
            "task_age_s": _round(None if started is None or not spec.get("current_task_id")
                                 else now - started, 1),
            "progress": spec.get("progress"), "tasks_done": spec.get("tasks_done"),
            "tasks_failed": spec.get("tasks_failed"), "tokens_used": spec.get("tokens_used"),
            "pid": spec.get("pid"), "unit": spec.get("unit"),
            "stalled": reason is not None, "stall_reason": reason,
        })
    return rows


# ---------------------------------------------------------------------------- health
def compute_health(success_rate: float | None, stalled_workers: Sequence[str],
                   window_s: float | None = None, *, attempts: int | None = None,
                   min_attempts: int = 0) -> tuple[str, list[str]]:
    """The health rule shared with the supervisor: ``(state, reasons)``.

    healthy: success rate >= 80% (or no finished attempt in the window) and no stalled
    worker; unhealthy: success rate < 50% or more than 2 stalled workers; else degraded.
    ``success_rate`` is completed / (completed + failed) attempts over ``health_window_s``;
    it is not judged while ``attempts`` (that count) is below ``min_attempts``
    (``health_min_attempts``).
    """
    if attempts is not None and attempts < min_attempts:
        success_rate = None
    reasons: list[str] = []
    over = f" over {window_s:g}s" if window_s else ""
    stalled = len(stalled_workers)
    unhealthy = degraded = False
    if success_rate is not None and success_rate < UNHEALTHY_SUCCESS_RATE:
        unhealthy = True
        reasons.append(f"success rate {success_rate:.0%} < {UNHEALTHY_SUCCESS_RATE:.0%}{over}")
    elif success_rate is not None and success_rate < HEALTHY_SUCCESS_RATE:
        degraded = True
        reasons.append(f"success rate {success_rate:.0%} < {HEALTHY_SUCCESS_RATE:.0%}{over}")
    if stalled > UNHEALTHY_STALLED:
        unhealthy = True
    elif stalled:
        degraded = True
    if stalled:
        names = ", ".join(list(stalled_workers)[:5]) + (", ..." if stalled > 5 else "")
        reasons.append(f"{stalled} stalled worker(s): {names}")
    state = "unhealthy" if unhealthy else "degraded" if degraded else "healthy"
    return state, reasons


def health_stale_after(cfg: SystemConfig) -> float:
    """A health.json older than this is ignored (its supervisor is presumed gone)."""
    return max(60.0, 10.0 * float(cfg["supervisor_tick_s"]))


def read_health_file(home: Home) -> dict[str, Any] | None:
    """The supervisor's health.json, None when absent or unreadable."""
    try:
        raw = read_json(home.health_file)
    except (FileNotFoundError, CorruptFileError):
        return None
    if not isinstance(raw, dict) or raw.get("health") not in HEALTH_STATES:
        return None
    return raw


def health_document(success_rate: float | None, stalled_workers: Sequence[str], *,
                    backpressure: bool, now: float, window_s: float | None = None,
                    circuits: dict[str, Any] | None = None, attempts: int | None = None,
                    min_attempts: int = 0) -> dict[str, Any]:
    """A health.json document (the supervisor's format) for the given inputs."""
    state, reasons = compute_health(success_rate, stalled_workers, window_s,
                                    attempts=attempts, min_attempts=min_attempts)
    return {"version": 1, "updated_at": clock.iso(now), "health": state,
            "success_rate": _round(success_rate, 4), "stalled_workers": list(stalled_workers),
            "reasons": reasons, "backpressure": backpressure, "circuits": circuits or {}}


# ---------------------------------------------------------------------------- observation
@dataclass
class Observation:
    """Everything status, snapshot and check need, read once."""

    now: float
    cfg: SystemConfig
    queue: dict[str, Any]
    workers: list[dict[str, Any]]
    window: WindowStats
    health: dict[str, Any]
    backpressure: bool
    paused: dict[str, Any]
    circuits: dict[str, Any]
    disk: dict[str, Any]
    files: dict[str, int]
    service: dict[str, Any]


def file_sizes(home: Home) -> dict[str, int]:
    """Bytes of every regular, non-hidden file directly in coordination/."""
    out = {}
    try:
        with os.scandir(home.coordination) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    out[entry.name] = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return {}
    return dict(sorted(out.items()))


def disk_usage(home: Home) -> dict[str, Any]:
    usage = shutil.disk_usage(home.root)
    return {"free_bytes": usage.free, "total_bytes": usage.total,
            "free_mb": round(usage.free / _MB, 1)}


def observe(home: Home, now: float | None = None, *, queue: Any = None) -> Observation:
    """Read the home once. Raises NotInitialized, ConfigError or CorruptFileError.

    ``queue``: the home's queue (QueueBackend) the caller already has, to read through (a
    long-lived one, e.g. a server's or the CLI's, is reused instead of read again); default
    the process's shared one."""
    from .queue import open_queue  # the queue package is the heaviest import; keep it local

    home.require()
    ts = clock.now() if now is None else now
    cfg = load_system(home)
    queue_api = open_queue(home) if queue is None else queue
    stats = queue_api.stats(ts)
    window_s = float(cfg["health_window_s"])
    hist = history_window(home, ts - window_s)
    window = window_stats(hist.records, ts, window_s, hist.complete)
    workers = worker_rows(home, cfg, ts)
    max_depth = int(cfg["max_queue_depth"])
    queued = int(stats["by_status"]["queued"])
    backpressure = queued >= max_depth  # the next `task add` would be refused
    control = read_control(home)
    active_pauses = paused_types(control, ts)
    paused = {name: info for name, info in control.get("paused_types", {}).items()
              if name in active_pauses}
    oldest_runnable = (oldest_runnable_since(queue_api.live_tasks(), active_pauses, ts)
                       if queued else None)
    supervisor = read_health_file(home)
    age = None if supervisor is None else ts_of(supervisor.get("updated_at"))
    fresh = supervisor is not None and age is not None \
        and ts - age <= health_stale_after(cfg)
    computed_stalled = [str(w["worker_id"]) for w in workers if w["stalled"]]
    circuits: dict[str, Any] = {}
    if fresh and supervisor is not None:
        stalled = [str(s) for s in supervisor.get("stalled_workers") or []]
        for w in workers:
            if w["worker_id"] in stalled and not w["stalled"]:
                w.update(stalled=True, stall_reason="reported by the supervisor")
        raw_circuits = supervisor.get("circuits")
        circuits = dict(raw_circuits) if isinstance(raw_circuits, dict) else {}
        health: dict[str, Any] = {"state": supervisor["health"],
                  "reasons": [str(r) for r in supervisor.get("reasons") or []],
                  "source": "supervisor", "updated_at": supervisor.get("updated_at"),
                  "success_rate": supervisor.get("success_rate"),
                  "stalled_workers": sorted(set(stalled) | set(computed_stalled))}
        backpressure = bool(supervisor.get("backpressure", backpressure)) or backpressure
    else:
        state, reasons = compute_health(window.success_rate, computed_stalled, window_s,
                                        attempts=window.completed + window.failed,
                                        min_attempts=int(cfg["health_min_attempts"]))
        if supervisor is not None:
            reasons.append(f"health.json is stale (updated {supervisor.get('updated_at')}); "
                           "computed from the files")
        health = {"state": state, "reasons": reasons, "source": "computed",
                  "updated_at": clock.iso(ts), "success_rate": _round(window.success_rate, 4),
                  "stalled_workers": computed_stalled}
    queue = {
        "queued": queued, "running": int(stats["by_status"]["running"]),
        "live": stats["live"],
        "by_priority": {p: dict(stats["by_priority"].get(p, {"queued": 0, "running": 0}))
                        for p in PRIORITIES},
        "inbox_pending": stats["inbox_pending"], "dead_letters": stats["dead_letters"],
        "oldest_queued_at": stats["oldest_queued_at"],
        "oldest_queued_age_s": stats["oldest_queued_age_s"],
        "oldest_runnable_at": oldest_runnable,
        "oldest_runnable_age_s": _age_s(oldest_runnable, ts),
        "max_queue_depth": max_depth,
    }
    service = service_state(queue, workers, health_file_at=None if supervisor is None
                            else supervisor.get("updated_at"), fresh=fresh, now=ts)
    return Observation(ts, cfg, queue, workers, window, health, backpressure, paused,
                       circuits, disk_usage(home), file_sizes(home), service)


def _age_s(stamp: str | None, now: float) -> float | None:
    at = ts_of(stamp)
    return None if at is None else round(max(0.0, now - at), 3)


def oldest_runnable_since(tasks: Sequence[dict[str, Any]], paused: Container[str],
                          now: float) -> str | None:
    """Since when the oldest runnable task has been waiting: its ``not_before`` when that
    is later than its ``created_at`` (a deferred task or a retry waits from then), else its
    ``created_at``; None when no task is runnable. Runnable is the claim rule
    (``coordination.queue.is_runnable``): queued, due, dependencies finished, type not
    paused, so a deliberately paused type or a future ``not_before`` never looks stuck."""
    from .queue import is_runnable

    live = {t["task_id"] for t in tasks}
    now_iso = clock.iso(now)
    oldest: str | None = None
    for task in tasks:
        if is_runnable(task, live, now_iso, paused):
            since = max(task["created_at"], task.get("not_before") or "")
            if oldest is None or since < oldest:
                oldest = since
    return oldest


#: What to run when tasks wait and nothing serves them (``harness status`` prints it).
START_HINT = ("run `harness up` (foreground, no systemd), or with the systemd units "
              "installed (`harness systemd install --user`): `systemctl --user start "
              "harness-supervisor.service` (it starts the workers; plain systemctl for a "
              "--system install)")


def service_state(queue: dict[str, Any], workers: Sequence[dict[str, Any]], *,
                  health_file_at: str | None, fresh: bool, now: float) -> dict[str, Any]:
    """Whether anything serves the queue: ``waiting`` (queued tasks plus inbox requests),
    ``live_workers`` (alive, not draining or stopping), ``supervisor`` (``running``: its
    health.json is fresh; ``stale``; ``absent``), ``health_age_s``, ``served`` (False when
    tasks wait with neither a live worker nor a running supervisor) and ``hint``: what to
    run then (None otherwise)."""
    waiting = int(queue["queued"]) + int(queue.get("inbox_pending") or 0)
    live = sum(1 for w in workers if w.get("alive")
               and w.get("state") in ("starting", "idle", "busy"))
    supervisor = "absent" if health_file_at is None else "running" if fresh else "stale"
    served = not waiting or live > 0 or supervisor == "running"
    return {"waiting": waiting, "live_workers": live, "supervisor": supervisor,
            "health_updated_at": health_file_at,
            "health_age_s": _age_s(health_file_at, now),
            "served": served, "hint": None if served else START_HINT}


# ---------------------------------------------------------------------------- snapshot
def _worker_counts(obs: Observation) -> dict[str, Any]:
    counts: dict[str, Any] = {"active": len(obs.workers)}
    for state in WORKER_STATES:
        counts[state] = sum(1 for w in obs.workers if w["state"] == state)
    # Proven dead (specs.liveness) but not yet retired: counted here, never as busy/idle.
    counts["dead"] = sum(1 for w in obs.workers if w["state"] == "dead")
    stalled = sorted(set(obs.health.get("stalled_workers") or []))
    counts["stalled"] = len(stalled)
    counts["stalled_ids"] = stalled
    return counts


def snapshot_from(obs: Observation, counters: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics snapshot (one line of metrics-snapshots.jsonl) of an observation."""
    w = obs.window
    per_min = w.window_s / 60.0
    snap: dict[str, Any] = {
        "version": SNAPSHOT_VERSION,
        "timestamp": clock.iso(obs.now),
        "window_s": w.window_s,
        "queue": obs.queue,
        "workers": _worker_counts(obs),
        "throughput": {
            "completed_1m": w.completed_1m, "failed_1m": w.failed_1m,
            "completed_per_min_1m": float(w.completed_1m),
            "failed_per_min_1m": float(w.failed_1m),
            "completed_window": w.completed, "failed_window": w.failed,
            "completed_per_min_window": round(w.completed / per_min, 3),
            "failed_per_min_window": round(w.failed / per_min, 3),
        },
        "success_rate": _round(w.success_rate, 4),
        "error_rate": _round(w.error_rate, 4),
        "durations": {
            "task_p50_s": _round(percentile(w.durations, 0.5)),
            "task_p95_s": _round(percentile(w.durations, 0.95)),
            "task_samples": len(w.durations),
            "wait_p50_s": _round(percentile(w.waits, 0.5)),
            "wait_p95_s": _round(percentile(w.waits, 0.95)),
            "wait_samples": len(w.waits),
        },
        "tokens": {"window": w.tokens,
                   "total": None if counters is None else counters.get("tokens_total")},
        "backpressure": obs.backpressure,
        "health": {k: obs.health[k] for k in ("state", "reasons", "source", "updated_at")},
        "paused_types": sorted(obs.paused),
        "circuits": obs.circuits,
        "disk": obs.disk,
        "files": obs.files,
        "supervisor": {k: obs.service[k] for k in ("supervisor", "health_updated_at",
                                                     "health_age_s")},
        "history_window_complete": w.complete,
    }
    if counters is not None:
        snap["counters"] = counters
    return snap


def last_snapshot(home: Home) -> dict[str, Any] | None:
    """The newest parseable snapshot (a torn or garbage last line is skipped)."""
    for raw in iter_lines_reverse(home.metrics_file, 16 << 20):
        snap = parse_record(raw)
        if snap is not None and isinstance(snap.get("timestamp"), str):
            return snap
    return None


def recent_snapshots(home: Home, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` snapshots, oldest first (a backwards read)."""
    return [s for s in tail_jsonl(home.metrics_file, limit) if isinstance(s.get("timestamp"),
                                                                         str)]


def build_snapshot(home: Home, now: float | None = None, *, counters: bool = True,
                   previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A snapshot of the home now (not appended). ``counters`` adds the cumulative counters,
    continued from ``previous`` (default: the last stored snapshot)."""
    obs = observe(home, now)
    totals = None
    if counters:
        prev = previous if previous is not None else last_snapshot(home)
        totals = update_counters(home, (prev or {}).get("counters"))
    return snapshot_from(obs, totals)


def take_snapshot(home: Home, now: float | None = None) -> dict[str, Any]:
    """Build a snapshot and append it to metrics-snapshots.jsonl under locks/metrics.lock."""
    home.require()
    cfg = load_system(home)
    with lock_for(home.lock_path("metrics")).held_for(cfg.lock_timeout):
        snap = build_snapshot(home, now)
        append_line(home.metrics_file, snap, cfg.durability)
    return snap


# ---------------------------------------------------------------------------- counters
def empty_counters() -> dict[str, Any]:
    return {"history": {"cursor": None, "last_recorded_at": None},
            "tasks_total": {}, "attempts_total": {"completed": 0, "failed": 0},
            "duration": {"sum_s": 0.0, "count": 0}, "wait": {"sum_s": 0.0, "count": 0},
            "tokens_total": 0.0,
            "worker_exits": {"counts": {}, "mtime_ns": 0, "names": []}}


def _count_record(c: dict[str, Any], record: dict[str, Any]) -> None:
    if record.get("final"):
        outcome = str(record.get("outcome") or record.get("status") or "unknown")
        c["tasks_total"][outcome] = c["tasks_total"].get(outcome, 0) + 1
    result = attempt_result(record)
    if result is not None:
        c["attempts_total"][result] = c["attempts_total"].get(result, 0) + 1
        duration = attempt_duration(record)
        if duration is not None:
            c["duration"]["sum_s"] += duration
            c["duration"]["count"] += 1
        wait = queue_wait(record)
        if wait is not None:
            c["wait"]["sum_s"] += wait
            c["wait"]["count"] += 1
    tokens = tokens_of(record)
    if tokens is not None:
        c["tokens_total"] += tokens
    recorded = record.get("recorded_at")
    last = c["history"]["last_recorded_at"]
    if isinstance(recorded, str) and (last is None or recorded > last):
        c["history"]["last_recorded_at"] = recorded


def update_counters(home: Home, previous: dict[str, Any] | None) -> dict[str, Any]:
    """The cumulative counters: ``previous`` plus what history and completed specs gained
    since its cursor (see the module docstring). Never mutates ``previous``."""
    c = empty_counters()
    if isinstance(previous, dict):
        try:
            c = orjson.loads(orjson.dumps(previous))
            for key, value in empty_counters().items():
                c.setdefault(key, value)
        except (TypeError, orjson.JSONDecodeError):
            c = empty_counters()
    from .queue import open_queue

    cursor = c["history"]
    if cursor.get("cursor") is None and cursor.get("inode") is not None:
        # Written before the queue port: the file backend's cursor is "inode:offset".
        cursor["cursor"] = f"{cursor['inode']}.0:{int(cursor.get('offset') or 0)}"
    cursor.pop("inode", None)
    cursor.pop("offset", None)
    previous_cursor = cursor.get("cursor")
    records, new_cursor = open_queue(home).history_since(previous_cursor)
    # A rotation starts the cursor over at the new file's first record: the records the
    # janitor kept there were counted already, so only those after the newest counted one
    # count (the cursor's first part names the file).
    rotated = previous_cursor is not None and \
        str(previous_cursor).rsplit(":", 1)[0] != new_cursor.rsplit(":", 1)[0]
    floor = cursor.get("last_recorded_at") if rotated else None
    for record in records:
        if floor is not None and not str(record.get("recorded_at") or "") > floor:
            continue
        _count_record(c, record)
    cursor["cursor"] = new_cursor
    _count_exits(home, c["worker_exits"])
    c["duration"]["sum_s"] = round(c["duration"]["sum_s"], 3)
    c["wait"]["sum_s"] = round(c["wait"]["sum_s"], 3)
    return c


def _count_exits(home: Home, state: dict[str, Any]) -> None:
    """Add completed specs newer than the (mtime_ns, names at that mtime) cursor."""
    counts: dict[str, int] = state.setdefault("counts", {})
    cursor_ns = int(state.get("mtime_ns") or 0)
    seen = set(state.get("names") or [])
    newest, names_at_newest = cursor_ns, set(seen)
    try:
        entries = list(os.scandir(home.specs_completed))
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.name.endswith(".json") or entry.name.startswith("."):
            continue
        try:
            mtime = entry.stat().st_mtime_ns
        except FileNotFoundError:
            continue
        if mtime < cursor_ns or (mtime == cursor_ns and entry.name in seen):
            continue
        try:
            spec = read_json(Path(entry.path))
        except (FileNotFoundError, CorruptFileError):
            continue
        reason = str(spec.get("exit_reason") or "unknown") if isinstance(spec, dict) \
            else "unknown"
        counts[reason] = counts.get(reason, 0) + 1
        if mtime > newest:
            newest, names_at_newest = mtime, {entry.name}
        elif mtime == newest:
            names_at_newest.add(entry.name)
    state["mtime_ns"] = newest
    state["names"] = sorted(names_at_newest)


__all__ = [
    "HEALTHY_SUCCESS_RATE",
    "HISTORY_TAIL_MAX_BYTES",
    "HISTORY_TAIL_MAX_RECORDS",
    "UNHEALTHY_STALLED",
    "UNHEALTHY_SUCCESS_RATE",
    "AttemptWindow",
    "HistoryWindow",
    "Observation",
    "build_snapshot",
    "compute_health",
    "health_document",
    "history_window",
    "observe",
    "percentile",
    "snapshot_from",
    "stall_reason",
    "take_snapshot",
    "update_counters",
    "window_stats",
]
