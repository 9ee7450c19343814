"""``harness up``: the whole system in the foreground, for hosts without systemd.

One process runs the supervisor loop with the process actuator (workers are its children,
``min_workers`` = ``--workers``), plus the janitor and metrics ticks when those modules are
installed (imported lazily; a missing one is skipped). It becomes the subreaper of its
descendants, so task processes of a crashed worker are reaped, and killed at exit.

SIGINT (Ctrl-C) or SIGTERM drains: workers finish their task or hand it back within
``stop_grace_s`` (a second Ctrl-C ends that grace, a third kills them), then ``up`` exits
with no child left behind.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from coordination.errors import UsageError
from coordination.paths import Home

from .actuators import ProcessActuator
from .supervisor import Tick, run_supervisor

JANITOR_EVERY_S = 600.0
JANITOR_FIRST_S = 60.0
METRICS_EVERY_S = 60.0
METRICS_FIRST_S = 5.0


def _optional(module: str, name: str) -> Callable[..., Any] | None:
    """``module.name`` when that module exists (others write them), else None."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return None
    func = getattr(mod, name, None)
    return func if callable(func) else None


def side_ticks(home: Home) -> list[Tick]:
    """The janitor (every 10 min) and metrics snapshot (every minute) ticks that exist."""
    mono = time.monotonic()
    ticks: list[Tick] = []
    janitor = _optional("daemons.janitor", "run_janitor")
    if janitor is not None:
        ticks.append(Tick("janitor", JANITOR_EVERY_S, lambda now: janitor(home, now),
                          next_at=mono + JANITOR_FIRST_S))
    snapshot = _optional("coordination.metrics", "take_snapshot")
    if snapshot is not None:
        ticks.append(Tick("metrics", METRICS_EVERY_S, lambda now: snapshot(home, now),
                          next_at=mono + METRICS_FIRST_S))
    return ticks


def run_up(home: Home, *, workers: int, extra_ticks: list[Tick] | None = None,
           on_pass: Callable[[dict[str, Any]], bool] | None = None,
           out: Callable[[str], None] | None = None, verbose: bool = True) -> int:
    """Run supervisor + workers (+ janitor and metrics) until a signal or ``on_pass``
    returns True; returns the exit status."""
    if workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")
    home.require()
    ticks = side_ticks(home) + list(extra_ticks or [])
    return run_supervisor(home, actuator=ProcessActuator(home),
                          overrides={"min_workers": workers, "actuator": "process"},
                          ticks=ticks, on_pass=on_pass, out=out, adopt_orphans=True,
                          verbose=verbose)
