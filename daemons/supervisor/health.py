"""What the supervisor judges on each pass: stalls, backpressure, circuits and health.

- Stalls: a busy worker whose spec ``progress`` has not changed for
  ``worker_stall_timeout_s`` (the stall rule, coordination.metrics' ``stall_reason``) is
  fenced: its task's process group(s) and the worker itself get SIGKILL (only on this
  host, after checking the pid's start time), then the task is reclaimed like an orphan
  (``worker_stalled``). Killing the worker, rather than asking it to stop the task, keeps
  one owner of the accounting (the supervisor) and works even when the worker loop itself
  is what hangs.
- Backpressure: on while the queue is at ``max_queue_depth``.
- The circuit breaker pauses a worker type whose failure rate is too high and resumes it
  after the cool-down.
- Health: coordination.metrics' ``compute_health``, applied through ``health_document``
  (shared with ``harness status``/``check``), published as ``coordination/health.json``
  by rename under ``locks/metrics.lock``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from coordination import clock
from coordination.control import update_control
from coordination.errors import HarnessError
from coordination.locks import lock_for
from coordination.metrics import STALL_STATES, health_document, stall_reason
from coordination.specs import WorkerSpec, complete_spec
from coordination.store import replace_json

from .reclaim import fence_worker, reclaim_task
from .state import SupervisorState, _durability, _emit, _ts

HEALTH_REFRESH_S = 30.0  # health.json is republished at least this often, changed or not
BUSY_STATES = STALL_STATES  # the states the stall rule (coordination.metrics) judges


class HealthChecks(SupervisorState):
    """The supervisor's part that judges: stalls, backpressure, circuits, health."""

    def _stalls(self, now: float, cfg: Mapping[str, Any],
                specs: list[WorkerSpec]) -> list[dict[str, Any]]:
        """Busy workers whose ``progress`` is unchanged for ``worker_stall_timeout_s``.

        On this host the worker and its task groups are SIGKILLed and the task reclaimed
        (see the module docstring); elsewhere the stall is only reported (once)."""
        limit = float(cfg["worker_stall_timeout_s"])
        marks: dict[str, Any] = self.state["progress"]
        seen: set[str] = set()
        found: list[dict[str, Any]] = []
        for spec in specs:
            wid = str(spec["worker_id"])
            task_id = spec.get("current_task_id")
            if not task_id or spec.get("state") not in BUSY_STATES:
                continue
            seen.add(wid)
            mark = marks.get(wid)
            progress = spec.get("progress")
            if not isinstance(mark, dict) or mark.get("task_id") != task_id \
                    or mark.get("progress") != progress:
                marks[wid] = {"task_id": task_id, "progress": progress, "since": clock.iso(now)}
                continue
            since = _ts(mark.get("since")) or now
            proof = stall_reason(spec, now, None, limit, unchanged_since=since)
            if proof is None:
                continue
            item = {"worker_id": wid, "task_id": task_id, "instance": spec.get("instance"),
                    "pid": spec.get("pid"), "since": mark.get("since"),
                    "stalled_s": round(now - since, 3), "fenced": False}
            if mark.get("reported"):
                found.append(item)
                continue
            fenced = fence_worker(spec)
            item["fenced"] = fenced
            self.state["stalls"].append({"worker_id": wid, "task_id": task_id,
                                         "at": clock.iso(now)})
            _emit(self.home, "worker_stalled",
                  f"worker {wid} made no progress on {task_id} for {now - since:.0f}s"
                  + ("; killed it and its task, reclaiming the task" if fenced
                     else "; not fenced (another host, or the pid is no longer the "
                     "worker's): reported only"),
                  severity="error", worker_id=wid, task_id=task_id, now=now,
                  data={"stalled_s": round(now - since, 3), "progress": progress,
                        "fenced": fenced, "instance": spec.get("instance")})
            if fenced:
                task = self.queue.get(task_id)
                if task is not None and task.get("status") == "running" \
                        and task.get("worker_id") == wid:
                    reclaim_task(self.home, self.queue, task, f"stalled: {proof}", now,
                                 cause="stalled")
                with contextlib.suppress(HarnessError):
                    complete_spec(self.home, wid, "crashed", now,
                                  extra={"crash_proof": f"stalled: {proof}"})
                marks.pop(wid, None)
            else:
                mark["reported"] = True
            found.append(item)
        for wid in list(marks):
            if wid not in seen:
                marks.pop(wid, None)
        return found

    def _backpressure(self, now: float, cfg: Mapping[str, Any], queued: int,
                      report: dict[str, Any]) -> bool:
        limit = int(cfg["max_queue_depth"])
        # The queue refuses an add that would take it past the limit, so "at the limit"
        # is already the state in which `harness task add` exits 75.
        on = queued >= limit
        if on != bool(self.state["backpressure"]):
            self.state["backpressure"] = on
            kind = "backpressure_on" if on else "backpressure_off"
            _emit(self.home, kind,
                  f"{queued} tasks queued, max_queue_depth {limit}: `harness task add` "
                  + ("now exits 75" if on else "accepts tasks again"),
                  severity="warning" if on else "info", now=now,
                  data={"queued": queued, "max_queue_depth": limit})
            report["actions"].append(f"{kind} ({queued} queued, limit {limit})")
        return on

    def _circuits(self, now: float, cfg: Mapping[str, Any], control: dict[str, Any],
                  report: dict[str, Any]) -> dict[str, Any]:
        """Pause a worker type whose failure rate is too high; resume it after the
        cool-down. Only attempts after the circuit last closed count, so the failures that
        opened it cannot open it again at once."""
        circuits: dict[str, Any] = self.state["circuits"]
        pauses = control.get("paused_types") or {}
        to_close: list[str] = []
        for wtype, rec in circuits.items():
            if rec.get("state") != "open":
                continue
            until = _ts(rec.get("until")) or now
            info = pauses.get(wtype)
            ours = isinstance(info, dict) and info.get("reason") == "circuit_open"
            if now >= until or not ours:
                to_close.append(wtype)
        if to_close:
            def close(state: dict[str, Any]) -> None:
                for wtype in to_close:
                    info = state.get("paused_types", {}).get(wtype)
                    if isinstance(info, dict) and info.get("reason") == "circuit_open":
                        state["paused_types"].pop(wtype, None)
            control = update_control(self.home, close, now=now)
            for wtype in to_close:
                rec = circuits[wtype]
                early = (_ts(rec.get("until")) or now) > now
                rec.update(state="closed", closed_at=clock.iso(now))
                _emit(self.home, "circuit_closed",
                      f"worker type {wtype} resumed" + (" (pause lifted by an operator)"
                                                        if early else " after the cool-down"),
                      now=now, data={"worker_type": wtype, "opened_at": rec.get("opened_at")})
                report["actions"].append(f"circuit closed: {wtype}")
        window = float(cfg["circuit_window_s"])
        minimum = int(cfg["circuit_min_tasks"])
        limit = float(cfg["circuit_failure_rate"])
        cooldown = float(cfg["circuit_cooldown_s"])
        counts = self.history.counts(now - window, now)
        opening: dict[str, dict[str, Any]] = {}
        pauses = control.get("paused_types") or {}
        for wtype, (ok, failed) in counts.items():
            rec = circuits.get(wtype) or {}
            if rec.get("state") == "open":
                continue
            closed_at = _ts(rec.get("closed_at"))
            if closed_at is not None and closed_at > now - window:
                sub = self.history.counts(closed_at + 1e-3, now).get(wtype, [0, 0])
                ok, failed = sub[0], sub[1]
            attempts = ok + failed
            if attempts < minimum or failed / attempts <= limit:
                continue
            if wtype in pauses:
                continue  # already paused by an operator: leave their pause alone
            opening[wtype] = {"since": clock.iso(now), "until": clock.iso(now + cooldown),
                              "reason": "circuit_open", "failure_rate": round(failed / attempts, 4),
                              "attempts": attempts}
        if opening:
            def pause(state: dict[str, Any]) -> None:
                for wtype, info in opening.items():
                    state.setdefault("paused_types", {})[wtype] = {
                        "since": info["since"], "until": info["until"], "reason": "circuit_open"}
            update_control(self.home, pause, now=now)
            for wtype, info in opening.items():
                circuits[wtype] = {"state": "open", "opened_at": info["since"],
                                   "until": info["until"], "closed_at": None,
                                   "failure_rate": info["failure_rate"],
                                   "attempts": info["attempts"]}
                _emit(self.home, "circuit_open",
                      f"worker type {wtype}: {info['failure_rate']:.0%} of {info['attempts']} "
                      f"attempts failed in {window:g}s; paused until {info['until']}",
                      severity="error", now=now,
                      data={"worker_type": wtype, "failure_rate": info["failure_rate"],
                            "attempts": info["attempts"], "until": info["until"]})
                report["actions"].append(f"circuit open: {wtype} until {info['until']}")
        return {wtype: {"state": "open", "until": rec["until"]}
                for wtype, rec in sorted(circuits.items()) if rec.get("state") == "open"}

    def _health(self, now: float, cfg: Mapping[str, Any],
                report: dict[str, Any]) -> dict[str, Any]:
        window = float(cfg["health_window_s"])
        counts = self.history.counts(now - window, now)
        ok = sum(c[0] for c in counts.values())
        failed = sum(c[1] for c in counts.values())
        rate = round(ok / (ok + failed), 4) if ok + failed else None
        recent = [s for s in self.state["stalls"] if (_ts(s.get("at")) or 0) >= now - window]
        self.state["stalls"] = recent[-200:]
        stalled = sorted({s["worker_id"] for s in recent}
                         | {s["worker_id"] for s in report["stalled"]})
        doc = health_document(rate, stalled, backpressure=bool(report["backpressure"]),
                              now=now, window_s=window, circuits=report["circuits"],
                              attempts=ok + failed,
                              min_attempts=int(cfg["health_min_attempts"]))
        doc.update(window_s=window, attempts={"completed": ok, "failed": failed})
        level, reasons = doc["health"], doc["reasons"]
        previous = self.state.get("health")
        if level != previous:
            self.state["health"] = level
            _emit(self.home, "health_changed", f"health {previous or 'unknown'} -> {level}"
                  + (f": {'; '.join(reasons)}" if reasons else ""),
                  severity={"healthy": "info", "degraded": "warning"}.get(level, "error"),
                  now=now, data={"from": previous, "to": level, "success_rate": rate,
                                 "stalled_workers": stalled, "reasons": reasons})
            report["actions"].append(f"health {previous or 'unknown'} -> {level}")
        same = self._health_doc is not None and \
            {k: v for k, v in doc.items() if k != "updated_at"} == \
            {k: v for k, v in self._health_doc.items() if k != "updated_at"}
        stale = self.health_written_at is None or abs(now - self.health_written_at) \
            >= HEALTH_REFRESH_S
        if not same or stale:
            self._write_health(doc, cfg)
            self._health_doc = doc
            self.health_written_at = now
        return doc

    def _write_health(self, doc: dict[str, Any], cfg: Mapping[str, Any]) -> None:
        lock = lock_for(self.home.lock_path("metrics"))
        with lock.held_for(float(cfg["lock_timeout_s"])):
            replace_json(self.home.health_file, doc, _durability(cfg), pretty=True)
