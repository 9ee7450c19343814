"""The task model: fields, statuses, priorities, and validation of new task requests.

A task is a plain dict (it is what jq sees) with exactly the keys of :data:`TASK_FIELDS`.
Unset values are ``null``. See docs/coordination.md, "Task".
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from typing import Any, TypedDict, cast

from . import clock
from .errors import UsageError
from .ids import ID_RE, check_id

PRIORITIES = ("critical", "high", "medium", "low")
PRIORITY_RANK = {p: i for i, p in enumerate(PRIORITIES)}  # lower rank is claimed first
STATUSES = ("queued", "running", "completed", "failed", "cancelled")
LIVE_STATUSES = ("queued", "running")
TERMINAL_STATUSES = ("completed", "failed", "cancelled")

TASK_FIELDS: tuple[str, ...] = (
    "task_id", "description", "priority", "status", "worker_type", "command",
    "created_at", "started_at", "completed_at", "attempts", "max_attempts", "not_before",
    "depends_on", "timeout_s", "correlation_id", "dedup_key", "worker_id", "last_error",
    "exit_code", "cancel_requested", "budget", "updated_at", "host_id", "lease_token",
    "lease_until",
)



class Task(TypedDict):
    """One task, whatever its status: exactly :data:`TASK_FIELDS`
    (coordination/schemas/task.schema.json ``$defs/task``; every key required, unset values
    ``None``). Enumerations (``priority``, ``status``) are plain ``str`` here; the schema
    holds the allowed values."""

    task_id: str
    description: str
    priority: str
    status: str
    worker_type: str
    command: list[str]
    created_at: str
    started_at: str | None
    completed_at: str | None
    attempts: int
    max_attempts: int
    not_before: str | None
    depends_on: list[str]
    timeout_s: float | None
    correlation_id: str | None
    dedup_key: str | None
    worker_id: str | None
    last_error: str | None
    exit_code: int | None
    cancel_requested: bool
    budget: int | None
    updated_at: str
    host_id: str | None
    lease_token: str | None
    lease_until: str | None


class HistoryRecord(Task):
    """One line of the task history: the task as it was after an attempt or at its end,
    plus four record fields (coordination/schemas/history-record.schema.json)."""

    final: bool
    outcome: str
    recorded_at: str
    result: dict[str, Any] | None


def stored_task(raw: Mapping[str, Any]) -> Task:
    """The typing edge for a task read back from storage (a parsed JSON line or snapshot,
    a database row): what the queue wrote, or checked by :func:`check_stored_task`. The
    one place a plain mapping becomes a :class:`Task` (no runtime cost, no copy)."""
    return cast(Task, raw)


def stored_record(raw: Mapping[str, Any]) -> HistoryRecord:
    """As :func:`stored_task`, for a history record read back from storage."""
    return cast(HistoryRecord, raw)


TASK_ID_RE = ID_RE
_TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}$")
TEMPLATE_FIELDS = ("description", "task_id", "priority", "worker_type", "correlation_id")

#: Keys a task request (inbox file, ``--from-file`` line) may carry.
REQUEST_FIELDS = frozenset({
    "task_id", "description", "priority", "worker_type", "command", "max_attempts",
    "not_before", "depends_on", "timeout_s", "correlation_id", "dedup_key", "created_at",
    "budget",
})


def _first_set(*values: Any) -> Any:
    """The first value that is not None (0 and "" count as set, and are then validated)."""
    return next((v for v in values if v is not None), None)


def _fail(where: str, msg: str) -> UsageError:
    return UsageError(f"{where}: {msg}")


def check_task_id(task_id: Any, where: str = "task_id") -> str:
    """``task_id`` when it matches the id grammar (coordination/ids.py), else UsageError."""
    return check_id(task_id, "task id", where)


def check_priority(value: Any, where: str = "priority") -> str:
    if value not in PRIORITIES:
        raise _fail(where, f"unknown priority {value!r}; use one of {', '.join(PRIORITIES)}")
    return str(value)


def render_command(template: list[str], fields: dict[str, Any], where: str) -> list[str]:
    """Substitute ``{name}`` placeholders in each argv element (never through a shell)."""
    out = []
    formatter = string.Formatter()
    for element in template:
        for _, name, spec, conv in formatter.parse(element):
            if name is not None and (name not in TEMPLATE_FIELDS or spec or conv):
                raise _fail(where, f"command_template element {element!r}: unknown placeholder "
                                   f"{{{name}}}; allowed: {', '.join(TEMPLATE_FIELDS)}")
        out.append(element.format_map({k: ("" if fields.get(k) is None else str(fields[k]))
                                       for k in TEMPLATE_FIELDS}))
    return out


def new_task(request: dict[str, Any], *, worker_types: dict[str, dict[str, Any]],
             limits: dict[str, Any], now: float, where: str = "task") -> Task:
    """Validate a task request and return the full queued task.

    ``limits`` carries ``max_description_bytes``, ``max_command_bytes``, ``max_depends_on``
    and ``default_max_attempts`` from system.json. ``depends_on`` is only checked for shape
    here; existence and cycles are checked by the queue, which sees the other tasks.
    Raises :class:`UsageError` naming ``where`` and the field.
    """
    if not isinstance(request, dict):
        raise _fail(where, "a task request must be a JSON object")
    unknown = set(request) - REQUEST_FIELDS
    if unknown:
        raise _fail(where, f"unknown field(s) {', '.join(sorted(unknown))}")
    task_id = request.get("task_id") or clock.new_task_id(now)
    check_task_id(task_id, f"{where}.task_id")
    description = request.get("description") or ""
    if not isinstance(description, str):
        raise _fail(f"{where}.description", "must be a string")
    if len(description.encode()) > limits["max_description_bytes"]:
        raise _fail(f"{where}.description", f"is {len(description.encode())} bytes; the limit "
                    f"is {limits['max_description_bytes']} (max_description_bytes)")
    priority = check_priority(request.get("priority") or "medium", f"{where}.priority")
    worker_type = request.get("worker_type") or "default"
    wtype = worker_types.get(worker_type)
    if wtype is None:
        raise _fail(f"{where}.worker_type", f"unknown worker type {worker_type!r}; known: "
                    f"{', '.join(sorted(worker_types))} (coordination/config/worker-types.json)")
    command = request.get("command")
    if command in (None, []):
        template = wtype.get("command_template")
        if not template:
            raise _fail(f"{where}.command", f"no command given and worker type {worker_type!r} "
                        "has no command_template")
        command = render_command(template, {**request, "task_id": task_id,
                                            "priority": priority, "worker_type": worker_type,
                                            "description": description},
                                 f"{where}.command")
    if not isinstance(command, list) or not command or \
            not all(isinstance(a, str) for a in command):
        raise _fail(f"{where}.command", "must be a non-empty list of strings (an argv)")
    if any("\x00" in a for a in command):
        raise _fail(f"{where}.command", "argv elements may not contain NUL")
    size = sum(len(a.encode()) for a in command)
    if size > limits["max_command_bytes"]:
        raise _fail(f"{where}.command", f"is {size} bytes; the limit is "
                    f"{limits['max_command_bytes']} (max_command_bytes)")
    max_attempts = _first_set(request.get("max_attempts"), wtype.get("max_attempts"),
                              limits["default_max_attempts"])
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or \
            not 1 <= max_attempts <= 1000:
        raise _fail(f"{where}.max_attempts", f"must be an integer 1..1000, got {max_attempts!r}")
    timeout_s = request.get("timeout_s")
    if timeout_s is None:
        timeout_s = wtype.get("timeout_s")
    # nan and inf are refused: JSON has no such numbers, so they would be stored as null,
    # which means "no timeout" (the opposite of what was asked).
    if timeout_s is not None and (not isinstance(timeout_s, int | float)
                                  or isinstance(timeout_s, bool)
                                  or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise _fail(f"{where}.timeout_s", f"must be a positive finite number of seconds, "
                    f"got {timeout_s!r}")
    depends_on = request.get("depends_on") or []
    if not isinstance(depends_on, list):
        raise _fail(f"{where}.depends_on", "must be a list of task ids")
    for dep in depends_on:
        check_task_id(dep, f"{where}.depends_on")
    if len(depends_on) > limits["max_depends_on"]:
        raise _fail(f"{where}.depends_on", f"names {len(depends_on)} tasks; the limit is "
                    f"{limits['max_depends_on']} (max_depends_on)")
    if task_id in depends_on:
        raise _fail(f"{where}.depends_on", f"task {task_id} cannot depend on itself")
    not_before = request.get("not_before")
    if not_before is not None:
        try:
            # Normalise to the canonical millisecond form so text order is time order.
            not_before = clock.iso(clock.parse_iso(not_before))
        except ValueError:
            raise _fail(f"{where}.not_before", f"{not_before!r} is not a UTC timestamp "
                        "YYYY-MM-DDTHH:MM:SS.mmmZ") from None
    for key in ("correlation_id", "dedup_key"):
        value = request.get(key)
        if value is not None and (not isinstance(value, str) or not _TOKEN_RE.fullmatch(value)):
            raise _fail(f"{where}.{key}", f"{value!r} must be 1-256 characters of letters, "
                        "digits and ._:/@+-")
    budget = request.get("budget")
    if budget is None:
        budget = wtype.get("default_budget")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                               or budget < 0):
        raise _fail(f"{where}.budget", f"must be a non-negative integer, got {budget!r}")
    created_at = request.get("created_at")
    try:
        created_at = clock.iso(now if created_at is None else clock.parse_iso(created_at))
    except ValueError:
        raise _fail(f"{where}.created_at", f"{created_at!r} is not a UTC timestamp") from None
    return {
        "task_id": task_id, "description": description, "priority": priority,
        "status": "queued", "worker_type": worker_type, "command": command,
        "created_at": created_at, "started_at": None, "completed_at": None, "attempts": 0,
        "max_attempts": max_attempts, "not_before": not_before,
        "depends_on": list(dict.fromkeys(depends_on)), "timeout_s": timeout_s,
        "correlation_id": request.get("correlation_id"), "dedup_key": request.get("dedup_key"),
        "worker_id": None, "last_error": None, "exit_code": None, "cancel_requested": False,
        "budget": budget, "updated_at": clock.iso(now), "host_id": None, "lease_token": None,
        "lease_until": None,
    }


def check_stored_task(task: Any, where: str) -> list[str]:
    """Problems with a task as stored in the queue (empty list when it is well-formed)."""
    if not isinstance(task, dict):
        return [f"{where}: not an object"]
    problems = []
    missing = [f for f in ("task_id", "status", "priority", "command", "attempts",
                           "max_attempts") if f not in task]
    if missing:
        problems.append(f"{where}: missing field(s) {', '.join(missing)}")
    task_id = task.get("task_id")
    if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id):
        problems.append(f"{where}.task_id: invalid {task.get('task_id')!r}")
    if task.get("status") not in LIVE_STATUSES:
        problems.append(f"{where}.status: {task.get('status')!r} is not a live status")
    if task.get("priority") not in PRIORITIES:
        problems.append(f"{where}.priority: unknown {task.get('priority')!r}")
    if not isinstance(task.get("attempts"), int) or not isinstance(task.get("max_attempts"), int):
        problems.append(f"{where}: attempts/max_attempts must be integers")
    return problems
