"""Every read and write of the dashboard, through the public functions the CLI uses.

Reads: the queue's public methods (``live_tasks``, ``get``, ``history_of``,
``dead_letters``), ``coordination.metrics`` (``observe``, ``worker_rows``,
``recent_snapshots``), ``daemons.reporting`` (``status_from`` as in ``harness status
--json``, ``evaluate_checks`` as in ``harness check --no-alerts``, ``build_timeline`` as in
``harness timeline``), ``specs.read_specs``
and ``events.recent_events``. Writes are the CLI's calls: ``QueueBackend.cancel``
(``harness task cancel``), ``requeue_dead`` (``task retry``), ``reprioritize`` (``task
set-priority``), ``control.pause_type``/``resume_type``/``request_drain`` (``harness
pause/resume/drain``). Nothing here opens a coordination file itself.

Everything returned is redacted (coordination/redact.py); the pages escape it on output.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

import orjson

from coordination import clock
from coordination.config import load_system, load_worker_types
from coordination.control import pause_type, request_drain, resume_type
from coordination.errors import NotFound, UsageError
from coordination.events import Event, recent_events
from coordination.jsonl import tail_lines
from coordination.metrics import observe, recent_snapshots, snapshot_from, worker_rows
from coordination.paths import Home
from coordination.queue import QueueBackend, open_queue
from coordination.redact import redact, redact_text
from coordination.specs import read_specs
from coordination.tasks import (
    PRIORITIES,
    PRIORITY_RANK,
    HistoryRecord,
    Task,
    check_priority,
    check_task_id,
)

from ..reporting.checks import evaluate_checks
from ..reporting.status import status_from
from ..reporting.timeline import build_timeline

SOURCE = "web"
#: Task list filters: live statuses, and ``failed`` for the dead letters.
LIST_STATUSES = ("queued", "running", "failed")
SORTS = ("priority", "created_at", "updated_at", "status", "worker_type", "attempts")
PAGE_SIZES = (25, 50, 100, 200)
#: Snapshots read for the overview's charts (one a minute: an hour, with slack).
CHART_SNAPSHOTS = 90
CHART_WINDOW_S = 3600.0
TIMELINE_LOG_LINES = 40
TASK_MEMO_ENTRIES = 64


def check_id(value: str, what: str) -> str:
    """``value`` if it matches the id grammar of coordination/tasks.py (task ids; worker ids
    and type names use the same characters), else :class:`UsageError` (HTTP 400)."""
    return check_task_id(value, what)


@dataclass
class Fleet:
    """One home and its long-lived queue (the port: it keeps the queue in memory and reads
    only what changed). Requests run in worker threads: reads through it take
    :attr:`lock`; writes go through the same queue, which is safe between threads."""

    home: Home
    queue: QueueBackend = field(init=False)
    lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _task_memo: dict[str, tuple[bytes, list[HistoryRecord], list[dict[str, Any]]]] = field(
        init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.queue = open_queue(self.home)

    def _writer(self) -> QueueBackend:
        return self.queue

    # ------------------------------------------------------------------ reads
    def status(self, alerts: int = 5) -> dict[str, Any]:
        """What ``harness status --json`` prints."""
        with self.lock:
            obs = observe(self.home.require(), queue=self.queue)
        return status_from(obs, self.home, alerts)

    def overview(self) -> dict[str, Any]:
        """The status, the check results (no alert is emitted: ``check --no-alerts``), the
        queue depth by worker type, and the last hour of metrics snapshots."""
        with self.lock:
            obs = observe(self.home.require(), queue=self.queue)
            live = self.queue.live_tasks()
        status = status_from(obs, self.home, 10)
        checks = evaluate_checks(snapshot_from(obs), obs.cfg)
        by_type: dict[str, dict[str, int]] = {}
        for t in live:
            row = by_type.get(t["worker_type"])
            if row is None:
                row = by_type[t["worker_type"]] = {"queued": 0, "running": 0}
            row[t["status"]] += 1
        since = clock.iso(obs.now - CHART_WINDOW_S)
        snaps = [s for s in recent_snapshots(self.home, CHART_SNAPSHOTS)
                 if s["timestamp"] >= since]
        return {"status": status, "checks": checks,
                "raised": [c for c in checks if c["level"] != "ok"],
                "by_type": redact(dict(sorted(by_type.items()))),
                "snapshots": snaps}

    def tasks(self, *, status: str | None = None, priority: str | None = None,
              worker_type: str | None = None, text: str | None = None,
              sort: str = "priority", descending: bool = False, page: int = 1,
              per_page: int = 50) -> dict[str, Any]:
        """Live tasks and dead letters, filtered, sorted and paginated (``page`` from 1).
        Finished tasks are found by id (:meth:`task`)."""
        if status is not None and status not in LIST_STATUSES:
            raise UsageError(f"status: {status!r} is not one of {', '.join(LIST_STATUSES)}")
        if priority is not None:
            check_priority(priority)
        if sort not in SORTS:
            raise UsageError(f"sort: {sort!r} is not one of {', '.join(SORTS)}")
        if per_page not in PAGE_SIZES:
            raise UsageError(f"per_page: {per_page} is not one of "
                             f"{', '.join(map(str, PAGE_SIZES))}")
        if page < 1:
            raise UsageError(f"page: {page} must be >= 1")
        rows: list[Task] = []
        if status in (None, "queued", "running"):
            with self.lock:
                rows.extend(self.queue.live_tasks())
        if status in (None, "failed"):
            rows.extend(self.queue.dead_letters())
        needle = (text or "").casefold()
        rows = [t for t in rows
                if (status is None or t.get("status") == status)
                and (priority is None or t.get("priority") == priority)
                and (not worker_type or t.get("worker_type") == worker_type)
                and (not needle or needle in _haystack(t))]

        def key(t: Task) -> tuple[Any, ...]:
            if sort == "priority":
                first: Any = PRIORITY_RANK.get(str(t.get("priority")), len(PRIORITIES))
            elif sort == "attempts":
                first = int(t.get("attempts") or 0)
            else:
                first = str(t.get(sort) or "")
            return (first, str(t.get("created_at") or ""), str(t.get("task_id")))

        rows.sort(key=key, reverse=descending)
        total = len(rows)
        pages = max(1, -(-total // per_page))
        start = (page - 1) * per_page
        return {"tasks": [redact(t) for t in rows[start:start + per_page]], "total": total,
                "page": page, "pages": pages, "per_page": per_page}

    def task(self, task_id: str) -> dict[str, Any]:
        """One task as ``harness task show --history --json`` (live, dead letter or final
        record) with its attempts (``history_of``), its timeline (``harness timeline``:
        history, events, workers), the redacted tail of its log and its result.
        :class:`NotFound` when unknown.

        ``history_of`` and the timeline each scan the history file (seconds on a
        100,000-record history), so they are remembered per task and computed again only
        when the task's live document or dead letter changes (an attempt that ends changes
        both); the log tail is read on every call."""
        check_id(task_id, "task_id")
        with self.lock:
            live = next((t for t in self.queue.live_tasks() if t["task_id"] == task_id), None)
        dead = None if live is not None else next(
            (d for d in self.queue.dead_letters() if d.get("task_id") == task_id), None)
        signature = orjson.dumps([live, dead])
        memo = self._task_memo.pop(task_id, None)
        if memo is None or memo[0] != signature:
            attempts = self.queue.history_of(task_id)
            if live is None and dead is None and not attempts:
                raise NotFound(f"no task {task_id} (not live, not in history, not a dead "
                               "letter)")
            entries = build_timeline(self.home, task_id, log_lines=0)["entries"]
            memo = (signature, attempts, entries)
        self._task_memo[task_id] = memo
        while len(self._task_memo) > TASK_MEMO_ENTRIES:
            self._task_memo.pop(next(iter(self._task_memo)))
        _, attempts, entries = memo
        final = next((r for r in reversed(attempts) if r.get("final")), None)
        found = live or dead or final or attempts[-1]
        log = [redact_text(line) for line in
               tail_lines(self.home.task_log(task_id), TIMELINE_LOG_LINES)]
        out: dict[str, Any] = redact({
            "task": found, "attempts": attempts, "timeline": entries, "log": log,
            "result": (final or {}).get("result", found.get("result")),
            "live": live is not None, "dead_letter": dead is not None})
        return out

    def workers(self) -> list[dict[str, Any]]:
        """One row per active spec (``status --json``'s ``workers``: state, current task,
        heartbeat age, tasks done, liveness) with the spec itself under ``spec``."""
        now = clock.now()
        rows = worker_rows(self.home.require(), load_system(self.home), now)
        specs = {str(r.spec.get("worker_id")): r.spec for r in read_specs(self.home)
                 if r.spec is not None}
        out: list[dict[str, Any]] = redact([dict(row, spec=specs.get(str(row["worker_id"])))
                                            for row in rows])
        return out

    def worker_types(self) -> list[str]:
        """The types of worker-types.json (what pause and resume accept)."""
        return sorted(load_worker_types(self.home))

    def dead_letters(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = redact(self.queue.dead_letters())
        return out

    def events(self, *, since: str | None = None, limit: int = 100) -> list[Event]:
        """The newest ``limit`` events (oldest first); ``since``: a timestamp, or ``-SECONDS``
        for that long ago (as ``harness events tail --since``)."""
        if not 1 <= limit <= 5000:
            raise UsageError(f"limit: {limit} must be between 1 and 5000")
        if since:
            if re.fullmatch(r"-\d+(\.\d+)?s?", since):
                since = clock.iso(clock.now() - float(since[1:].rstrip("s")))
            else:
                try:
                    clock.parse_iso(since)
                except ValueError:
                    raise UsageError(f"since: {since!r} is not YYYY-MM-DDTHH:MM:SS.mmmZ or "
                                     "-SECONDS") from None
        return recent_events(self.home.require(), limit, since=since or None)

    # ------------------------------------------------------------------ writes
    def cancel(self, task_id: str, reason: str | None = None) -> dict[str, Any]:
        """``harness task cancel``: queued at once, running via its worker."""
        out: dict[str, Any] = redact(self._writer().cancel(
            check_id(task_id, "task_id"), reason=reason or "cancelled from the dashboard"))
        return out

    def retry(self, task_id: str) -> dict[str, Any]:
        """``harness task retry``: a dead letter queued again (attempts reset)."""
        out: dict[str, Any] = redact(self._writer().requeue_dead(check_id(task_id, "task_id")))
        return out

    def set_priority(self, task_id: str, priority: Any) -> dict[str, Any]:
        """``harness task set-priority``."""
        out: dict[str, Any] = redact(self._writer().reprioritize(check_id(task_id, "task_id"),
                                                             check_priority(priority)))
        return out

    def pause(self, worker_type: str, duration: float | None = None,
              reason: str = "") -> dict[str, Any]:
        """``harness pause --type``."""
        return pause_type(self.home.require(), check_id(worker_type, "type"),
                          duration=duration, reason=reason, source=SOURCE)

    def resume(self, worker_type: str) -> dict[str, Any]:
        """``harness resume --type``."""
        return resume_type(self.home.require(), check_id(worker_type, "type"), source=SOURCE)

    def drain(self, worker_id: str) -> dict[str, Any]:
        """``harness drain --instance`` for the instance of this active worker."""
        check_id(worker_id, "worker_id")
        spec = next((r.spec for r in read_specs(self.home.require())
                     if r.spec is not None and r.spec.get("worker_id") == worker_id), None)
        if spec is None:
            raise NotFound(f"no active worker {worker_id}")
        out = request_drain(self.home, str(spec.get("instance")), source=SOURCE)
        return dict(out, worker_id=worker_id)


def _haystack(task: Task) -> str:
    parts = [task.get("task_id"), task.get("description"), task.get("worker_type"),
             task.get("correlation_id"), task.get("last_error"),
             " ".join(str(a) for a in task.get("command") or [])]
    return " ".join(str(p) for p in parts if p).casefold()


# ---------------------------------------------------------------------------- write actions
def _text(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 1000:
        raise UsageError(f"{key}: must be a string of at most 1000 characters")
    return value


def _seconds(params: dict[str, Any], key: str) -> float | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}: {value!r} is not a number of seconds") from None


#: ``(resource, action)`` -> the call, given the fleet, the id from the URL and the
#: parameters (a JSON body or form fields). The API and the pages' forms both use it.
WRITES: dict[tuple[str, str], Any] = {
    ("tasks", "cancel"): lambda f, i, p: f.cancel(i, _text(p, "reason")),
    ("tasks", "retry"): lambda f, i, p: f.retry(i),
    ("tasks", "priority"): lambda f, i, p: f.set_priority(i, p.get("priority")),
    ("types", "pause"): lambda f, i, p: f.pause(i, _seconds(p, "duration_s"),
                                                 _text(p, "reason") or ""),
    ("types", "resume"): lambda f, i, p: f.resume(i),
    ("workers", "drain"): lambda f, i, p: f.drain(i),
}


def perform(fleet: Fleet, resource: str, ident: str, action: str,
            params: dict[str, Any]) -> dict[str, Any]:
    """Run one write of :data:`WRITES`; :class:`NotFound` for an unknown action."""
    call = WRITES.get((resource, action))
    if call is None:
        raise NotFound(f"no action {action!r} on {resource}")
    out: dict[str, Any] = call(fleet, ident, params)
    return out
