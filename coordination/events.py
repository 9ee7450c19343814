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
from typing import Any

from . import clock
from .config import load_system, validate_system
from .errors import ConfigError, UsageError
from .locks import lock_for
from .paths import Home
from .redact import redact, redact_text
from .store import append_bytes, dumps

SEVERITIES = ("debug", "info", "warning", "error", "critical")
EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
MAX_MESSAGE_BYTES = 16384
MAX_DATA_BYTES = 65536
ENVELOPE_FIELDS = ("event_id", "timestamp", "type", "severity", "source", "message",
                   "task_id", "worker_id", "correlation_id", "data")


def default_source() -> str:
    return f"harness[{os.getpid()}]@{socket.gethostname()}"


def make_event(event_type: str, *, severity: str = "info", source: str | None = None,
               message: str = "", task_id: str | None = None, worker_id: str | None = None,
               correlation_id: str | None = None, data: dict[str, Any] | None = None,
               now: float | None = None) -> dict[str, Any]:
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


def append_events(home: Home, events: list[dict[str, Any]]) -> None:
    """Append built events, each as one whole line, under the events lock."""
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
        append_bytes(home.events_file, data, cfg.durability)


def emit(home: Home, event_type: str, **fields: Any) -> dict[str, Any]:
    """Build, append and return one event (see :func:`make_event` for the fields)."""
    with contextlib.suppress(ConfigError):
        load_system(home)  # its redact_patterns apply to this event (append_events reports)
    event = make_event(event_type, **fields)
    append_events(home, [event])
    return event
