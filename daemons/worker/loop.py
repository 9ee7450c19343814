"""``harness worker run``: claim tasks, run each in its own process group, record outcomes.

Structure
- :class:`Worker` is one worker lifetime (its state and shared helpers in :mod:`.state`,
  starting a task in :mod:`.launch`, recording an outcome in :mod:`.outcome`);
  :meth:`Worker.step` is the whole loop body. It takes the
  current time, does what is due (claim, supervise the running task, heartbeat, exit
  checks) and returns how long the loop may sleep (``None``: exit now). Tests drive it
  directly without sleeping.
- :func:`run_worker` is the loop around it: it only waits on a :class:`~daemons.wakeup.Wakeup`
  (inotify on the home, the queue's change feed, signals, the running task's output pipe
  and pidfd: :func:`wait_after_step`) with the timeout ``step`` returned, and turns
  signals into flags. The worker has no thread of its own. An idle worker therefore sleeps
  in the kernel until a task arrives, ``safety_recheck_s`` passes, a queued task's
  ``not_before`` comes due, or a heartbeat or systemd watchdog ping is due.

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
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

from coordination import clock
from coordination.config import keep_last_good, one_version
from coordination.errors import (
    ConfigError,
    CorruptFileError,
    HarnessError,
    NotFound,
    TemporaryFailure,
    UsageError,
)
from coordination.paths import Home
from coordination.queue.rules import lease_token
from coordination.specs import WorkerSpec, complete_spec, new_spec, write_spec

from ..notify import Notifier
from ..process_groups import become_subreaper
from ..wakeup import Wakeup
from .launch import TaskLaunch
from .options import WorkerOptions
from .outcome import OutcomeRecording
from .state import CANCEL_CHECK_S, RETRY_AFTER_ERROR_S, _log, _Pending

CONFIG_RETRY_S = 2.0  # a worker started on a bad config re-reads it this often
EXIT_CODES = {"error": 1}  # every other exit_reason is a clean exit (0)


class Worker(TaskLaunch, OutcomeRecording):
    """One worker lifetime: register, claim/run/record until an exit reason, deregister."""

    def start(self, now: float) -> WorkerSpec:
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
        # The worker keeps and updates its spec as a plain dict (WorkerState.spec, {} until
        # now): the one place the typed spec is handed over to it.
        self.spec = cast(dict[str, Any], spec)
        self.started_iso = spec["started_at"]
        write_spec(self.home, spec, create=True)
        self.published_state = spec["state"]
        self.t.heartbeat_at = now
        self._make_spare()
        self._emit("worker_started", f"worker {self.worker_id} registered",
                   pid=spec["pid"], instance=self.opts.instance, types=self.opts.types,
                   unit=self.opts.unit)
        self.notifier.ready(status="idle")
        return spec

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
        self._drop_spare()
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

    def step(self, now: float) -> float | None:
        """Do what is due at ``now``; return how long to wait (None: exit now). The step
        sees one version of the config files (config.one_version)."""
        with one_version():
            return self._step(now)

    def _step(self, now: float) -> float | None:
        if self.exit_reason is not None:
            return None
        self.steps += 1
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

    def _release_claimed(self, now: float) -> None:
        """Hand back a task claimed with the previous completion (the attempt does not
        count), stopping it first if the claim's hook started it: a stop signal that came
        in between is served before it runs, as a busy worker's stop hands its task back.
        If that fails, the task stays running under our id and the supervisor reclaims it
        once we are gone (at-least-once either way)."""
        self._stop_launched()
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
                                    events_out=self.held_events, prepare=self._launch_claimed)
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


def wait_after_step(worker: Worker, wakeup: Wakeup, delay: float) -> bool:
    """The loop's wait after a step (at most ``delay`` s); True when woken. Busy, the
    task's exit or EOF, signals and the step's own timers wake us, and the task's output is
    copied to its log inside the wait; other workers' commits need not wake us (cancel and
    loss are checked on a timer). Idle, queue changes do."""
    run = worker.run
    if run is None:
        wakeup.watch_io(None, ())
    else:
        wakeup.watch_io(run, run.wait_fds(), run.on_ready)
    wakeup.want_queue(run is None)
    return wakeup.wait(delay)


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
    worker = Worker(home, options, notifier=notifier)
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
            wait_after_step(worker, wakeup, delay)
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
