"""Starting a claimed task: its folder, environment, working directory and scope.

:meth:`TaskLaunch._launch` prepares ``results/<task_id>/`` (a real folder of the home,
without the previous attempt's result), builds the :class:`~daemons.worker.task_run.RunSpec`
(environment from the allowlist, the type's limits, the log header) and the transient
scope (:mod:`.scopes`) and starts the :class:`~daemons.worker.task_run.TaskRun`; the
claim runs it as its ``prepare`` hook, so the task starts while the claim is flushed.
:meth:`TaskLaunch._start_task` adopts the started task and publishes the spec's new task
and its events; a spawn failure is recorded at once as a failed attempt.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from coordination import clock
from coordination.config import scope_properties
from coordination.errors import HarnessError, InvalidTransition, NotFound, UnsafePath
from coordination.queue.rules import lease_token
from coordination.redact import redact_argv
from coordination.store import make_spare_folder, prepare_task_folder
from coordination.tasks import Task

from .process_setup import build_env
from .scopes import Scope, find_scope_manager, probe_scope, scope_unit_name
from .state import CANCEL_CHECK_S, RESULT_FILE, STATUS_REFRESH_S, Launched, WorkerState, _log
from .task_run import RunSpec, SpawnError, TaskRun, header_line

# A busy worker that goes straight on to its next task publishes the new current_task_id
# only once that task has run this long (or at the next heartbeat): back-to-back short
# tasks then cost no spec write each. Going busy from idle, draining, stopping and going
# idle are published at once.
SPEC_DEFER_S = 0.05


class TaskLaunch(WorkerState):
    """Starting an attempt of a claimed task (the worker's part that spawns)."""

    def _task_env(self, task: Task, wtype: dict[str, Any], result_file: Path) \
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

    def _task_scope(self, task: Task, type_name: str, wtype: dict[str, Any]) \
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

    def _prepare_task(self, result_dir: Path) -> SpawnError | None:
        """Make the task's result folder (a real folder of the home, never a planted link,
        without the previous attempt's result), which is also its working directory, from
        the spare folder when there is one; a refusal (a link) is returned. The log file is
        created by TaskRun just after the spawn, while the task starts."""
        spare = None
        if self.spare_ready:
            spare, self.spare_ready = self.home.spare_result_dir(self.worker_id).name, False
        try:
            prepare_task_folder(result_dir, RESULT_FILE, spare)
        except UnsafePath as exc:
            return SpawnError(str(exc), retry=False, exit_code=126)
        except OSError:
            pass  # the task still runs (in the home); its result cannot be kept
        return None

    def _launch(self, task: Task, now: float) -> Launched:
        """Prepare the task's folder, build its RunSpec and spawn it (TaskRun creates the
        log just after); a failure to spawn is kept in the result (nothing is left
        running), for :meth:`_start_task`."""
        task_id = task["task_id"]
        type_name = task.get("worker_type") or "default"
        wtype = self._types.get(type_name) or {}
        scope = self._task_scope(task, type_name, wtype)
        result_dir = self.home.result_dir(task_id)
        refused = self._prepare_task(result_dir)
        argv = list(task["command"])
        spec = RunSpec(
            task_id=task_id, attempt=int(task["attempts"]), argv=argv,
            cwd=self._task_cwd(wtype, result_dir),
            env=self._task_env(task, wtype, result_dir / RESULT_FILE),
            log_path=self.home.task_log(task_id),
            log_max_bytes=int(self.cfg["task_log_max_bytes"]),
            kill_grace_s=float(self.cfg["kill_grace_s"]),
            limits=dict(wtype.get("limits") or {}),
            header=header_line(task, self.worker_id, redact_argv(argv), now), scope=scope,
            sweep_descendants=self.subreaper)
        run = TaskRun(spec)
        if refused is None:
            try:
                run.start()
            except SpawnError as exc:
                refused = exc
        return Launched((task_id, lease_token(task)), run, refused)

    def _make_spare(self) -> None:
        """Have the spare result folder ready for the next task (``results/.spare-<worker
        id>/``, Home.spare_result_dir), made after a spawn rather than between a claim
        and the next one; best effort (without one, the next folder is made by mkdir)."""
        if self.spare_ready or not self.worker_id:
            return
        try:
            self.spare_ready = make_spare_folder(self.home.spare_result_dir(self.worker_id))
        except (OSError, HarnessError):
            self.spare_ready = False

    def _drop_spare(self) -> None:
        """Remove the spare result folder (the worker is exiting); best effort: the
        janitor removes the spares of workers no longer active."""
        if not self.worker_id:
            return
        self.spare_ready = False
        with contextlib.suppress(OSError, HarnessError):
            os.rmdir(self.home.spare_result_dir(self.worker_id))

    def _launch_claimed(self, task: Task) -> None:
        """The claims' ``prepare`` hook: start the task as soon as its claim is written.
        The file queue runs this after releasing its lock and before its fdatasync, so the
        spawn overlaps the flush; the claim may therefore be lost by a power loss while
        the task runs, which loses no task: it is queued again and runs again
        (at-least-once, docs/coordination.md "Commit order and crashes"). Its events, spec
        and bookkeeping follow in :meth:`_start_task`, after the claim's own events."""
        self._stop_launched()  # one never adopted (its claim call raised after the hook)
        self.launched = self._launch(task, clock.now())

    def _stop_launched(self) -> None:
        """Stop a task the claim's hook started that the worker will not run after all
        (it exits first): nothing of it is left running."""
        launched, self.launched = self.launched, None
        if launched is not None and launched.refused is None:
            launched.run.close()

    def _start_task(self, task: Task, now: float) -> None:
        task_id = task["task_id"]
        if self.launched is not None and self.launched.key != (task_id, lease_token(task)):
            self._stop_launched()  # started for another claim: never ours to run
        launched, self.launched = self.launched, None
        if launched is None:
            launched = self._launch(task, now)
        self._make_spare()  # the task runs already: the next one's folder, off its path
        run = launched.run
        if launched.refused is not None:
            exc = launched.refused
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
        wtype = self._types.get(task.get("worker_type") or "default") or {}
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
                   task=task, pid=run.pid, attempt=task["attempts"],
                   argv=run.spec.argv[:20], **extra)
        self._status(now)
