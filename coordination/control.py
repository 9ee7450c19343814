"""Operator control state: ``coordination/control.json`` under ``locks/control.lock``, or,
on a postgres home, one row of the shared ``control`` table (every host sees the same
pauses, drains and circuits: docs/multi-host.md).

``{"version": 1, "updated_at", "paused_types": {TYPE: {"since", "until", "reason"}},
"drain": {"all": TS | null, "instances": {INSTANCE: TS}}}``. Claims skip paused types
(``until`` null means until resumed); workers exit with ``drained`` once a drain request
newer than their start applies to them.

Where the state lives is a :class:`ControlStore` chosen with the queue backend
(:func:`control_store`); :func:`read_control` and :func:`update_control` go through it, so
every caller (CLI, web, worker, supervisor, metrics) works on either kind of home.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from . import clock
from .config import load_system, load_worker_types
from .errors import CorruptFileError, UsageError
from .events import emit
from .locks import lock_for
from .paths import Home
from .store import read_json, replace_json


def empty_control() -> dict[str, Any]:
    return {"version": 1, "updated_at": None, "paused_types": {},
            "drain": {"all": None, "instances": {}}}


class ControlStore(Protocol):
    """Where a home's control state lives."""

    def read(self) -> dict[str, Any]:
        """The state (the empty state when none was ever written)."""
    def update(self, change: Callable[[dict[str, Any]], None], now: float) -> dict[str, Any]:
        """Apply ``change`` to the state atomically (no concurrent update is lost) and
        store it with ``updated_at`` ``now``; returns the new state."""


class FileControl:
    """control.json, published by rename under ``locks/control.lock``."""

    def __init__(self, home: Home) -> None:
        self.home = home

    def read(self) -> dict[str, Any]:
        return _read_file(self.home)

    def update(self, change: Callable[[dict[str, Any]], None], now: float) -> dict[str, Any]:
        cfg = load_system(self.home)
        with lock_for(self.home.lock_path("control")).held_for(cfg.lock_timeout):
            state = _read_file(self.home)
            change(state)
            state["updated_at"] = clock.iso(now)
            replace_json(self.home.control_file, state, cfg.durability, pretty=True)
        return state


def control_store(home: Home) -> ControlStore:
    """The control store of ``home``: the shared table on a postgres home, else
    control.json."""
    if load_system(home).values.get("queue_backend") == "postgres":
        from .queue.postgres.shared import PostgresControl

        return PostgresControl(home)
    return FileControl(home)


def read_control(home: Home) -> dict[str, Any]:
    """The control state of ``home`` (see :func:`control_store`)."""
    return control_store(home).read()


def _read_file(home: Home) -> dict[str, Any]:
    """control.json; the empty state when the file is absent."""
    try:
        raw = read_json(home.control_file)
    except FileNotFoundError:
        return empty_control()
    if not isinstance(raw, dict) or not isinstance(raw.get("paused_types", {}), dict):
        raise CorruptFileError(home.control_file, "must be an object with 'paused_types'")
    state = empty_control()
    state.update(raw)
    return state


def update_control(home: Home, change: Callable[[dict[str, Any]], None],
                   now: float | None = None) -> dict[str, Any]:
    """Apply ``change`` to the state atomically and store it (see :func:`control_store`)."""
    return control_store(home).update(change, clock.now() if now is None else now)


def paused_types(state: dict[str, Any], now: float) -> set[str]:
    """Types paused at ``now`` (an expired ``until`` no longer pauses)."""
    out = set()
    for name, info in state.get("paused_types", {}).items():
        until = info.get("until") if isinstance(info, dict) else None
        try:
            expired = until is not None and clock.parse_iso(until) <= now
        except ValueError:
            expired = False  # an unreadable end date keeps the pause (fail closed)
        if not expired:
            out.add(name)
    return out


# ---------------------------------------------------------------------------- operator writes
# `harness pause/resume/drain` and the web dashboard make these same calls: the control file
# is committed first, the event follows (a crash in between loses only the event).
def pause_type(home: Home, worker_type: str, *, duration: float | None = None,
               reason: str = "", source: str = "cli",
               now: float | None = None) -> dict[str, Any]:
    """Pause claims of ``worker_type`` (until resumed, or for ``duration`` seconds) and emit
    ``worker_type_paused``. Returns ``{"worker_type", "since", "until", "reason"}``.
    Raises :class:`UsageError` for a type not in worker-types.json or a duration <= 0."""
    known = load_worker_types(home)
    if worker_type not in known:
        raise UsageError(f"unknown worker type {worker_type!r}; known: "
                         f"{', '.join(sorted(known))}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise UsageError(f"pause duration (--for) must be > 0 seconds, got {duration}")
    ts = clock.now() if now is None else now
    info = {"since": clock.iso(ts), "until": None if duration is None else clock.iso(ts + duration),
            "reason": reason or None}

    def change(state: dict[str, Any]) -> None:
        state.setdefault("paused_types", {})[worker_type] = info

    update_control(home, change, now=ts)
    emit(home, "worker_type_paused", source=source,
         message=f"type {worker_type} paused" + (f": {reason}" if reason else ""),
         data={"worker_type": worker_type, **info})
    return {"worker_type": worker_type, **info}


def resume_type(home: Home, worker_type: str, *, source: str = "cli") -> dict[str, Any]:
    """Lift the pause of ``worker_type``; emits ``worker_type_resumed`` when it was paused.
    Returns ``{"worker_type", "was_paused"}``."""
    found: list[bool] = []

    def change(state: dict[str, Any]) -> None:
        found.append(state.setdefault("paused_types", {}).pop(worker_type, None) is not None)

    update_control(home, change)
    was_paused = bool(found and found[0])
    if was_paused:
        emit(home, "worker_type_resumed", source=source, message=f"type {worker_type} resumed",
             data={"worker_type": worker_type})
    return {"worker_type": worker_type, "was_paused": was_paused}


def request_drain(home: Home, instance: str | None = None, *, source: str = "cli",
                  now: float | None = None) -> dict[str, Any]:
    """Ask the workers of ``instance`` (every worker when None) started before now to finish
    their task and exit; emits ``drain_requested``. Returns ``{"drain", "requested_at"}``."""
    ts = clock.now() if now is None else now
    stamp = clock.iso(ts)

    def change(state: dict[str, Any]) -> None:
        drain_state = state.setdefault("drain", {"all": None, "instances": {}})
        if instance is None:
            drain_state["all"] = stamp
        else:
            drain_state.setdefault("instances", {})[instance] = stamp

    update_control(home, change, now=ts)
    target = "all workers" if instance is None else f"instance {instance}"
    emit(home, "drain_requested", source=source, message=f"drain requested for {target}",
         data={"instance": instance, "requested_at": stamp})
    return {"drain": "all" if instance is None else instance, "requested_at": stamp}
