"""``harness worker run``: claim tasks, run each in its own process group, record outcomes.

Structure
- :class:`Worker` holds the state; :meth:`Worker.step` is the whole loop body. It takes the
  current time, does what is due (claim, supervise the running task, heartbeat, exit
  checks) and returns how long the loop may sleep (``None``: exit now). Tests drive it
  directly without sleeping.
- :func:`run_worker` is the loop around it: it only waits on a :class:`~daemons.wakeup.Wakeup`
  (inotify on the home, signals, task EOF/exit) with the timeout ``step`` returned, and turns
  signals into flags. An idle worker therefore sleeps in the kernel until a task arrives,
  ``safety_recheck_s`` passes, a queued task's ``not_before`` comes due, or a heartbeat or
  systemd watchdog ping is due.

Ordering: each event is emitted after the state it reports is durable (queue committed).
The worker's spec moves to ``worker-specs/completed/`` with ``exit_reason`` on every exit
path except when the supervisor already moved it (declared us dead); the worker checks that
its spec is still in ``active/`` before every claim and exits (``error``) once it is not.

Throughput (back-to-back tasks): the outcome of a completed task and the claim of the next
are one queue transaction (``QueueBackend.complete_and_claim``); its events are appended
in one write together with the next task's ``task_started``; a worker going straight on from
one task to the next publishes its spec's new ``current_task_id`` only once that task has
run ``SPEC_DEFER_S`` or at the next heartbeat (idle/busy/draining/stopping transitions are
published at once). A task claimed that way but not started when the worker must exit is
released (handed back without spending an attempt).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from coordination import clock
from coordination.config import (
    ConfigWatch,
    SystemConfig,
    keep_last_good,
    load_system,
    load_worker_types,
    scope_properties,
)
from coordination.control import read_control
from coordination.errors import (
    ConfigError,
    CorruptFileError,
    HarnessError,
    InvalidTransition,
    NotFound,
    TemporaryFailure,
    UnsafePath,
    UsageError,
)
from coordination.events import append_events, make_event
from coordination.paths import Home
from coordination.queue import QueueBackend, open_queue
from coordination.queue.rules import lease_token
from coordination.redact import redact_argv, redact_text
from coordination.specs import active_path, complete_spec, liveness, new_spec, write_spec
from coordination.store import parse_json, prepare_task_folder, read_in_folder, read_json

from .notify import Notifier
from .task_runner import (
    RunSpec,
    Scope,
    ScopeManager,
    SpawnError,
    TaskRun,
    become_subreaper,
    build_env,
    describe_exit,
    find_scope_manager,
    header_line,
    probe_scope,
    reap_orphans,
    scope_unit_name,
)
from .wakeup import Wakeup

SOURCE = "worker"


def _log(worker_id: str | None) -> logging.Logger:
    """This worker's diagnostics: ``harness worker ID: ...`` (daemons/diagnostics.py)."""
    return logging.getLogger(f"harness.worker.{worker_id}" if worker_id else "harness.worker")


CANCEL_CHECK_S = 0.5  # a running task's cancel_requested is seen at least this often
STATUS_REFRESH_S = 2.0  # STATUS="busy t-... (12s)" is refreshed this often
RETRY_AFTER_ERROR_S = 2.0  # after a failed queue operation (lock timeout, bad config)
# Recording an outcome that failed for a temporary reason (database restarting, lock
# timeout) is retried after this long, doubling up to RETRY_AFTER_ERROR_S, while the task's
# lease could still be valid (see _retry_pending).
OUTCOME_RETRY_MIN_S = 0.1
# A busy worker that goes straight on to its next task publishes the new current_task_id
# only once that task has run this long (or at the next heartbeat): back-to-back short
# tasks then cost no spec write each. Going busy from idle, draining, stopping and going
# idle are published at once.
SPEC_DEFER_S = 0.05
MAX_RESULT_BYTES = 1 << 20
RESULT_FILE = "result.json"
EXIT_CODES = {"error": 1}  # every other exit_reason is a clean exit (0)


@dataclass
class WorkerOptions:
    """What ``harness worker run`` was asked to do (None: not limited / from system.json)."""

    instance: str = "0"
    types: list[str] | None = None
    idle_exit_s: float | None = None
    max_tasks: int | None = None
    max_uptime_s: float | None = None
    once: bool = False
    unit: str | None = None


@dataclass
class _Pending:
    """An attempt that ended but whose outcome is not yet recorded (queue busy)."""

    run: TaskRun
    task: dict[str, Any]
    retry_at: float = 0.0
    tries: int = 0  # attempts to record it that failed for a temporary reason
    gave_up: bool = False  # the lease ran out while retrying: recorded as lost
    footer_written: bool = False
    footer_logged_error: bool = False


@dataclass
class _Timers:
    heartbeat_at: float = 0.0
    status_at: float = 0.0
    cancel_check_at: float = 0.0
    watchdog_mono: float = 0.0
    error_until: float = 0.0
    spec_due: float | None = None  # a deferred spec change is published at this instant
    notes: dict[str, float] = field(default_factory=dict)


def default_instance(environ: Mapping[str, str] | None = None) -> str:
    """``$HARNESS_INSTANCE``, else the instance of our systemd unit, else ``"0"``."""
    env = os.environ if environ is None else environ
    if env.get("HARNESS_INSTANCE"):
        return env["HARNESS_INSTANCE"]
    unit = systemd_unit(env)
    if unit and "@" in unit:
        return unit.split("@", 1)[1].rsplit(".", 1)[0] or "0"
    return "0"


def systemd_unit(environ: Mapping[str, str] | None = None) -> str | None:
    """The systemd unit we run in (from /proc/self/cgroup), when started by systemd."""
    env = os.environ if environ is None else environ
    if not env.get("INVOCATION_ID"):
        return None
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        for part in reversed(line.rsplit(":", 1)[-1].split("/")):
            if part.endswith(".service"):
                return part
    return None


class Worker:
    """One worker lifetime: register, claim/run/record until an exit reason, deregister."""

    def __init__(self, home: Home, options: WorkerOptions, *, notifier: Notifier | None = None,
                 wake: Callable[[], None] | None = None,
                 environ: dict[str, str] | None = None) -> None:
        self.home = home.require()
        self.opts = options
        self._queue: QueueBackend | None = None
        self.notifier = notifier or Notifier({})
        self.wake = wake or (lambda: None)
        self.environ = dict(os.environ if environ is None else environ)
        self.worker_id: str = ""
        self.spec: dict[str, Any] = {}
        self.started_at = 0.0
        self.started_iso = ""
        self.idle_since = 0.0
        self.run: TaskRun | None = None
        self.task: dict[str, Any] | None = None
        self.task_started = 0.0
        self.pending: _Pending | None = None
        self.leases: dict[str, str] = {}  # task id -> lease_until, from the last heartbeat
        # A task claimed together with the previous task's completion (complete_and_claim),
        # not started yet. Released (handed back) if the worker exits before starting it.
        self.claimed: dict[str, Any] | None = None
        # Events of committed changes not appended yet: queue events of the latest
        # transaction wait for the task_started event of the task it claimed, so that one
        # append (one fdatasync) carries them all. Always appended before any newer event.
        self.held_events: list[dict[str, Any]] = []
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
        self.subreaper = False  # run_worker sets it: then orphans of tasks are reaped here
        # cgroup_limits: the systemd manager for task scopes (found once), and per worker
        # type and property set whether scopes work (None) or why not (warned about once).
        self._scope_manager: tuple[ScopeManager | None, str] | None = None
        self._scope_checks: dict[tuple[str, tuple[tuple[str, str], ...]], str | None] = {}
        # Set by signal handlers (plain assignments only), consumed by step().
        self.flag_stop = 0
        self.flag_reload = False

    # ------------------------------------------------------------------ signal flags

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

    # ------------------------------------------------------------------ config
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

    # ------------------------------------------------------------------ events
    def _emit(self, event_type: str, message: str = "", *, task: dict[str, Any] | None = None,
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

    # ------------------------------------------------------------------ lifecycle
    def start(self, now: float) -> dict[str, Any]:
        """Register: publish our spec in worker-specs/active/, then READY=1."""
        self._refresh_config(now)
        known = self._types
        for name in self.opts.types or ():
            if name not in known:
                raise UsageError(f"--types: unknown worker type {name!r}; known: "
                                 f"{', '.join(sorted(known))}")
        self.worker_id = clock.new_worker_id(self.opts.instance, now)
        self.started_at = self.idle_since = now
        spec = new_spec(self.worker_id, self.opts.instance, now, types=self.opts.types,
                        unit=self.opts.unit)
        spec["state"] = "idle"
        self.spec = spec
        self.started_iso = spec["started_at"]
        write_spec(self.home, spec, create=True)
        self.published_state = spec["state"]
        self.t.heartbeat_at = now
        self._emit("worker_started", f"worker {self.worker_id} registered",
                   pid=spec["pid"], instance=self.opts.instance, types=self.opts.types,
                   unit=self.opts.unit)
        self.notifier.ready(status="idle")
        return spec

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

    def shutdown(self, now: float) -> dict[str, Any] | None:
        """Stop whatever still runs, deregister (spec to completed/), STOPPING=1."""
        reason = self.exit_reason or "error"
        self.exit_reason = reason
        self.notifier.stopping(status=f"stopping ({reason})")
        if self.run is not None and not self.run.finished:
            # Not the task's fault: hand it back (release) unless it was already being
            # stopped for a reason of its own (timeout, cancel).
            self.run.kill_now("stopping")
            self.run.close()
        if self.run is not None and self.task is not None:
            self.pending = _Pending(self.run, self.task)
            self.run = self.task = None
        if self.pending is not None:
            pending, self.pending = self.pending, None
            with contextlib.suppress(HarnessError):
                self._record(pending, now)
        self._release_claimed(now)
        self._flush_events()
        if not self.worker_id:
            return None
        if self._queue is not None:
            with contextlib.suppress(HarnessError):  # else doctor reports the row later
                self._queue.forget_worker(self.worker_id)
        done: dict[str, Any] | None = None
        if not self.dead:
            extra = {k: self.spec.get(k) for k in ("tasks_done", "tasks_failed", "tokens_used",
                                                   "progress")}
            extra.update(heartbeat_at=clock.iso(now), task_started_at=None)
            try:
                done = complete_spec(self.home, self.worker_id, reason, now, extra=extra)
            except NotFound:
                self.dead = True
        self._emit("worker_stopped", f"worker {self.worker_id} exited: {reason}",
                   severity="error" if reason == "error" else "info", exit_reason=reason,
                   tasks_done=self.spec.get("tasks_done"),
                   tasks_failed=self.spec.get("tasks_failed"),
                   tokens_used=self.spec.get("tokens_used"))
        return done

    # ------------------------------------------------------------------ the step
    def step(self, now: float) -> float | None:
        """Do what is due at ``now``; return how long to wait (None: exit now)."""
        if self.exit_reason is not None:
            return None
        self._take_flags(now)
        self._refresh_config(now)
        if self.pending is not None:
            wait = self._retry_pending(now)
            if wait is not None:
                # Alive while the queue is away: the spec heartbeat and the systemd
                # watchdog go on, so nobody takes us for dead meanwhile.
                if now - self.t.heartbeat_at >= float(self.cfg["heartbeat_interval_s"]):
                    self._write_spec(now)
                self._watchdog_ping()
                wd = self._watchdog_wait()
                return wait if wd is None else min(wait, wd)
        if self.run is not None:
            return self._supervise(now)
        return self._idle_step(now)

    def _take_flags(self, now: float) -> None:
        if self.flag_reload:
            self.flag_reload = False
            self._refresh_config(now, announce=True)
        if self.flag_stop and self.stop_requested_at is None:
            self.stop_requested_at = now
            self._emit("worker_stopping", "stop requested (signal)",
                       task=self.task, stop_grace_s=self.cfg["stop_grace_s"])
            if self.run is not None:
                self._write_spec(now, state="stopping")
                self._status(now)
        if self.flag_stop >= 2 and self.run is not None and self.run.stop_reason is None:
            self.run.terminate("stopping")  # second signal: no more grace

    # -------------------------------------------------------------- idle
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

    def _release_claimed(self, now: float) -> None:
        """Hand back a task claimed with the previous completion but not started (the
        attempt does not count). If that fails, the task stays running under our id and
        the supervisor reclaims it once we are gone (at-least-once either way)."""
        if self.claimed is None:
            return
        claimed, self.claimed = self.claimed, None
        self._flush_events()
        try:
            self.queue.release(claimed["task_id"], self.worker_id,
                               reason="worker exiting before the task started; handed back "
                               "without spending an attempt", now=now,
                               lease=lease_token(claimed))
        except HarnessError as exc:
            _log(self.worker_id).error("could not hand back %s: %s", claimed["task_id"], exc)

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

    def _idle_step(self, now: float) -> float | None:
        reason = self._exit_due(now)
        if reason is not None:
            self._release_claimed(now)
            self._flush_events()
            self.exit_reason = reason
            return None
        if self.claimed is not None:
            claimed, self.claimed = self.claimed, None
            self._start_task(claimed, now)
            if self.run is not None:
                return self._supervise(now)
            return 0.0
        if now < self.t.error_until:
            self._flush_events()
            return self._idle_wait(now)
        try:
            task = self.queue.claim(self.worker_id, types=self.opts.types, now=now,
                                    events_out=self.held_events)
        except (TemporaryFailure, ConfigError, CorruptFileError) as exc:
            self._note("claim_failed", now, f"claim failed: {exc}")
            self.t.error_until = now + RETRY_AFTER_ERROR_S
            return self._idle_wait(now)
        if task is not None:
            self._start_task(task, now)
            if self.run is not None:
                return self._supervise(now)
            return 0.0  # spawn failed and was recorded: look for the next task at once
        self._flush_events()
        if self.opts.once:
            self.exit_reason = "idle"
            return None
        if (self.spec.get("state") != "idle" or self.spec_dirty) and not self._write_spec(
                now, state="idle", current_task_id=None, task_started_at=None):
            self.exit_reason = "error"
            return None
        self.notifier.status("idle")
        self._housekeeping(now, busy=False)
        if self.dead:
            self.exit_reason = "error"
            return None
        return self._idle_wait(now)

    def _idle_wait(self, now: float) -> float:
        cfg = self.cfg
        waits = [float(cfg["safety_recheck_s"])]
        idle_exit = self.idle_exit_s()
        if idle_exit > 0:
            waits.append(self.idle_since + idle_exit - now)
        if self.opts.max_uptime_s is not None:
            waits.append(self.started_at + self.opts.max_uptime_s - now)
        if now < self.t.error_until:
            waits.append(self.t.error_until - now)
        waits.append(self.t.heartbeat_at + self._idle_heartbeat_s() - now)
        due = self._next_runnable_at(now)
        if due is not None:
            waits.append(due - now)
        wd = self._watchdog_wait()
        if wd is not None:
            waits.append(wd)
        return max(0.0, min(waits))

    def _idle_heartbeat_s(self) -> float:
        """Idle workers refresh heartbeat_at less often than busy ones, but well within
        heartbeat_timeout_s so the supervisor never mistakes idleness for death."""
        cfg = self.cfg
        return max(float(cfg["heartbeat_interval_s"]), float(cfg["heartbeat_timeout_s"]) / 3)

    def _next_runnable_at(self, now: float) -> float | None:
        """The earliest future instant at which a queued task of ours may become runnable
        without any file changing: a not_before or a pause's ``until`` coming due."""
        soonest: float | None = None
        try:
            # The queue answers from its index: an idle worker never parses the backlog.
            due = self.queue.next_due(types=self.opts.types, now=now)
            control = self._read_control()
        except HarnessError:
            return None
        if due is not None:
            try:
                soonest = clock.parse_iso(due)
            except ValueError:
                soonest = None
        for info in (control.get("paused_types") or {}).values():
            until = info.get("until") if isinstance(info, dict) else None
            if until:
                try:
                    ts = clock.parse_iso(until)
                except ValueError:
                    continue
                if ts > now and (soonest is None or ts < soonest):
                    soonest = ts
        if soonest is not None:
            soonest += 0.002  # claims compare millisecond timestamps: be just past it
        return soonest

    def _read_control(self) -> dict[str, Any]:
        try:
            st = os.stat(self.home.control_file)
            sig: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            sig = None
        # No file (a postgres home keeps control in the database): read it every time.
        if sig is None or sig != self._control_sig or not self._control:
            self._control = read_control(self.home)
            self._control_sig = sig
        return self._control

    def _drain_requested(self) -> bool:
        try:
            drain = self._read_control().get("drain") or {}
        except HarnessError:
            return False
        requests = [drain.get("all"), (drain.get("instances") or {}).get(self.opts.instance)]
        return any(isinstance(ts, str) and ts > self.started_iso for ts in requests)

    # -------------------------------------------------------------- starting a task
    def _task_env(self, task: dict[str, Any], wtype: dict[str, Any], result_file: Path) \
            -> dict[str, str]:
        allow = list(self.cfg["env_allowlist"]) + list(wtype.get("env_allowlist") or [])
        return build_env(self.environ, allow, {
            "HARNESS_TASK_ID": task["task_id"],
            "HARNESS_HOME": str(self.home.root),
            "HARNESS_ATTEMPT": str(task["attempts"]),
            "HARNESS_RESULT_FILE": str(result_file),
            "HARNESS_WORKER_ID": self.worker_id,
        })

    def _task_cwd(self, wtype: dict[str, Any], result_dir: Path) -> Path:
        configured = wtype.get("cwd")
        if configured:
            path = Path(os.path.expanduser(configured))
            return path if path.is_absolute() else self.home.root / path
        return result_dir if result_dir.is_dir() else self.home.root

    def _task_scope(self, task: dict[str, Any], type_name: str, wtype: dict[str, Any]) \
            -> Scope | None:
        """The transient scope of this attempt: under a systemd manager that accepts
        transient scopes from us, every task gets one (its cgroup is what stopping the task
        kills, docs/security.md), bound to our own unit (BindsTo=, ordered Before= it) so a
        task never outlives its worker's unit, with the type's ``cgroup_limits`` if any.
        Else None: the task runs without a scope (the descendant sweep of the subreaper
        still stops all of it). Whether the manager accepts the scope is found out once per
        type and property set (a probe scope); a refusal is one
        ``worker_cgroup_limits_unavailable`` warning for a type that sets cgroup_limits, a
        line on stderr otherwise."""
        limits = scope_properties(wtype)
        if self._scope_manager is None:
            self._scope_manager = find_scope_manager(self.environ)
        manager, reason = self._scope_manager
        if manager is None and not limits:
            return None
        props = dict(limits)
        if self.opts.unit:  # our own unit, found once at start (systemd_unit)
            props.update(BindsTo=self.opts.unit, Before=self.opts.unit)
        key = (type_name, tuple(props.items()))
        if key not in self._scope_checks:
            problem = reason if manager is None else probe_scope(manager, props)
            self._scope_checks[key] = problem
            if problem is not None and limits:
                message = (f"worker type {type_name!r} sets cgroup_limits but {problem}; its "
                           f"tasks run without a scope (setrlimit limits still apply)")
                _log(self.worker_id).warning("%s", message)
                self._emit("worker_cgroup_limits_unavailable", message, severity="warning",
                           worker_type=type_name, reason=problem, properties=limits)
            elif problem is not None:
                _log(self.worker_id).warning("tasks of type %r run without a transient scope: %s",
                                             type_name, problem)
        if manager is None or self._scope_checks[key] is not None:
            return None
        return Scope(manager, scope_unit_name(task["task_id"], int(task["attempts"])), props)

    def _start_task(self, task: dict[str, Any], now: float) -> None:
        task_id = task["task_id"]
        type_name = task.get("worker_type") or "default"
        wtype = self._types.get(type_name) or {}
        scope = self._task_scope(task, type_name, wtype)
        result_dir = self.home.result_dir(task_id)
        result_file = result_dir / RESULT_FILE
        refused: SpawnError | None = None
        try:
            # A real folder of the home (never a planted link), without the previous
            # attempt's result.
            prepare_task_folder(result_dir, RESULT_FILE)
        except UnsafePath as exc:
            refused = SpawnError(str(exc), retry=False, exit_code=126)
        except OSError:
            pass  # the task still runs (in the home); its result cannot be kept
        argv = list(task["command"])
        spec = RunSpec(
            task_id=task_id, attempt=int(task["attempts"]), argv=argv,
            cwd=self._task_cwd(wtype, result_dir),
            env=self._task_env(task, wtype, result_file),
            log_path=self.home.task_log(task_id),
            log_max_bytes=int(self.cfg["task_log_max_bytes"]),
            kill_grace_s=float(self.cfg["kill_grace_s"]),
            limits=dict(wtype.get("limits") or {}),
            header=header_line(task, self.worker_id, redact_argv(argv), now), scope=scope,
            sweep_descendants=self.subreaper)
        run = TaskRun(spec, wake=self.wake)
        try:
            if refused is not None:
                raise refused
            run.start()
        except SpawnError as exc:
            self._flush_events()  # the claim's events come before the failure's
            self.tasks_run += 1
            self.spec["tasks_failed"] = int(self.spec.get("tasks_failed") or 0) + 1
            self.spec_dirty = True
            run.append_log_line(f"=== harness: {exc} ===")
            with contextlib.suppress(NotFound, InvalidTransition):
                self.queue.fail(task_id, self.worker_id, error=str(exc),
                                exit_code=exc.exit_code, retry=exc.retry,
                                lease=lease_token(task))
            self._emit("task_spawn_failed", str(exc), task=task, severity="error",
                       retry=exc.retry)
            return
        self.run, self.task, self.task_started = run, task, now
        self.ticks = 0
        # Heartbeat ticks count as progress unless the type wants silence to be a stall.
        self.tick_progress = not wtype.get("stall_on_silence", False)
        self.truncation_reported = False
        self.t.cancel_check_at = now + CANCEL_CHECK_S
        self.t.status_at = now + STATUS_REFRESH_S
        changes = {"state": "draining" if self.draining else "busy",
                   "current_task_id": task_id, "task_started_at": clock.iso(now),
                   "progress": 0}
        if self.published_state == changes["state"] and not self.dead:
            # Straight on from the previous task: published once this one has run
            # SPEC_DEFER_S (see _supervise) or with the next heartbeat, whichever is first.
            self.spec.update(changes)
            self.spec_dirty = True
            self.t.spec_due = now + SPEC_DEFER_S
        else:
            self._write_spec(now, **changes)
        extra = {"scope": run.scope_unit} if run.scope_unit else {}
        self._emit("task_started", f"attempt {task['attempts']} started as pid {run.pid}",
                   task=task, pid=run.pid, attempt=task["attempts"], argv=argv[:20], **extra)
        self._status(now)

    # -------------------------------------------------------------- supervising
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

    def _check_task_record(self, now: float) -> None:
        """Has the operator cancelled our task, or has it been taken away from us?"""
        assert self.run is not None and self.task is not None
        self.t.cancel_check_at = now + CANCEL_CHECK_S
        try:
            live = self.queue.get(self.task["task_id"])
        except HarnessError as exc:
            self._note("queue_read_failed", now, f"cannot read the queue: {exc}")
            return
        if live is None or live.get("status") != "running" \
                or live.get("worker_id") != self.worker_id \
                or lease_token(live) != lease_token(self.task):
            if self.run.stop_reason is None:
                self._emit("task_lost", "the task is no longer ours (reclaimed?); stopping it",
                           task=self.task, severity="warning")
            self.run.terminate("lost")
        elif live.get("cancel_requested") and self.run.stop_reason is None:
            self.run.terminate("cancelled")
            self._emit("task_cancel_stopping", "cancel requested: stopping the task",
                       task=self.task)

    def _supervise(self, now: float) -> float:
        run, task = self.run, self.task
        assert run is not None and task is not None
        if not run.finished:
            if self.draining is False and self._drain_requested():
                self.draining = True
                self._write_spec(now, state="draining")
                self._emit("worker_draining", "drain requested: finishing the current task",
                           task=task)
            self._check_task_record(now)
            timeout_s = task.get("timeout_s")
            if timeout_s and now - self.task_started >= float(timeout_s) \
                    and run.stop_reason is None:
                run.terminate("timeout")
                self._emit("task_timeout", f"timed out after {timeout_s}s; stopping the "
                           "process group", task=task, severity="warning",
                           timeout_s=timeout_s, pid=run.pid)
            stop_grace = float(self.cfg["stop_grace_s"])
            if self.stop_requested_at is not None and run.stop_reason is None \
                    and now - self.stop_requested_at >= stop_grace:
                run.terminate("stopping")
            if self.dead and run.stop_reason is None:
                run.terminate("dead")
            run.poll()
            if not run.finished and self.t.spec_due is not None and now >= self.t.spec_due:
                self._write_spec(now)
        if run.truncated and not self.truncation_reported:
            self.truncation_reported = True
            self._emit("task_output_truncated", f"output cut at {run.spec.log_max_bytes} bytes",
                       task=task, severity="warning", cap_bytes=run.spec.log_max_bytes)
        if run.finished:
            self.run = self.task = None
            self.pending = _Pending(run, task)
            wait = self._retry_pending(now)
            return 0.0 if wait is None else wait
        self._housekeeping(now, busy=True)
        waits = [self.t.cancel_check_at - now, self.t.status_at - now,
                 self.t.heartbeat_at + float(self.cfg["heartbeat_interval_s"]) - now]
        if self.t.spec_due is not None:
            waits.append(self.t.spec_due - now)
        nxt = run.next_poll_in()
        if nxt is not None:
            waits.append(nxt)
        timeout_s = task.get("timeout_s")
        if timeout_s and run.stop_reason is None:
            waits.append(self.task_started + float(timeout_s) - now)
        if self.stop_requested_at is not None and run.stop_reason is None:
            waits.append(self.stop_requested_at + float(self.cfg["stop_grace_s"]) - now)
        wd = self._watchdog_wait()
        if wd is not None:
            waits.append(wd)
        return max(0.0, min(waits))

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

    # -------------------------------------------------------------- outcomes
    def _retry_pending(self, now: float) -> float | None:
        """Record the pending outcome; None when done, else how long to wait to retry."""
        pending = self.pending
        assert pending is not None
        if now < pending.retry_at:
            return pending.retry_at - now
        try:
            self._record(pending, now)
        except (TemporaryFailure, ConfigError) as exc:
            # Keep the outcome and retry with a bounded backoff (the database restarting,
            # a busy lock) while our lease could still be valid: until then nobody else
            # may take the task, and once it is back the fenced commit lands exactly once.
            # Past that the task is presumably reclaimed by some supervisor: give up and
            # record nothing (it runs again elsewhere; nothing is lost).
            pending.tries += 1
            if now >= self._lease_deadline(pending.task):
                pending.gave_up = True
                self._record(pending, now)
            else:
                self._note("record_failed", now, f"cannot record the outcome of "
                           f"{pending.task['task_id']} yet: {exc}")
                delay = min(OUTCOME_RETRY_MIN_S * 2.0 ** (pending.tries - 1),
                            RETRY_AFTER_ERROR_S)
                pending.retry_at = now + delay
                return delay
        self.pending = None
        self.idle_since = now
        return None

    def _read_result(self, task: dict[str, Any], now: float) -> dict[str, Any] | None:
        path = self.home.result_dir(task["task_id"]) / RESULT_FILE
        problem: str | None = None
        try:
            data = read_in_folder(path, MAX_RESULT_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (UnsafePath, OSError) as exc:
            data, problem = b"", str(exc)
        result: Any = None
        if problem is not None:
            pass
        elif len(data) > MAX_RESULT_BYTES:
            problem = f"result file is over {MAX_RESULT_BYTES} bytes"
        else:
            try:
                result = parse_json(path, data)
            except CorruptFileError as exc:
                problem = str(exc)
            else:
                if not isinstance(result, dict):
                    problem = "result file must hold a JSON object"
        if problem is not None:
            self._emit("task_result_invalid", problem, task=task, severity="warning",
                       path=str(path))
            return None
        return dict(result)

    def _budget(self, task: dict[str, Any]) -> int | None:
        if task.get("budget") is not None:
            return int(task["budget"])
        wtype = self._types.get(task.get("worker_type") or "default") or {}
        budget = wtype.get("default_budget")
        return None if budget is None else int(budget)

    def _record(self, pending: _Pending, now: float) -> None:
        """Write the attempt's outcome to the queue (complete / fail / release)."""
        run, task = pending.run, pending.task
        exit_code, phrase = describe_exit(run.returncode)
        reason = run.stop_reason
        if reason is None and run.scope_refused:
            reason = "scope_refused"
            self._scope_checks.clear()  # probe again before the next scope
        if not pending.footer_written:
            pending.footer_written = True
            run.append_log_line(f"=== harness: {phrase} after {run.duration_s():.3f}s"
                                + (f" ({reason})" if reason else "") + " ===")
        if run.log_error and not pending.footer_logged_error:
            pending.footer_logged_error = True
            self._emit("task_log_failed", f"output after a failed log write was dropped: "
                       f"{run.log_error}", task=task, severity="warning")
        result = self._read_result(task, now)
        tokens = result.get("tokens_used") if result else None
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            tokens = None
        spec = self.spec
        if reason == "lost":
            outcome = "lost"
        elif pending.gave_up:
            outcome = "lost"
            self._emit("task_outcome_dropped", "could not record the outcome before the "
                       f"lease ended ({task.get('lease_until')}): the task is left to be "
                       "reclaimed and run again", task=task, severity="warning")
        else:
            try:
                outcome = self._commit_outcome(task, run, reason, exit_code, phrase, result,
                                               tokens, now)
            except (NotFound, InvalidTransition) as exc:
                # After a temporary failure the earlier try may have committed (the reply
                # was lost with the connection): then the record carries our lease.
                outcome = (self._landed(task) if pending.tries else None) or "lost"
                if outcome == "lost":
                    self._emit("task_outcome_dropped", f"could not record the outcome: "
                               f"{exc}", task=task, severity="warning")
        if tokens:
            spec["tokens_used"] = int(spec.get("tokens_used") or 0) + tokens
        if outcome == "completed":
            spec["tasks_done"] = int(spec.get("tasks_done") or 0) + 1
        elif outcome not in ("released", "lost"):
            spec["tasks_failed"] = int(spec.get("tasks_failed") or 0) + 1
        if outcome != "released":
            self.tasks_run += 1
        if self.subreaper:
            reap_orphans()
        spec["current_task_id"] = None
        spec["task_started_at"] = None
        self.spec_dirty = True
        if outcome == "lost" and not self.dead and not self._declared_dead(now):
            self._write_spec(now, state="idle")

    def _declared_dead(self, now: float) -> bool:
        """After a task was taken from us: are we (about to be) declared dead? The supervisor
        reclaims the task first and moves our spec after, so judge the spec on disk by the
        supervisor's own rule instead of overwriting it. True also sets ``dead``."""
        try:
            on_disk = read_json(active_path(self.home, self.worker_id))
            proof = liveness(on_disk, now, float(self.cfg["heartbeat_timeout_s"])) \
                if isinstance(on_disk, dict) else None
        except FileNotFoundError:
            proof = "our spec was moved to completed/"
        except CorruptFileError:
            proof = None  # our next write replaces it
        if proof is None:
            return False
        self.dead = True
        _log(self.worker_id).warning("presumed dead by the supervisor (%s); stopping", proof)
        return True

    def _lease_deadline(self, task: dict[str, Any]) -> float:
        """Until when the lease of ``task`` may still hold: its last known ``lease_until``
        (the claim's, or the newest heartbeat's); a task without one, one lease from now."""
        until = self.leases.get(task["task_id"]) or task.get("lease_until")
        try:
            return clock.parse_iso(str(until))
        except ValueError:
            return clock.now() + float(self.cfg["heartbeat_timeout_s"])

    def _landed(self, task: dict[str, Any]) -> str | None:
        """Whether a commit of ours whose reply was lost did land: the task's final record
        ends our claim (same worker, same lease token). Its outcome, else None."""
        try:
            record = self.queue.get(task["task_id"])
        except HarnessError:
            return None
        if not record or record.get("status") not in ("completed", "failed", "cancelled") \
                or record.get("worker_id") != self.worker_id \
                or record.get("lease_token") != task.get("lease_token"):
            return None
        return "completed" if record["status"] == "completed" else str(record["status"])

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

    def _commit_outcome(self, task: dict[str, Any], run: TaskRun, reason: str | None,
                        exit_code: int | None, phrase: str, result: dict[str, Any] | None,
                        tokens: int | None, now: float) -> str:
        task_id, wid, lease = task["task_id"], self.worker_id, lease_token(task)
        if reason == "stopping":
            self.queue.release(task_id, wid, reason="worker stopped (signal) before the task "
                               "finished; handed back without spending an attempt", now=now,
                               lease=lease)
            return "released"
        if reason == "scope_refused":
            self.queue.release(task_id, wid, reason=f"the systemd manager refused the task's "
                               f"scope ({run.tail_line()}); handed back without spending an "
                               "attempt", now=now, lease=lease)
            return "released"
        if reason == "dead":
            self.queue.release(task_id, wid, reason="worker presumed dead by the supervisor; "
                               "handed back without spending an attempt", now=now, lease=lease)
            return "released"
        if reason == "cancelled":
            self.queue.fail(task_id, wid, error=f"cancelled by operator ({phrase})",
                            exit_code=exit_code, result=result, now=now, lease=lease)
            return "cancelled"
        if reason == "timeout":
            self.queue.fail(task_id, wid, error=f"timeout after {task.get('timeout_s')}s "
                            f"({phrase})", exit_code=exit_code, result=result, now=now, lease=lease)
            return "timeout"
        if run.returncode == 0:
            budget = self._budget(task)
            if budget is not None and tokens is not None and tokens > budget:
                self.queue.fail(task_id, wid, error="budget_exceeded", exit_code=0,
                                retry=False, result=result, now=now, lease=lease)
                self._emit("task_budget_exceeded", f"used {tokens} tokens, budget {budget}",
                           task=task, severity="warning", tokens_used=tokens, budget=budget)
                return "budget_exceeded"
            if self._exit_due(now, after_task=True) is None and now >= self.t.error_until:
                # Record the outcome and claim the next task in one transaction; its events
                # are appended together with the next task's task_started.
                _, self.claimed = self.queue.complete_and_claim(
                    task_id, wid, exit_code=0, result=result, types=self.opts.types, now=now,
                    events_out=self.held_events, lease=lease)
                if self.claimed is None:
                    self._flush_events()
            else:
                self.queue.complete(task_id, wid, exit_code=0, result=result, now=now, lease=lease)
            return "completed"
        # The tail of the task's output becomes last_error (queue, dead letter, events):
        # masked here, as everything harness writes for people.
        tail = redact_text(run.tail_line() or "")
        self.queue.fail(task_id, wid, error=phrase + (f": {tail}" if tail else ""),
                        exit_code=exit_code, result=result, now=now, lease=lease)
        return "failed"


# ---------------------------------------------------------------------------- the loop
CONFIG_RETRY_S = 2.0  # a worker started on a bad config re-reads it this often


def run_worker(home: Home, options: WorkerOptions, *, out: Callable[[str], None] | None = None) \
        -> int:
    """Run a worker until it exits; returns the process exit status (0 unless error).

    Signal handlers only set flags on the worker (and, through the wake-up fd, wake the
    loop): SIGTERM/SIGINT stop claiming and give the task ``stop_grace_s``; a second one
    ends the grace; SIGHUP re-reads config.
    """
    say = out or (lambda line: print(line, flush=True))
    keep_before = keep_last_good()  # a config turned bad never stops a running worker
    subreaper = become_subreaper()
    notifier = Notifier()
    wakeup = Wakeup(home)
    worker = Worker(home, options, notifier=notifier, wake=wakeup.set)
    worker.subreaper = subreaper

    def on_stop(signum: int, frame: FrameType | None) -> None:
        worker.request_stop()

    def on_reload(signum: int, frame: FrameType | None) -> None:
        worker.request_reload()

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop),
                 (signal.SIGHUP, on_reload))}
    failure: BaseException | None = None
    try:
        wakeup.start()
        while True:
            try:
                worker.start(clock.now())
                wakeup.follow_queue(worker.queue)
                break
            except ConfigError as exc:
                # Started on an invalid config (config_invalid is emitted): wait for a good
                # one rather than exit and have systemd give up after StartLimitBurst.
                if worker.flag_stop:
                    return 0
                say(f"worker: waiting for a valid config: {exc}")
                wakeup.wait(CONFIG_RETRY_S)
                wakeup.clear()
        say(f"started {worker.worker_id} pid {os.getpid()} instance {options.instance}")
        while True:
            wakeup.clear()
            delay = worker.step(clock.now())
            if delay is None:
                break
            # Busy: the task's exit, signals and the step's own timers wake us; other
            # workers' commits need not (cancel and loss are checked on a timer).
            wakeup.want_queue(worker.run is None)
            wakeup.wait(delay)
    except UsageError:
        raise
    except BaseException as exc:  # recorded as exit_reason error; re-raised unless Exception
        failure = exc
        worker.exit_reason = "error"
        _log(worker.worker_id).error("%s: %s", type(exc).__name__, exc)
    finally:
        try:
            if worker.worker_id:
                worker.shutdown(clock.now())
        finally:
            wakeup.stop()
            notifier.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            keep_last_good(keep_before)
    reason = worker.exit_reason or "error"
    if worker.worker_id:
        say(f"stopped {worker.worker_id} exit_reason {reason} tasks_done "
            f"{worker.spec.get('tasks_done')} tasks_failed {worker.spec.get('tasks_failed')}")
    if failure is not None and not isinstance(failure, Exception):
        raise failure  # KeyboardInterrupt/SystemExit keep their meaning
    return EXIT_CODES.get(reason, 0)
