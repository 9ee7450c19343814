"""Dashboard events: one envelope for every line of ``coordination/dashboard-events.jsonl``.

Envelope (every key always present, in this order): ``event_id``, ``timestamp``, ``type``,
``severity``, ``source``, ``message``, ``task_id``, ``worker_id``, ``correlation_id``,
``data`` (an object, ``{}`` when empty). scripts/emit-event.sh writes the same envelope.
Lines are appended whole under ``locks/events.lock`` (see :func:`store.append_line`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from typing import Any, TypedDict, cast

from . import clock
from .config import load_system, validate_system
from .errors import ConfigError, UsageError
from .jsonl import tail_jsonl
from .locks import lock_for
from .paths import Home
from .redact import redact, redact_text
from .store import Durability, append_bytes, dumps

SEVERITIES = ("debug", "info", "warning", "error", "critical")
EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
MAX_MESSAGE_BYTES = 16384
MAX_DATA_BYTES = 65536
ENVELOPE_FIELDS = ("event_id", "timestamp", "type", "severity", "source", "message",
                   "task_id", "worker_id", "correlation_id", "data")


class Event(TypedDict):
    """One line of events.jsonl (coordination/schemas/event.schema.json): the
    :data:`ENVELOPE_FIELDS`, all required. ``severity`` is a plain ``str`` (one of
    :data:`SEVERITIES`)."""

    event_id: str
    timestamp: str
    type: str
    severity: str
    source: str
    message: str
    task_id: str | None
    worker_id: str | None
    correlation_id: str | None
    data: dict[str, Any]


def default_source() -> str:
    return f"harness[{os.getpid()}]@{socket.gethostname()}"


def make_event(event_type: str, *, severity: str = "info", source: str | None = None,
               message: str = "", task_id: str | None = None, worker_id: str | None = None,
               correlation_id: str | None = None, data: dict[str, Any] | None = None,
               now: float | None = None) -> Event:
    """Build a validated event envelope; raises :class:`UsageError` naming the bad field.

    ``message`` and ``data`` are redacted (coordination/redact.py) before they are checked
    and stored: secret-looking keys and token shapes never reach the events file."""
    if not isinstance(event_type, str) or not EVENT_TYPE_RE.fullmatch(event_type):
        raise UsageError(f"event type {event_type!r} must match {EVENT_TYPE_RE.pattern}")
    if severity not in SEVERITIES:
        raise UsageError(f"unknown severity {severity!r}; use one of {', '.join(SEVERITIES)}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError("event data must be a JSON object")
    message = redact_text(message)
    data = redact(data)
    if len(message.encode()) > MAX_MESSAGE_BYTES:
        raise UsageError(f"event message is over {MAX_MESSAGE_BYTES} bytes")
    if len(dumps(data)) > MAX_DATA_BYTES:
        raise UsageError(f"event data is over {MAX_DATA_BYTES} bytes of JSON")
    ts = clock.now() if now is None else now
    return {
        "event_id": clock.new_event_id(ts), "timestamp": clock.iso(ts), "type": event_type,
        "severity": severity, "source": source or default_source(), "message": message,
        "task_id": task_id, "worker_id": worker_id, "correlation_id": correlation_id,
        "data": data,
    }


def append_events(home: Home, events: list[Event], *,
                  durability: Durability | None = None) -> None:
    """Append built events, each as one whole line, under the events lock; fdatasynced per
    system.json ``durability`` unless ``durability`` says otherwise. The queue and the
    worker pass ``"none"`` for the events that report a change they already committed:
    the change is durable (the queue's journal), an event is a notification
    (docs/coordination.md, "Events come last"), and a second fdatasync per task halved a
    worker's rate of short tasks."""
    if not events:
        return
    try:
        cfg = load_system(home)
    except ConfigError:
        # Appending stays possible while system.json is invalid (with the default lock
        # timeout and durability), so that config_invalid itself can be reported.
        cfg = validate_system(home.system_config, {})
    data = b"".join(dumps(event) + b"\n" for event in events)
    with lock_for(home.lock_path("events")).held_for(cfg.lock_timeout):
        append_bytes(home.events_file, data, cfg.durability if durability is None
                     else durability)


def create_events_file(home: Home) -> bool:
    """Create ``dashboard-events.jsonl`` empty (zero lines) when it does not exist, the way
    the first append would (under the events lock, mode 0644 less the umask, its directory
    entry fsynced), so ``jq``/``tail`` work on a fresh home. True when it was created; an
    existing file is left untouched."""
    cfg = load_system(home)
    with lock_for(home.lock_path("events")).held_for(cfg.lock_timeout):
        if home.events_file.exists():
            return False
        append_bytes(home.events_file, b"", cfg.durability)
    return True


def emit(home: Home, event_type: str, **fields: Any) -> Event:
    """Build, append and return one event (see :func:`make_event` for the fields)."""
    with contextlib.suppress(ConfigError):
        load_system(home)  # its redact_patterns apply to this event (append_events reports)
    event = make_event(event_type, **fields)
    append_events(home, [event])
    return event


def recent_events(home: Home, limit: int, *, since: str | None = None) -> list[Event]:
    """The newest ``limit`` events (oldest first), redacted; with ``since`` (a timestamp),
    only those at or after it. Reads the file backwards: at most ``limit`` lines without
    ``since``, ``50 * limit`` with it (the window ``harness events tail --since`` reads)."""
    window = tail_jsonl(home.events_file, limit if since is None else limit * 50)
    kept = [e for e in window if since is None or str(e.get("timestamp") or "") >= since]
    # The edge from the file: lines as written by append_events (envelopes).
    return [cast(Event, redact(e)) for e in kept[-limit:]] if limit > 0 else []
