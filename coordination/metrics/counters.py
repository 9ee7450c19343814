"""The cumulative counters of a snapshot (``harness_tasks_total`` and friends).

Incremental: every snapshot stores a cursor (the queue port's history cursor and the
newest ``recorded_at``; completed spec mtimes) and the next one reads only what was
appended since. A rotation of the history (the cursor names another stream) is detected
and the new stream is counted from its first record newer than the cursor, so the
counters stay monotonic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from ..errors import CorruptFileError
from ..paths import Home
from ..store import read_json
from ..tasks import HistoryRecord
from .window import attempt_duration, attempt_result, queue_wait, tokens_of


def empty_counters() -> dict[str, Any]:
    return {"history": {"cursor": None, "last_recorded_at": None},
            "tasks_total": {}, "attempts_total": {"completed": 0, "failed": 0},
            "duration": {"sum_s": 0.0, "count": 0}, "wait": {"sum_s": 0.0, "count": 0},
            "tokens_total": 0.0,
            "worker_exits": {"counts": {}, "mtime_ns": 0, "names": []}}


def _count_record(c: dict[str, Any], record: HistoryRecord) -> None:
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
    since its cursor (the module docstring). Never mutates ``previous``."""
    c = empty_counters()
    if isinstance(previous, dict):
        try:
            c = orjson.loads(orjson.dumps(previous))
            for key, value in empty_counters().items():
                c.setdefault(key, value)
        except (TypeError, orjson.JSONDecodeError):
            c = empty_counters()
    from ..queue import open_queue

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
