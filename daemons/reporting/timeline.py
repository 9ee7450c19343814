"""``harness timeline``: one ordered story of a task (or of a correlation id).

Merges, by timestamp, the task's history records (through the queue port), its events
(the events file and, with ``archives``, its rotated archives: a byte-level prefilter, so
only candidate lines are parsed), the specs of the workers involved and the tail of its
log. Everything returned is redacted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from coordination import clock
from coordination.errors import CorruptFileError, NotFound
from coordination.ids import is_valid_id
from coordination.jsonl import jsonl_archives, scan_jsonl, scan_jsonl_gz, tail_lines
from coordination.paths import Home
from coordination.queue import open_queue
from coordination.redact import redact
from coordination.store import read_json
from coordination.tasks import HistoryRecord

KIND_RANK = {"task": 0, "worker": 1, "attempt": 2, "history": 3, "event": 4, "log": 5}


def _scan_all(path: Path, needles: Sequence[bytes], archives: bool
              ) -> Iterator[dict[str, Any]]:
    if archives:
        for archive in reversed(jsonl_archives(path)):  # oldest first
            yield from scan_jsonl_gz(archive, needles)
    yield from scan_jsonl(path, needles)


def _history_summary(r: HistoryRecord) -> str:
    attempt = f"attempt {r.get('attempts')}/{r.get('max_attempts')}"
    outcome = r.get("outcome")
    error = f": {r['last_error']}" if r.get("last_error") else ""
    if r.get("final"):
        exit_code = f", exit {r['exit_code']}" if r.get("exit_code") is not None else ""
        return f"task {r.get('status')} ({outcome}; {attempt}{exit_code}){error}"
    return f"{attempt} ended {outcome} -> {r.get('status')}{error}"


def build_timeline(home: Home, task_id: str | None = None, correlation_id: str | None = None,
                   *, log_lines: int = 20, archives: bool = False) -> dict[str, Any]:
    """One ordered story of a task (or every task of a correlation id): its history
    records, its events, the workers involved and the tail of its log, by timestamp.
    Everything is redacted. Raises NotFound when nothing mentions the id."""
    if (task_id is None) == (correlation_id is None):
        raise ValueError("give exactly one of task_id and correlation_id")
    home.require()
    queue = open_queue(home)
    live = [t for t in queue.live_tasks()
            if (task_id is not None and t["task_id"] == task_id)
            or (correlation_id is not None and t.get("correlation_id") == correlation_id)]
    needles = [(task_id or correlation_id or "").encode()]
    history = queue.history_of(task_id, correlation_id=correlation_id, archives=archives)
    task_ids = {task_id} if task_id else set()
    task_ids.update(str(r["task_id"]) for r in history if r.get("task_id"))
    task_ids.update(t["task_id"] for t in live)
    event_needles = [n.encode() for n in sorted(task_ids)] + needles
    events = [e for e in _scan_all(home.events_file, event_needles, archives)
              if e.get("task_id") in task_ids
              or (correlation_id is not None and e.get("correlation_id") == correlation_id)]
    entries: list[dict[str, Any]] = []

    def add(timestamp: Any, kind: str, summary: str, *, task: Any = None, worker: Any = None,
            severity: str | None = None, data: Any = None) -> None:
        entries.append({"timestamp": timestamp if isinstance(timestamp, str) else None,
                        "kind": kind, "task_id": task, "worker_id": worker,
                        "severity": severity, "summary": summary, "data": data})

    created: dict[str, Any] = {}
    for t in [*history, *live]:
        created.setdefault(t["task_id"], t)
    for tid, t in sorted(created.items()):
        add(t.get("created_at"), "task",
            f"task created: {t.get('priority')} {t.get('worker_type')} "
            f"{(t.get('description') or ' '.join(t.get('command') or []))[:120]}".rstrip(),
            task=tid, data={"correlation_id": t.get("correlation_id"),
                            "max_attempts": t.get("max_attempts")})
    claimed = {(e.get("task_id"), (e.get("data") or {}).get("attempt")) for e in events
               if e.get("type") == "task_claimed"}
    for r in history:
        if r.get("started_at") and (r.get("task_id"), r.get("attempts")) not in claimed:
            add(r.get("started_at"), "attempt", f"attempt {r.get('attempts')} started",
                task=r.get("task_id"), worker=r.get("worker_id"))
        add(r.get("recorded_at"), "history", _history_summary(r), task=r.get("task_id"),
            worker=r.get("worker_id"),
            severity="info" if r.get("status") == "completed" else "warning",
            data={k: r.get(k) for k in ("final", "outcome", "status", "attempts",
                                        "exit_code", "last_error", "result")})
    for e in events:
        add(e.get("timestamp"), "event", f"{e.get('type')}: {e.get('message') or ''}".rstrip(),
            task=e.get("task_id"), worker=e.get("worker_id"), severity=e.get("severity"),
            data={"type": e.get("type"), "source": e.get("source"), "data": e.get("data")})
    for t in live:
        add(t.get("updated_at"), "task", f"now {t['status']} (attempt {t.get('attempts')}/"
            f"{t.get('max_attempts')})", task=t["task_id"], worker=t.get("worker_id"))
    workers = {str(x.get("worker_id")) for x in [*history, *events, *live]
               if x.get("worker_id")}
    for worker_id in sorted(workers):
        if not is_valid_id(worker_id):
            continue  # a hand-written event's worker_id names no spec file
        for completed, state in ((False, "active"), (True, "completed")):
            try:
                spec = read_json(home.spec_file(worker_id, completed))
            except (FileNotFoundError, CorruptFileError, OSError):
                continue
            if not isinstance(spec, dict):
                continue
            add(spec.get("started_at"), "worker",
                f"worker started (instance {spec.get('instance')}, pid {spec.get('pid')})",
                worker=worker_id)
            if state == "completed":
                add(spec.get("completed_at"), "worker",
                    f"worker exited: {spec.get('exit_reason')}", worker=worker_id,
                    severity="info" if spec.get("exit_reason") not in ("crashed", "error")
                    else "warning")
            else:
                add(spec.get("heartbeat_at"), "worker",
                    f"last heartbeat ({spec.get('state')}, task "
                    f"{spec.get('current_task_id') or '-'})", worker=worker_id)
            break
    for tid in sorted(task_ids):
        if not is_valid_id(tid):
            continue  # an id from a hand-written record names no log
        log = home.task_log(tid)
        lines = tail_lines(log, log_lines)
        if lines:
            add(clock.iso(log.stat().st_mtime), "log",
                f"last {len(lines)} line(s) of {log}", task=tid, data={"lines": lines})
    if not entries:
        what = f"task {task_id}" if task_id else f"correlation id {correlation_id}"
        raise NotFound(f"nothing in the home mentions {what} (history, events, queue)")
    order = {id(e): i for i, e in enumerate(entries)}
    entries.sort(key=lambda e: (e["timestamp"] is None, e["timestamp"] or "",
                                KIND_RANK[e["kind"]], order[id(e)]))
    out: dict[str, Any] = {"task_id": task_id, "correlation_id": correlation_id,
                           "task_ids": sorted(task_ids), "workers": sorted(workers),
                           "entries": entries}
    redacted: dict[str, Any] = redact(out)
    return redacted
