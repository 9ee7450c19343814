"""``harness up``: the whole system in the foreground, for hosts without systemd.

One process runs the supervisor loop with the process actuator (workers are its children,
``min_workers`` = ``--workers``), plus the janitor and metrics ticks when those modules are
installed (imported lazily; a missing one is skipped). It becomes the subreaper of its
descendants, so task processes of a crashed worker are reaped, and killed at exit.

SIGINT (Ctrl-C) or SIGTERM drains: workers finish their task or hand it back within
``stop_grace_s`` (a second Ctrl-C ends that grace, a third kills them), then ``up`` exits
with no child left behind.

``--workers N`` runs N workers: both ``min_workers`` and ``max_workers`` are overridden, so
the supervisor neither shrinks nor grows the fleet past N unless ``max_workers`` (``up
--max-workers``) allows more. On a terminal a progress line (queued, running, done,
failed, workers) is printed every few seconds, and at exit a summary says what was done,
what is still queued and what to run next.
"""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from coordination.errors import UsageError
from coordination.paths import Home

from .actuators import ProcessActuator
from .loop import Tick, run_supervisor

PROGRESS_EVERY_S = 5.0

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
    janitor = _optional("daemons.janitor.run", "run_janitor")
    if janitor is not None:
        ticks.append(Tick("janitor", JANITOR_EVERY_S, lambda now: janitor(home, now),
                          next_at=mono + JANITOR_FIRST_S))
    snapshot = _optional("coordination.metrics", "take_snapshot")
    if snapshot is not None:
        ticks.append(Tick("metrics", METRICS_EVERY_S, lambda now: snapshot(home, now),
                          next_at=mono + METRICS_FIRST_S))
    return ticks


def command_prefix(home: Home) -> tuple[str, str]:
    """How to spell the harness command and the home in printed hints: ``harness`` when
    that is what runs (else ``python -m daemons``), and the home relative to the current
    directory when it is below it, shell-quoted."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "harness":
        found = shutil.which("harness")
        prog = "harness" if found and os.path.samefile(found, argv0) else argv0
    else:
        prog = f"{sys.executable} -m daemons"
    root = home.root
    try:
        rel = root.relative_to(Path.cwd())
        shown = "./" + str(rel) if str(rel) != "." else "."
    except ValueError:
        shown = str(root)
    return prog, shlex.quote(shown)


class Outcomes:
    """Final outcomes (history records with ``final``) recorded since this object was made:
    of every task, or only of ``ids``. Read incrementally through the queue port's history
    cursor (only what was recorded since the last refresh; a rotation starts over)."""

    def __init__(self, home: Home, ids: Iterable[str] | None = None) -> None:
        from coordination.queue import open_queue

        self.queue = open_queue(home)
        self.ids = None if ids is None else set(ids)
        self.outcomes: dict[str, str] = {}
        _, self.cursor = self.queue.history_since(None, start_at=time.time())

    def refresh(self) -> None:
        records, self.cursor = self.queue.history_since(self.cursor)
        for record in records:
            task_id = record.get("task_id")
            if record.get("final") and (self.ids is None or task_id in self.ids):
                self.outcomes[str(task_id)] = str(record.get("status"))

    @property
    def finished(self) -> bool:
        """Every task of ``ids`` has a final outcome (False without ``ids``)."""
        return self.ids is not None and len(self.outcomes) >= len(self.ids)

    def count(self, status: str) -> int:
        return sum(1 for s in self.outcomes.values() if s == status)


def worker_counts(report: dict[str, Any]) -> tuple[int, int, int, int]:
    """``(workers, busy, idle, starting)`` of a supervisor pass, consistent with its queue
    counts: busy is the number of running tasks (the queue's view, capped at the live
    workers), not the specs' state, which lags a finished task by a heartbeat; so the line
    never says "0 running" beside a busy worker."""
    q = report.get("queue") or {}
    w = report.get("workers") or {}
    live = int(w.get("running") or 0)
    starting = min(int(w.get("starting") or 0), live)
    busy = min(int(q.get("running") or 0), live - starting)
    return live, busy, live - busy - starting, starting


def progress_line(report: dict[str, Any], outcomes: Outcomes, elapsed: float) -> str:
    """``[  12.0s] queued 3, running 2, done 7, failed 0 | workers 2 (2 busy, 0 idle)``."""
    q = report.get("queue") or {}
    live, busy, idle, starting = worker_counts(report)
    outcomes.refresh()
    return (f"[{elapsed:6.1f}s] queued {q.get('queued', 0)}, running {q.get('running', 0)}, "
            f"done {outcomes.count('completed')}, failed {outcomes.count('failed')} | "
            f"workers {live} ({busy} busy, {idle} idle"
            + (f", {starting} starting" if starting else "") + ")")


def exit_summary(home: Home, outcomes: Outcomes, elapsed: float) -> list[str]:
    """What ``harness up`` prints when it stops: tasks done and failed while it ran, tasks
    still queued, and what to run next."""
    from coordination.queue import open_queue

    outcomes.refresh()
    stats = open_queue(home).stats()
    queued = int(stats["by_status"]["queued"]) + int(stats["inbox_pending"])
    running = int(stats["by_status"]["running"])
    prog, where = command_prefix(home)
    h = f"{prog} --home {where}"
    lines = [f"harness up ran {elapsed:.0f}s: {outcomes.count('completed')} task(s) done, "
             f"{outcomes.count('failed')} failed, {queued} still queued"
             + (f", {running} still running (their workers were stopped)" if running else "")]
    if queued or running:
        lines.append(f"  next: `{h} up` runs the rest; `{h} task list` shows them")
    if stats["dead_letters"]:
        lines.append(f"  next: `{h} dlq list` shows the {stats['dead_letters']} failed "
                     f"task(s); `{h} dlq requeue --all` retries them")
    lines.append(f"  next: `{h} status` for the whole picture, `{h} events tail` for what "
                 "happened")
    return lines


def run_up(home: Home, *, workers: int, max_workers: int | None = None,
           extra_ticks: list[Tick] | None = None,
           on_pass: Callable[[dict[str, Any]], bool] | None = None,
           out: Callable[[str], None] | None = None, verbose: bool = True,
           progress_every_s: float | None = None, summary: bool = False) -> int:
    """Run supervisor + workers (+ janitor and metrics) until a signal or ``on_pass``
    returns True; returns the exit status.

    ``workers`` workers run (min_workers and max_workers both overridden) unless
    ``max_workers`` allows the supervisor to scale up to more. ``progress_every_s`` prints
    :func:`progress_line` that often; ``summary`` prints :func:`exit_summary` at the end."""
    if workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")
    ceiling = workers if max_workers is None else max_workers
    if ceiling < workers:
        raise UsageError(f"--max-workers ({ceiling}) must be >= --workers ({workers})")
    home.require()
    say = out or (lambda line: print(line, flush=True))
    ticks = side_ticks(home) + list(extra_ticks or [])
    outcomes = Outcomes(home)
    started = time.monotonic()
    last: dict[str, Any] = {}

    def keep(report: dict[str, Any]) -> bool:
        last.clear()
        last.update(report)
        return on_pass(report) if on_pass is not None else False

    if progress_every_s:
        ticks.append(Tick("progress", progress_every_s, lambda now: say(progress_line(
            last, outcomes, time.monotonic() - started)),
            next_at=time.monotonic() + progress_every_s))
    code = run_supervisor(home, actuator=ProcessActuator(home),
                          overrides={"min_workers": workers, "max_workers": ceiling,
                                     "actuator": "process"},
                          ticks=ticks, on_pass=keep, out=say, adopt_orphans=True,
                          verbose=verbose)
    if summary:
        for line in exit_summary(home, outcomes, time.monotonic() - started):
            say(line)
    return code
