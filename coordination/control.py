"""Operator control state: ``coordination/control.json`` under ``locks/control.lock``.

``{"version": 1, "updated_at", "paused_types": {TYPE: {"since", "until", "reason"}},
"drain": {"all": TS | null, "instances": {INSTANCE: TS}}}``. Claims skip paused types
(``until`` null means until resumed); workers exit with ``drained`` once a drain request
newer than their start applies to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import clock
from .config import load_system
from .errors import CorruptFileError
from .locks import lock_for
from .paths import Home
from .store import read_json, replace_json


def empty_control() -> dict[str, Any]:
    return {"version": 1, "updated_at": None, "paused_types": {},
            "drain": {"all": None, "instances": {}}}


def read_control(home: Home) -> dict[str, Any]:
    """The control state; the empty state when the file is absent."""
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
    """Apply ``change`` to the state under the control lock and publish it atomically."""
    cfg = load_system(home)
    with lock_for(home.lock_path("control")).held_for(cfg.lock_timeout):
        state = read_control(home)
        change(state)
        state["updated_at"] = clock.iso(clock.now() if now is None else now)
        replace_json(home.control_file, state, cfg.durability, pretty=True)
    return state


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
