"""Timestamps and identifiers.

Every timestamp in the home is UTC ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (millisecond precision,
literal ``Z``), so it sorts as text and jq can parse it after stripping the fraction.
Identifiers start with that instant in compact form, so they sort by creation time, and end
with random hex, so they are unique across processes without coordination.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime

_TS_FORMAT = "%Y-%m-%dT%H:%M:%S"


def now() -> float:
    """Wall-clock seconds since the epoch (the ``now`` every daemon step is given)."""
    return time.time()


def iso(ts: float) -> str:
    """Format epoch seconds as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (milliseconds truncated)."""
    ms = int(ts * 1000)
    secs, millis = divmod(ms, 1000)
    return time.strftime(_TS_FORMAT, time.gmtime(secs)) + f".{millis:03d}Z"


def parse_iso(text: str) -> float:
    """Parse a contract timestamp back to epoch seconds; raises ValueError when malformed."""
    if not isinstance(text, str) or not text.endswith("Z"):
        raise ValueError(f"not a UTC timestamp ending in Z: {text!r}")
    dt = datetime.strptime(text[:-1], _TS_FORMAT + ".%f" if "." in text else _TS_FORMAT)
    return dt.replace(tzinfo=UTC).timestamp()


def compact(ts: float) -> str:
    """``YYYYmmddTHHMMSSmmm``: the sortable time prefix of identifiers."""
    ms = int(ts * 1000)
    secs, millis = divmod(ms, 1000)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(secs)) + f"{millis:03d}"


def new_task_id(ts: float | None = None) -> str:
    """``t-<compact time>-<10 hex>``: unique, sortable by creation, safe as a file name."""
    return f"t-{compact(now() if ts is None else ts)}-{secrets.token_hex(5)}"


def new_event_id(ts: float | None = None) -> str:
    """``ev-<compact time>-<12 hex>``: 48 random bits per millisecond keep ids unique."""
    return f"ev-{compact(now() if ts is None else ts)}-{secrets.token_hex(6)}"


def new_worker_id(instance: str, ts: float | None = None) -> str:
    """``worker-<instance>-<compact time>-<4 hex>``: one id per worker lifetime."""
    return f"worker-{instance}-{compact(now() if ts is None else ts)}-{secrets.token_hex(2)}"
