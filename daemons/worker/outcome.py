"""Recording the outcome of an attempt that ended: complete, fail or release.

:meth:`OutcomeRecording._record` writes the attempt's footer, reads ``result.json``,
applies the budget and commits the outcome through the queue port; a completed task and
the claim of the next are one transaction (``complete_and_claim``). An outcome that could
not be recorded stays pending (:meth:`OutcomeRecording._retry_pending`, with a bounded
backoff while the task's lease may hold); a commit whose reply was lost is recognised
(:meth:`OutcomeRecording._landed`), and a task taken from the worker meanwhile is
``lost``, never recorded twice.
"""

from __future__ import annotations

from typing import Any

from coordination import clock
from coordination.errors import (
    ConfigError,
    CorruptFileError,
    HarnessError,
    InvalidTransition,
    NotFound,
    TemporaryFailure,
    UnsafePath,
)
from coordination.queue.rules import lease_token
from coordination.redact import redact_text
from coordination.specs import active_path, liveness
from coordination.store import parse_json, read_in_folder, read_json
from coordination.tasks import Task

from ..process_groups import reap_orphans
from .state import RESULT_FILE, RETRY_AFTER_ERROR_S, WorkerState, _log, _Pending
from .task_run import TaskRun, describe_exit

# Recording an outcome that failed for a temporary reason (database restarting, lock
# timeout) is retried after this long, doubling up to RETRY_AFTER_ERROR_S, while the task's
# lease could still be valid (see _retry_pending).
OUTCOME_RETRY_MIN_S = 0.1
MAX_RESULT_BYTES = 1 << 20


class OutcomeRecording(WorkerState):
    """Recording attempts' outcomes (the worker's part that writes to the queue)."""

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

    def _read_result(self, task: Task, now: float) -> dict[str, Any] | None:
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

    def _budget(self, task: Task) -> int | None:
        if task["budget"] is not None:
            return int(task["budget"])
        wtype = self._types.get(task.get("worker_type") or "default") or {}
        budget = wtype.get("default_budget")
        return None if budget is None else int(budget)

    def _record(self, pending: _Pending, now: float) -> None:
        """Write the attempt's outcome to the queue (complete / fail / release)."""
        run, task = pending.run, pending.task
        if self.subreaper:
            # Before the commit: complete_and_claim's hook starts the next task, whose
            # process a reap after it could take, and with it its exit status (Popen then
            # reads ECHILD as exit 0).
            reap_orphans()
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

    def _lease_deadline(self, task: Task) -> float:
        """Until when the lease of ``task`` may still hold: its last known ``lease_until``
        (the claim's, or the newest heartbeat's); a task without one, one lease from now."""
        until = self.leases.get(task["task_id"]) or task.get("lease_until")
        try:
            return clock.parse_iso(str(until))
        except ValueError:
            return clock.now() + float(self.cfg["heartbeat_timeout_s"])

    def _landed(self, task: Task) -> str | None:
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

    def _commit_outcome(self, task: Task, run: TaskRun, reason: str | None,
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
                    events_out=self.held_events, lease=lease, prepare=self._launch_claimed)
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
