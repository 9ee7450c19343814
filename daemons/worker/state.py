"""What a worker holds across steps, and the helpers every part of it shares.

:class:`WorkerState` is the state of one worker lifetime (its spec, the running attempt,
the pending outcome, timers, the config it runs on) with what the loop
(:mod:`.loop`), starting a task (:mod:`.launch`) and recording an outcome (:mod:`.outcome`)
all use: the config, events (held until the state they report is durable), the spec
write, the exit rule, drain requests, STATUS=, the heartbeat (which extends the running
task's lease) and the systemd watchdog.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from coordination import clock
from coordination.config import ConfigWatch, SystemConfig, load_system, load_worker_types
from coordination.control import read_control
from coordination.errors import (
    ConfigError,
    HarnessError,
    InvalidTransition,
    NotFound,
)
from coordination.events import Event, append_events, make_event
from coordination.paths import Home
from coordination.queue import QueueBackend, open_queue
from coordination.queue.rules import lease_token
from coordination.specs import active_path, write_spec
from coordination.tasks import Task

from ..notify import Notifier
from .options import WorkerOptions
from .scopes import ScopeManager
from .task_run import SpawnError, TaskRun

SOURCE = "worker"


def _log(worker_id: str | None) -> logging.Logger:
    """This worker's diagnostics: ``harness worker ID: ...`` (daemons/diagnostics.py)."""
    return logging.getLogger(f"harness.worker.{worker_id}" if worker_id else "harness.worker")


CANCEL_CHECK_S = 0.5  # a running task's cancel_requested is seen at least this often
STATUS_REFRESH_S = 2.0  # STATUS="busy t-... (12s)" is refreshed this often
RETRY_AFTER_ERROR_S = 2.0  # after a failed queue operation (lock timeout, bad config)
RESULT_FILE = "result.json"


@dataclass
class _Pending:
    """An attempt that ended but whose outcome is not yet recorded (queue busy)."""

    run: TaskRun
    task: Task
    retry_at: float = 0.0
    tries: int = 0  # attempts to record it that failed for a temporary reason
    gave_up: bool = False  # the lease ran out while retrying: recorded as lost
    footer_written: bool = False
    footer_logged_error: bool = False


@dataclass
class Launched:
    """A task started (or refused: nothing runs) by the worker's ``_launch``, keyed by its
    claim (task_id, lease token), until ``_start_task`` adopts it (daemons/worker/launch.py)."""
    key: tuple[str, str | None]
    run: TaskRun  # its spec holds the argv
    refused: SpawnError | None

@dataclass
class _Timers:
    heartbeat_at: float = 0.0
    status_at: float = 0.0
    cancel_check_at: float = 0.0
    watchdog_mono: float = 0.0
    error_until: float = 0.0
    spec_due: float | None = None  # a deferred spec change is published at this instant
    notes: dict[str, float] = field(default_factory=dict)


class WorkerState:
    """The state of one worker lifetime and the helpers its parts share."""

    def __init__(self, home: Home, options: WorkerOptions, *, notifier: Notifier | None = None,
                 environ: dict[str, str] | None = None) -> None:
        self.home = home.require()
        self.opts = options
        self._queue: QueueBackend | None = None
        self.notifier = notifier or Notifier({})
        self.environ = dict(os.environ if environ is None else environ)
        self.worker_id: str = ""
        self.spec: dict[str, Any] = {}
        self.started_at = 0.0
        self.started_iso = ""
        self.idle_since = 0.0
        self.run: TaskRun | None = None
        self.task: Task | None = None
        self.task_started = 0.0
        self.pending: _Pending | None = None
        self.leases: dict[str, str] = {}  # task id -> lease_until, from the last heartbeat
        # A task claimed together with the previous task's completion (complete_and_claim),
        # not started yet. Released (handed back) if the worker exits before starting it.
        self.claimed: Task | None = None
        # The task the claim's hook started, until _start_task adopts it.
        self.launched: Launched | None = None
        # results/.spare-<worker_id>/ is made and empty (TaskLaunch._make_spare).
        self.spare_ready = False
        # Events of committed changes not appended yet: queue events of the latest
        # transaction wait for the task_started event of the task it claimed, so that one
        # append (one fdatasync) carries them all. Always appended before any newer event.
        self.held_events: list[Event] = []
        self.published_state = ""  # the spec's state as last published
        self.tasks_run = 0  # attempts run to an end (completed or failed), for max_tasks
        self.ticks = 0
        self.tick_progress = True
        self.truncation_reported = False
        self.exit_reason: str | None = None
        self.draining = False
        self.dead = False  # the supervisor moved our spec: we are presumed dead
        self.stop_requested_at: float | None = None
        self.spec_dirty = False
        self.t = _Timers()
        self._cfg: SystemConfig | None = None
        self._types: dict[str, dict[str, Any]] = {}
        self._config_watch = ConfigWatch()
        self._control_sig: tuple[int, int, int] | None = None
        self._control: dict[str, Any] = {}
        self._control_step = -1  # the step whose database read _control is (no file)
        self.steps = 0  # steps taken (step() counts them)
        self.subreaper = False  # run_worker sets it: then orphans of tasks are reaped here
        # cgroup_limits: the systemd manager for task scopes (found once), and per worker
        # type and property set whether scopes work (None) or why not (warned about once).
        self._scope_manager: tuple[ScopeManager | None, str] | None = None
        self._scope_checks: dict[tuple[str, tuple[tuple[str, str], ...]], str | None] = {}
        # Set by signal handlers (plain assignments only), consumed by step().
        self.flag_stop = 0
        self.flag_reload = False

    @property
    def queue(self) -> QueueBackend:
        """The home's queue, opened on first use: a worker started on an invalid
        system.json (which names the backend) waits for a good one before it has any."""
        if self._queue is None:
            self._queue = open_queue(self.home)
        return self._queue

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: stop claiming; a second request ends the stop grace at once."""
        self.flag_stop += 1

    def request_reload(self) -> None:
        """SIGHUP: re-read system.json and worker-types.json."""
        self.flag_reload = True

    @property
    def cfg(self) -> SystemConfig:
        assert self._cfg is not None
        return self._cfg

    def _refresh_config(self, now: float, *, announce: bool = False) -> None:
        """Re-read config (cheap: cached by file signature). A broken file keeps the last
        good values and is reported once per change."""
        for event in self._config_watch.check(self.home):
            self._emit(event["type"], event["message"], severity=event["severity"],
                       **event["data"])
        try:
            cfg = load_system(self.home)
            types = load_worker_types(self.home)
        except ConfigError as exc:
            if self._cfg is None:
                raise
            self._note("config_error", now, f"config unreadable, keeping the last good "
                       f"values: {exc}", severity="error")
            return
        self._cfg, self._types = cfg, types
        if announce:
            self._scope_checks.clear()  # SIGHUP: probe the scopes again
            self._emit("worker_reloaded", "configuration re-read (SIGHUP)",
                       idle_exit_s=self.idle_exit_s())

    def idle_exit_s(self) -> float:
        if self.opts.idle_exit_s is not None:
            return float(self.opts.idle_exit_s)
        return float(self.cfg["idle_exit_s"])

    def _launch_claimed(self, task: Task) -> None:
        """The claims' ``prepare`` hook, which starts the claimed task
        (:class:`daemons.worker.launch.TaskLaunch`)."""
        raise NotImplementedError

    def _emit(self, event_type: str, message: str = "", *, task: Task | None = None,
              severity: str = "info", **data: Any) -> None:
        """Append one event (after any held ones, in the same write)."""
        try:
            event = make_event(event_type, severity=severity, source=SOURCE, message=message,
                               task_id=task["task_id"] if task else None,
                               worker_id=self.worker_id or None,
                               correlation_id=task.get("correlation_id") if task else None,
                               data=data)
        except HarnessError as exc:
            _log(self.worker_id).warning("could not emit %s: %s", event_type, exc)
            return
        self.held_events.append(event)
        self._flush_events()

    def _flush_events(self) -> None:
        """Append the held events of committed changes (one write); best effort."""
        if not self.held_events:
            return
        batch, self.held_events = self.held_events, []
        try:
            # Not fdatasynced: each reports a change already durable (see append_events).
            append_events(self.home, batch, durability="none")
        except HarnessError as exc:  # the event log is best effort; the state is durable
            _log(self.worker_id).warning("could not emit %d event(s) (%s): %s", len(batch),
                                         ", ".join(e["type"] for e in batch), exc)

    def _note(self, key: str, now: float, message: str, severity: str = "warning") -> None:
        """Emit a warning at most once a minute per key (errors in a retrying loop)."""
        if now - self.t.notes.get(key, -1e18) >= 60:
            self.t.notes[key] = now
            _log(self.worker_id).warning("%s", message)
            self._emit(f"worker_{key}", message, severity=severity)

    def _write_spec(self, now: float, **changes: Any) -> bool:
        """Publish the spec with ``changes``; False (and dead) when it was moved away."""
        self.spec.update(changes)
        self.spec["heartbeat_at"] = clock.iso(now)
        self.t.heartbeat_at = now
        ok = write_spec(self.home, self.spec)
        self.spec_dirty = False
        self.t.spec_due = None
        if ok:
            self.published_state = str(self.spec.get("state"))
        if not ok and not self.dead:
            self.dead = True
            _log(self.worker_id).warning("our spec was moved to completed/ (the supervisor "
                                         "declared us dead); stopping")
        return ok

    def _exit_due(self, now: float, *, after_task: bool = False) -> str | None:
        """Why the worker must exit now (None: it may claim). ``after_task``: asked while
        the outcome of the attempt that just ended is being recorded, to decide whether to
        claim the next task in the same transaction: that attempt counts as run already,
        the worker is not idle, and a stop signal not yet taken counts too."""
        if after_task and self.exit_reason is not None:
            return self.exit_reason  # shutting down already
        if self.dead or self._spec_gone():
            return "error"
        if self.stop_requested_at is not None or (after_task and self.flag_stop):
            return "signal"
        if self.draining or self._drain_requested():
            return "drained"
        tasks_run = self.tasks_run + (1 if after_task else 0)
        if self.opts.once and tasks_run >= 1:
            return "once"
        if self.opts.max_tasks is not None and tasks_run >= self.opts.max_tasks:
            return "max_tasks"
        if self.opts.max_uptime_s is not None and now - self.started_at >= self.opts.max_uptime_s:
            return "max_uptime"
        idle_exit = self.idle_exit_s()
        if not after_task and idle_exit > 0 and now - self.idle_since >= idle_exit:
            return "idle"
        return None

    def _spec_gone(self) -> bool:
        """Has our spec left ``worker-specs/active/``? Only the supervisor (or ``doctor
        --repair``) moves it, after proving us dead and reclaiming our task: then we must
        claim nothing more and exit without writing a spec (write_spec never re-creates it;
        complete_spec is skipped once ``dead`` is set). One stat, checked before every
        claim; a spec is published by rename, so it never looks absent while active."""
        if not self.worker_id or self.dead:
            return self.dead
        if os.path.exists(active_path(self.home, self.worker_id)):
            return False
        self.dead = True
        _log(self.worker_id).warning("our spec was moved out of worker-specs/active/ (the "
                                     "supervisor declared us dead); claiming nothing more, "
                                     "exiting")
        return True

    def _read_control(self) -> dict[str, Any]:
        try:
            st = os.stat(self.home.control_file)
            sig: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            sig = None
        # No file (a postgres home keeps control in the database, or nothing was ever
        # paused): read once per step, a round trip each on postgres; a change wakes the
        # loop (NOTIFY, inotify), and the next step reads it.
        if sig is None and self._control_step == self.steps and self._control:
            return self._control
        if sig is None or sig != self._control_sig or not self._control:
            self._control = read_control(self.home)
            self._control_sig = sig
            self._control_step = self.steps
        return self._control

    def _drain_requested(self) -> bool:
        try:
            drain = self._read_control().get("drain") or {}
        except HarnessError:
            return False
        requests = [drain.get("all"), (drain.get("instances") or {}).get(self.opts.instance)]
        return any(isinstance(ts, str) and ts > self.started_iso for ts in requests)

    def _status(self, now: float) -> None:
        if self.task is None:
            return
        elapsed = int(max(0.0, now - self.task_started))
        if self.stop_requested_at is not None:
            word = "stopping"
        elif self.draining:
            word = "draining"
        else:
            word = "busy"
        self.notifier.status(f"{word} {self.task['task_id']} ({elapsed}s)")
        self.t.status_at = now + STATUS_REFRESH_S

    def _housekeeping(self, now: float, *, busy: bool) -> None:
        """Heartbeat, STATUS= refresh and the systemd watchdog, whichever is due."""
        interval = float(self.cfg["heartbeat_interval_s"]) if busy else self._idle_heartbeat_s()
        if now - self.t.heartbeat_at >= interval:
            self._heartbeat(now)
            changes: dict[str, Any] = {}
            if busy and self.run is not None:
                self.ticks += self.tick_progress
                changes["progress"] = self.run.output_bytes + self.ticks
            self._write_spec(now, **changes)
        if busy and now >= self.t.status_at:
            self._status(now)
        self._watchdog_ping()

    def _idle_heartbeat_s(self) -> float:
        """Idle workers refresh heartbeat_at less often than busy ones, but well within
        heartbeat_timeout_s so the supervisor never mistakes idleness for death."""
        cfg = self.cfg
        return max(float(cfg["heartbeat_interval_s"]), float(cfg["heartbeat_timeout_s"]) / 3)

    def _watchdog_wait(self) -> float | None:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return None
        return max(0.0, self.t.watchdog_mono + interval - time.monotonic())

    def _watchdog_ping(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        mono = time.monotonic()
        if mono - self.t.watchdog_mono >= interval:
            self.t.watchdog_mono = mono
            self.notifier.watchdog()

    def _heartbeat(self, now: float) -> None:
        """Extend the lease of the running task (and, with postgres, our row in the worker
        registry). A lost lease (reclaimed while we were paused or cut off) stops the task
        like a timeout and records nothing (outcome ``lost``); a failed heartbeat (the
        database restarting) never stops the task: the next one may succeed, and the lease
        outlives several missed ones."""
        run, task = self.run, self.task
        leases: dict[str, str] = {}
        if run is not None and task is not None and not run.finished \
                and run.stop_reason is None:
            leases[task["task_id"]] = lease_token(task)
        try:
            extended = self.queue.heartbeat(self.worker_id, leases, now=now)
        except (NotFound, InvalidTransition) as exc:
            if run is not None and task is not None and run.stop_reason is None:
                self._emit("task_lost", f"lease lost ({exc}); stopping the task",
                           task=task, severity="warning")
                run.terminate("lost")
            return
        except HarnessError as exc:
            self._note("heartbeat_failed", now, f"cannot extend the lease: {exc}; the task "
                       "keeps running")
            return
        self.leases = extended
