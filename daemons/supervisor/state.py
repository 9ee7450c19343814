"""What the supervisor remembers across passes, and what its parts share.

Every decision the supervisor carries across passes lives in files, so a restarted
supervisor behaves the same: ``coordination/supervisor-state.json`` (:func:`load_state`;
last scale time, backpressure, circuits, progress watermarks, recent stalls), saved after
each pass by :meth:`SupervisorState._save` only when it changed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from coordination import clock
from coordination.config import load_system
from coordination.errors import CorruptFileError, HarnessError
from coordination.events import emit
from coordination.metrics import AttemptWindow
from coordination.paths import Home
from coordination.queue import QueueBackend, open_queue
from coordination.specs import WorkerSpec
from coordination.store import Durability, read_json, replace_json

from .actuators import Actuator

SOURCE = "supervisor"
log = logging.getLogger("harness.supervisor")  # diagnostics (daemons/diagnostics.py)
STATE_VERSION = 1


def singleton_lock_path(home: Home) -> Path:
    """Held by a running supervisor (``supervisor run``, ``up``, ``demo``) for its life
    (:attr:`Home.supervisor_lock`, ``locks/supervisor.lock``)."""
    return home.supervisor_lock


def _ts(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return clock.parse_iso(text)
    except ValueError:
        return None


def empty_state() -> dict[str, Any]:
    return {"version": STATE_VERSION, "updated_at": None, "last_scale_at": None,
            "backpressure": False, "health": None, "circuits": {}, "progress": {},
            "stalls": []}


def load_state(home: Home) -> dict[str, Any]:
    """The persisted supervisor state; the empty state when absent or unreadable (a corrupt
    file is reported on stderr and replaced at the next save)."""
    state = empty_state()
    try:
        raw = read_json(home.supervisor_state_file)
    except FileNotFoundError:
        return state
    except CorruptFileError as exc:
        log.warning("%s; starting from an empty state", exc)
        return state
    if isinstance(raw, dict):
        for key, value in raw.items():
            if key in state and isinstance(value, type(state[key]) if state[key] is not None
                                           else object):
                state[key] = value
    return state


def _emit(home: Home, event_type: str, message: str, **fields: Any) -> None:
    try:
        emit(home, event_type, source=SOURCE, message=message, **fields)
    except HarnessError as exc:  # the event log is best effort; the state is durable
        log.warning("could not emit %s: %s", event_type, exc)


def _durability(cfg: Mapping[str, Any]) -> Durability:
    return "none" if cfg.get("durability") == "none" else "fsync"


class SupervisorState:
    """One home's supervisor state (``self.state``, saved after each pass) and its config."""

    def __init__(self, home: Home, actuator: Actuator | None = None, *,
                 overrides: Mapping[str, Any] | None = None, apply_scale: bool = True) -> None:
        self.home = home.require()
        self.queue: QueueBackend = open_queue(home)
        self.actuator = actuator
        self.overrides = dict(overrides or {})
        self.apply_scale = apply_scale
        self.state = load_state(home)
        self._saved: dict[str, Any] = orjson.loads(orjson.dumps(self.state))
        self.history = AttemptWindow(self.queue)
        self.health_written_at: float | None = None
        self._health_doc: dict[str, Any] | None = None
        self.specs: list[WorkerSpec] = []
        self.passes = 0
        self._errors: dict[str, tuple[str, float]] = {}

    def config(self) -> dict[str, Any]:
        values = dict(load_system(self.home).values)
        values.update(self.overrides)
        if values["min_workers"] > values["max_workers"]:
            values["max_workers"] = values["min_workers"]
        return values

    def _save(self, now: float, cfg: Mapping[str, Any]) -> None:
        current = {k: v for k, v in self.state.items() if k != "updated_at"}
        saved = {k: v for k, v in self._saved.items() if k != "updated_at"}
        if current == saved and self.home.supervisor_state_file.exists():
            return
        self.state["updated_at"] = clock.iso(now)
        replace_json(self.home.supervisor_state_file, self.state, _durability(cfg), pretty=True)
        self._saved = orjson.loads(orjson.dumps(self.state))
