"""``harness supervisor run``: reclaim orphans, stop stalled tasks, autoscale, judge health.

Structure
- :meth:`Supervisor.reconcile` is the whole loop body: one pass at ``now`` that returns a
  report (a dict). Tests drive it directly with an injected ``now`` and a fake actuator.
- :func:`run_supervisor` is the loop around it. It waits on a :class:`~daemons.wakeup.Wakeup`
  (inotify on coordination/ and the inbox, signals) with the timeout ``supervisor_tick_s``,
  and on a :class:`PidWatcher` (a pidfd per worker process: the loop wakes the instant a
  worker dies, which inotify cannot see). Signal handlers only set flags.
- Every decision the supervisor carries across passes lives in files, so a restarted
  supervisor behaves the same: ``coordination/supervisor-state.json`` (last scale time,
  backpressure, circuits, progress watermarks, recent stalls) and ``coordination/
  health.json`` (published by rename under ``locks/metrics.lock``).

Rules (docs/supervisor.md has the operator's view)
- Orphans: a running task whose worker is proven dead (:func:`death_proof`: pid gone,
  zombie, pid reused, or heartbeat older than ``heartbeat_timeout_s``) is reclaimed: the
  attempt counts, so it is queued again or dead-lettered (TaskQueue ``fail`` with outcome
  ``reclaimed``, checked against the owner under the queue lock). ``task_reclaimed`` is
  emitted after the commit, with the proof. The dead worker's spec moves to completed with
  exit_reason ``crashed``, and processes its task left on this host are killed.
- Stalls: a busy worker whose spec ``progress`` has not changed for
  ``worker_stall_timeout_s`` is fenced: its task's process group(s) and the worker itself
  get SIGKILL (only on this host, after checking the pid's start time), then the task is
  reclaimed like an orphan (``worker_stalled``). Killing the worker, rather than asking it
  to stop the task, keeps one owner of the accounting (the supervisor) and works even when
  the worker loop itself is what hangs.
- Scaling: :func:`decide_scale` (pure) turns runnable queue depth and worker counts into a
  target; scale-up starts instances through the actuator, scale-down drains *idle* workers
  only (``control.json`` ``drain.instances``): a busy worker is never stopped.
- Backpressure, health and the circuit breaker: see the methods of the same names. The
  health rule itself is coordination.metrics' ``compute_health``, applied through
  ``health_document`` (shared with ``harness status``/``check``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import psutil

from coordination import clock
from coordination.config import ConfigWatch, keep_last_good, load_system
from coordination.control import read_control, update_control
from coordination.errors import (
    EXIT_USAGE,
    ConfigError,
    CorruptFileError,
    HarnessError,
    LockTimeout,
    NotFound,
    TemporaryFailure,
)
from coordination.events import emit
from coordination.hosts import host_id
from coordination.locks import lock_for
from coordination.metrics import STALL_STATES, AttemptWindow, health_document, stall_reason
from coordination.paths import Home
from coordination.queue import QueueBackend, open_queue
from coordination.queue.rules import lease_token
from coordination.specs import (
    complete_spec,
    is_completed,
    liveness,
    orphan_proof,
    process_start_time,
    quarantine_unusable,
    read_specs,
)
from coordination.store import (
    Durability,
    read_json,
    replace_json,
)

from .actuators import Actuator, ProcessActuator, kill_orphaned_tasks, make_actuator
from .notify import Notifier
from .task_runner import reap_orphans
from .wakeup import Wakeup

SOURCE = "supervisor"
log = logging.getLogger("harness.supervisor")  # diagnostics (daemons/diagnostics.py)
STATE_VERSION = 1
CONFIG_RETRY_S = 2.0  # a supervisor started on a bad config re-reads it this often
HEALTH_REFRESH_S = 30.0  # health.json is republished at least this often, changed or not
HISTORY_CHUNK = 1 << 16
BUSY_STATES = STALL_STATES  # the states the stall rule (coordination.metrics) judges


def singleton_lock_path(home: Home) -> Path:
    """Held by a running supervisor (``supervisor run``, ``up``, ``demo``) for its life
    (:attr:`Home.supervisor_lock`, ``locks/supervisor.lock``)."""
    return home.supervisor_lock


#: The loop wakes this long after the next lease may expire (timestamps have ms precision).
LEASE_WAKE_LATE_S = 0.005


def _iso(ts: float | None) -> str | None:
    return None if ts is None else clock.iso(ts)


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


# ---------------------------------------------------------------------------- scaling
def decide_scale(queued: int, running_workers: int, busy_workers: int, cfg: Mapping[str, Any],
                 last_scale_at: float | None, now: float) -> int:
    """The number of workers there should be. Pure: no I/O, no clock.

    - Never below ``min_workers`` nor above ``min(max_workers, max_concurrent_workers)``.
      Above the cap: back to the cap at once. Below the floor: the whole rule below applies
      at once (the floor, or more for a queued burst). Both ignore the cool-down.
    - Otherwise nothing changes within ``scale_cooldown_s`` of the last scale operation.
    - Scale up while ``queued / workers`` exceeds ``scale_up_threshold``: straight to the
      size at which the ratio is back at the threshold (a burst is met in one step).
    - Refill the warm pool: at least ``warm_pool`` idle workers beside the busy ones.
    - Scale down while the ratio is below ``scale_down_threshold`` (and the warm pool is
      full): to the busy workers plus the warm pool, but not so far that the ratio would
      exceed the up threshold again (hysteresis).
    """
    cap = max(0, min(int(cfg["max_workers"]), int(cfg["max_concurrent_workers"])))
    floor = min(int(cfg["min_workers"]), cap)
    running = max(0, int(running_workers))
    busy = max(0, min(int(busy_workers), running))
    queued = max(0, int(queued))
    if running > cap:
        return cap
    cooldown = float(cfg["scale_cooldown_s"])
    if running >= floor and last_scale_at is not None and now - last_scale_at < cooldown:
        return running
    up = float(cfg["scale_up_threshold"])
    down = float(cfg["scale_down_threshold"])
    warm = int(cfg["warm_pool"])
    ratio = queued / running if running else (math.inf if queued else 0.0)
    for_ratio = math.ceil(queued / up) if up > 0 else busy + queued
    want = running
    if queued and ratio > up:
        want = max(running + 1, for_ratio)
    if running - busy < warm:
        want = max(want, busy + warm)
    elif ratio < down:
        want = min(want, max(busy + warm, for_ratio))
    return max(floor, min(cap, want))


# ---------------------------------------------------------------------------- death
def _same_host(spec: Mapping[str, Any]) -> bool:
    return spec.get("hostname") == socket.gethostname() and isinstance(spec.get("pid"), int)


def _exit_proof(pid: int) -> str | None:
    """Whether ``pid`` has exited: a zombie (not yet reaped by its parent), or gone now."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return f"pid {pid} is gone"
    except (psutil.Error, OSError):
        return None
    if status == psutil.STATUS_ZOMBIE:
        return f"pid {pid} has exited (zombie, not yet reaped)"
    return None


def death_proof(spec: Mapping[str, Any], now: float, heartbeat_timeout_s: float) -> str | None:
    """:func:`coordination.specs.liveness`, plus: a zombie (exited, not yet reaped by its
    parent) is dead too; liveness reads its start time and would call it alive. The second
    look also catches a process reaped between liveness's look and ours."""
    proof = liveness(dict(spec), now, heartbeat_timeout_s)
    if proof is None and _same_host(spec):
        proof = _exit_proof(int(spec["pid"]))
    return proof


def _pid_matches(spec: Mapping[str, Any]) -> bool:
    """Whether the spec's pid is still the worker's process (same start time)."""
    if not _same_host(spec):
        return False
    started = process_start_time(int(spec["pid"]))
    recorded = spec.get("process_start_time")
    return started is not None and isinstance(recorded, int | float) \
        and abs(started - recorded) <= 0.05


def _task_groups(pid: int) -> list[int]:
    """Process groups led by children of ``pid`` in their own group: a worker's tasks."""
    groups = []
    try:
        children = psutil.Process(pid).children()
    except (psutil.Error, OSError):
        return []
    for child in children:
        with contextlib.suppress(OSError):
            if os.getpgid(child.pid) == child.pid:
                groups.append(child.pid)
    return groups


def fence_worker(spec: Mapping[str, Any]) -> bool:
    """SIGKILL a worker on this host and its tasks' process groups; False when its pid is
    not (or no longer) the worker's process."""
    if not _pid_matches(spec):
        return False
    pid = int(spec["pid"])
    groups = _task_groups(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return True


def _emit(home: Home, event_type: str, message: str, **fields: Any) -> None:
    try:
        emit(home, event_type, source=SOURCE, message=message, **fields)
    except HarnessError as exc:  # the event log is best effort; the state is durable
        log.warning("could not emit %s: %s", event_type, exc)


def reclaim_task(home: Home, queue: QueueBackend, task: Mapping[str, Any], proof: str,
                 now: float, *, cause: str = "dead_worker") -> dict[str, Any] | None:
    """Take a running task back from its dead owner (the attempt counts): queued again, or
    dead-lettered once attempts are spent. Checked against the owner and the claim (lease
    token) in the queue's transaction, so a task completed or re-claimed meanwhile is left
    alone (None); with cause ``lease_expired`` also one whose lease a heartbeat extended
    meanwhile. Emits ``task_reclaimed`` after the commit."""
    owner = task.get("worker_id")
    if not isinstance(owner, str):
        return None
    after = queue.reclaim(task["task_id"], reason=proof, worker_id=owner,
                          lease=lease_token(task), expired_only=cause == "lease_expired",
                          now=now)
    if after is None:
        return None
    requeued = after.get("status") == "queued"
    _emit(home, "task_reclaimed",
          f"reclaimed from {owner}: {proof}; "
          + ("queued again" if requeued else f"now {after.get('status')}"),
          severity="warning", task_id=task["task_id"], worker_id=owner,
          correlation_id=task.get("correlation_id"), now=now,
          data={"proof": proof, "cause": cause, "attempt": after.get("attempts"),
                "max_attempts": after.get("max_attempts"), "requeued": requeued,
                "status": after.get("status")})
    return {"task_id": task["task_id"], "worker_id": owner, "proof": proof, "cause": cause,
            "attempt": after.get("attempts"), "status": after.get("status")}


def reclaim_pass(home: Home, now: float, *, queue: QueueBackend | None = None,
                 dry_run: bool = False, heartbeat_timeout_s: float | None = None,
                 specs: list[dict[str, Any]] | None = None,
                 kill_orphans: bool = True, host: str | None = None) -> dict[str, Any]:
    """One orphan-reclaim pass (what ``harness supervisor reclaim`` runs).

    Tasks claimed on this host (``host_id`` is ``host``, default
    :func:`coordination.hosts.host_id`, or unknown) are judged by this host's worker specs
    (the fast proofs: pid gone, zombie, reused, heartbeat). A task of any host whose lease
    expired (:meth:`QueueBackend.expired_leases`) is reclaimed too, with the expiry checked
    again in the transaction (cause ``lease_expired``); another host's task whose lease
    holds is never touched, whatever this host's specs say.

    Returns ``{"reclaimed": [...], "dead_workers": [...], "orphans_killed": [...],
    "fenced": [...]}``; with ``dry_run`` nothing is changed and the lists say what would be.
    A dead worker whose process still exists on this host (heartbeat proof: frozen or
    wedged) is fenced first (SIGKILL, with its tasks' process groups); ``kill_orphans``
    False skips fencing and the orphan kill.
    """
    queue = queue or open_queue(home)
    hb = float(heartbeat_timeout_s if heartbeat_timeout_s is not None
               else load_system(home)["heartbeat_timeout_s"])
    if specs is None:
        specs = [s.spec for s in read_specs(home) if s.spec is not None]
    active = {str(s["worker_id"]): s for s in specs}
    dead: dict[str, str] = {}
    for worker_id, spec in active.items():
        proof = death_proof(spec, now, hb)
        if proof is not None:
            dead[worker_id] = proof
    out: dict[str, Any] = {"reclaimed": [], "dead_workers": [], "orphans_killed": [],
                           "fenced": []}
    if not dry_run and kill_orphans:
        # Declared dead on its heartbeat but its process still exists (frozen, wedged):
        # SIGKILL it first, so it cannot finish the task beside the retry and releases any
        # lock it holds (a worker stopped inside write_spec would block complete_spec).
        for worker_id in sorted(dead):
            if fence_worker(active[worker_id]):
                out["fenced"].append(worker_id)
    own = host or host_id()
    judged: list[tuple[dict[str, Any], str, str]] = []
    leases: list[str] = []
    for task in queue.live_tasks(status="running"):
        if task.get("lease_until"):
            leases.append(str(task["lease_until"]))
        if task.get("host_id") not in (None, own):
            continue  # another host's: its lease alone tells (below)
        proof = orphan_proof(task, active, dead,
                             lambda w: is_completed(home, w), now, hb)
        if proof is not None:
            judged.append((task, proof, "dead_worker"))
    seen = {t["task_id"] for t, _, _ in judged}
    # The next instant a lease may expire: the supervisor's loop wakes then (a timer, not
    # a shorter tick), so a dead host's task is reclaimed right as its lease ends.
    later = [until for until in leases if until >= clock.iso(now)]
    out["next_lease_expiry"] = min(later) if later else None
    for task in queue.expired_leases(now):
        if task["task_id"] not in seen:
            judged.append((task, f"lease expired at {task.get('lease_until')} (worker "
                           f"{task.get('worker_id')} on host {task.get('host_id')})",
                           "lease_expired"))
    for task, proof, cause in judged:
        if dry_run:
            out["reclaimed"].append({"task_id": task["task_id"],
                                     "worker_id": task.get("worker_id"), "proof": proof,
                                     "cause": cause, "attempt": task["attempts"],
                                     "status": "would reclaim"})
            continue
        done = reclaim_task(home, queue, task, proof, now, cause=cause)
        if done is not None:
            out["reclaimed"].append(done)
    for worker_id, proof in sorted(dead.items()):
        spec = active[worker_id]
        item = {"worker_id": worker_id, "instance": spec.get("instance"),
                "pid": spec.get("pid"), "proof": proof,
                "task_id": spec.get("current_task_id"), "completed": False}
        out["dead_workers"].append(item)
        if dry_run:
            continue
        if kill_orphans and spec.get("hostname") == socket.gethostname():
            out["orphans_killed"] += kill_orphaned_tasks(worker_id)
        with contextlib.suppress(HarnessError):  # else doctor reports the row later
            queue.forget_worker(worker_id)
        try:
            complete_spec(home, worker_id, "crashed", now, extra={"crash_proof": proof})
            item["completed"] = True
        except NotFound:
            continue  # the worker deregistered itself meanwhile
        except HarnessError as exc:
            log.error("cannot complete spec %s: %s", worker_id, exc)
            continue
        _emit(home, "worker_crashed", f"worker {worker_id} is dead: {proof}",
              severity="warning", worker_id=worker_id, now=now,
              data={"proof": proof, "instance": spec.get("instance"), "pid": spec.get("pid"),
                    "task_id": spec.get("current_task_id")})
    return out


# ---------------------------------------------------------------------------- supervisor
@dataclass
class WorkerView:
    """A worker as the scaler sees it."""

    instance: str
    worker_id: str | None
    state: str  # starting | idle | busy | draining | stopping
    managed: bool
    started_at: str | None = None

    @property
    def available(self) -> bool:
        return self.state in ("starting", "idle", "busy")


class Supervisor:
    """One home's supervisor. :meth:`reconcile` is a full pass; everything it needs to
    remember is in ``self.state`` and saved to ``supervisor-state.json`` after each pass.

    ``actuator`` None: no scaling (reclaim, stalls, health, circuits only).
    ``overrides``: system.json values to use instead of the file's (``harness up`` sets
    min_workers this way without editing the config). ``apply_scale`` False computes the
    scaling decision but starts and drains nothing.
    """

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
        self.specs: list[dict[str, Any]] = []
        self.passes = 0
        self._errors: dict[str, tuple[str, float]] = {}

    # -------------------------------------------------------------- config
    def config(self) -> dict[str, Any]:
        values = dict(load_system(self.home).values)
        values.update(self.overrides)
        if values["min_workers"] > values["max_workers"]:
            values["max_workers"] = values["min_workers"]
        return values

    # -------------------------------------------------------------- the pass
    def reconcile(self, now: float) -> dict[str, Any]:
        """One pass at ``now``: reap, ingest, reclaim, stalls, backpressure, circuits,
        scaling, health; then save the state. Returns what it saw and did."""
        cfg = self.config()
        self.passes += 1
        report: dict[str, Any] = {"at": clock.iso(now), "actions": []}
        if self.actuator is not None:
            report["exited"] = [{"instance": i, "status": s} for i, s in self.actuator.poll()]
        report["ingested"] = self._ingest(now)
        try:
            unusable = quarantine_unusable(self.home, now)
        except (HarnessError, OSError) as exc:  # e.g. a busy specs lock: next pass
            unusable = []
            report["actions"].append(f"could not quarantine unusable worker specs: {exc}")
        for path, problem in unusable:
            # A spec that can never prove its worker dead would count forever: set aside.
            report["actions"].append(f"quarantined the unusable worker spec {path.name}")
            _emit(self.home, "worker_spec_quarantined", f"unusable worker spec moved to "
                  f"{path}: {problem}", severity="warning",
                  data={"path": str(path), "problem": problem})
        specs = [s.spec for s in read_specs(self.home) if s.spec is not None]
        reclaim = reclaim_pass(self.home, now, queue=self.queue, specs=specs,
                               heartbeat_timeout_s=float(cfg["heartbeat_timeout_s"]))
        dead = {d["worker_id"] for d in reclaim["dead_workers"]}
        specs = [s for s in specs if s["worker_id"] not in dead]
        report["reclaimed"] = reclaim["reclaimed"]
        report["dead_workers"] = reclaim["dead_workers"]
        report["next_lease_expiry"] = reclaim["next_lease_expiry"]
        for item in reclaim["reclaimed"]:
            report["actions"].append(f"reclaimed {item['task_id']} from {item['worker_id']}: "
                                     f"{item['proof']} -> {item['status']}")
        report["stalled"] = self._stalls(now, cfg, specs)
        stalled_ids = {s["worker_id"] for s in report["stalled"] if s.get("fenced")}
        specs = [s for s in specs if s["worker_id"] not in stalled_ids]
        self.specs = specs
        control = read_control(self.home)
        stats = self.queue.stats(now)
        queued, runnable = stats["by_status"]["queued"], stats["runnable"]
        report["queue"] = {"queued": queued, "runnable": runnable,
                           "running": stats["by_status"]["running"]}
        report["backpressure"] = self._backpressure(now, cfg, queued, report)
        self.history.refresh(now - max(float(cfg["health_window_s"]),
                                       float(cfg["circuit_window_s"])))
        report["circuits"] = self._circuits(now, cfg, control, report)
        report["workers"], report["scale"] = self._autoscale(now, cfg, specs, runnable,
                                                             control, report)
        report["health"] = self._health(now, cfg, report)
        self._save(now, cfg)
        return report

    # -------------------------------------------------------------- inbox
    def _ingest(self, now: float) -> int:
        """Admit this host's inbox requests (the port takes no lock when there are none)."""
        try:
            return self.queue.ingest(now=now)
        except TemporaryFailure as exc:
            log.warning("ingest deferred: %s", exc)
            return 0

    # -------------------------------------------------------------- stalls
    def _stalls(self, now: float, cfg: Mapping[str, Any],
                specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
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

    # -------------------------------------------------------------- queue
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

    # -------------------------------------------------------------- circuits
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

    # -------------------------------------------------------------- scaling
    def _workers(self, specs: list[dict[str, Any]], control: dict[str, Any]) -> list[WorkerView]:
        managed = self.actuator.instances() if self.actuator is not None else {}
        drain = control.get("drain") or {}
        drain_all = drain.get("all")
        drains = drain.get("instances") or {}
        views: list[WorkerView] = []
        with_spec: set[str] = set()
        for spec in specs:
            instance = str(spec.get("instance"))
            started = spec.get("started_at") or ""
            state = str(spec.get("state") or "starting")
            req = [ts for ts in (drain_all, drains.get(instance)) if isinstance(ts, str)]
            if any(ts > started for ts in req) and state in ("idle", "busy", "starting"):
                state = "draining"
            views.append(WorkerView(instance, str(spec["worker_id"]), state,
                                    instance in managed, started))
            with_spec.add(instance)
        for name, inst in managed.items():
            if name in with_spec:
                continue
            views.append(WorkerView(name, None, "starting" if inst.state != "stopping"
                                    else "stopping", True))
        return views

    def _autoscale(self, now: float, cfg: Mapping[str, Any], specs: list[dict[str, Any]],
                   runnable: int, control: dict[str, Any],
                   report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        try:
            views = self._workers(specs, control)
        except (HarnessError, OSError, RuntimeError) as exc:
            report["actions"].append(f"cannot list workers: {exc}")
            return {"error": str(exc)}, None
        available = [v for v in views if v.available]
        running = len(available)
        busy = sum(1 for v in available if v.state == "busy")
        idle = [v for v in available if v.state == "idle"]
        workers = {"running": running, "busy": busy, "idle": len(idle),
                   "starting": sum(1 for v in available if v.state == "starting"),
                   "draining": sum(1 for v in views if v.state in ("draining", "stopping")),
                   "instances": sorted({v.instance for v in views}, key=_instance_key)}
        if self.actuator is None:
            return workers, None
        last = _ts(self.state.get("last_scale_at"))
        target = decide_scale(runnable, running, busy, cfg, last, now)
        scale: dict[str, Any] = {"target": target, "from": running, "action": None,
                                 "applied": self.apply_scale}
        if target > running:
            total = len(views)
            room = int(cfg["max_concurrent_workers"]) - total
            count = max(0, min(target - running, room))
            used = {v.instance for v in views}
            names = _free_instances(count, used)
            scale.update(action="scale_up", to=running + count, instances=names)
            if count and self.apply_scale:
                started = self._start(names, report)
                scale["instances"] = started
                scale["to"] = running + len(started)
                if started:
                    self.state["last_scale_at"] = clock.iso(now)
                    _emit(self.home, "scale_up",
                          f"workers {running} -> {running + len(started)} ({runnable} runnable "
                          f"queued, {busy} busy)", now=now,
                          data={"from": running, "to": running + len(started), "target": target,
                                "queued": runnable, "busy": busy, "instances": started,
                                "actuator": self.actuator.name})
                    report["actions"].append(f"scale_up {running} -> {running + len(started)}"
                                             f" (instances {', '.join(started)})")
        elif target < running:
            # Managed instances first (ours to start again), highest instance number first.
            victims = sorted(idle, key=lambda v: (v.managed, _instance_key(v.instance)),
                             reverse=True)[:running - target]
            names = [v.instance for v in victims]
            scale.update(action="scale_down", to=running - len(names), instances=names)
            if names and self.apply_scale:
                self._drain(names, now, views)
                self.state["last_scale_at"] = clock.iso(now)
                _emit(self.home, "scale_down",
                      f"workers {running} -> {running - len(names)} (draining idle "
                      f"instance(s) {', '.join(names)})", now=now,
                      data={"from": running, "to": running - len(names), "target": target,
                            "queued": runnable, "busy": busy, "instances": names,
                            "actuator": self.actuator.name})
                report["actions"].append(f"scale_down {running} -> {running - len(names)} "
                                         f"(draining {', '.join(names)})")
        return workers, scale

    def _start(self, names: list[str], report: dict[str, Any]) -> list[str]:
        assert self.actuator is not None
        started = []
        for name in names:
            try:
                self.actuator.start(name)
            except (OSError, RuntimeError, ValueError) as exc:
                report["actions"].append(f"cannot start worker {name}: {exc}")
                # Retried every pass; reported once a minute (or when the error changes).
                last = self._errors.get("scale_failed")
                mono = time.monotonic()
                if last is None or last[0] != str(exc) or mono - last[1] >= 60:
                    self._errors["scale_failed"] = (str(exc), mono)
                    _emit(self.home, "scale_failed",
                          f"cannot start worker instance {name}: {exc}", severity="error",
                          data={"instance": name, "error": str(exc),
                                "actuator": self.actuator.name})
                break
            started.append(name)
        return started

    def _drain(self, names: list[str], now: float, views: list[WorkerView]) -> None:
        """Drain requests for idle instances (the worker exits with ``drained``); stale
        requests for instances no longer running are dropped in the same write."""
        stamp = clock.iso(now)
        alive = {v.instance for v in views}

        def change(state: dict[str, Any]) -> None:
            drain = state.setdefault("drain", {"all": None, "instances": {}})
            instances = drain.setdefault("instances", {})
            for name in list(instances):
                if name not in alive:
                    instances.pop(name, None)
            for name in names:
                instances[name] = stamp

        update_control(self.home, change, now=now)

    # -------------------------------------------------------------- health
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

    # -------------------------------------------------------------- state
    def _save(self, now: float, cfg: Mapping[str, Any]) -> None:
        current = {k: v for k, v in self.state.items() if k != "updated_at"}
        saved = {k: v for k, v in self._saved.items() if k != "updated_at"}
        if current == saved and self.home.supervisor_state_file.exists():
            return
        self.state["updated_at"] = clock.iso(now)
        replace_json(self.home.supervisor_state_file, self.state, _durability(cfg), pretty=True)
        self._saved = orjson.loads(orjson.dumps(self.state))

    # -------------------------------------------------------------- for the loop
    def watched_pids(self) -> list[tuple[int, float | None]]:
        """Processes whose death should wake the loop: live workers on this host."""
        out: list[tuple[int, float | None]] = []
        for spec in self.specs:
            if _same_host(spec):
                start = spec.get("process_start_time")
                out.append((int(spec["pid"]), float(start)
                            if isinstance(start, int | float) else None))
        if isinstance(self.actuator, ProcessActuator):
            known = {pid for pid, _ in out}
            out += [(pid, None) for pid in self.actuator.pids().values() if pid not in known]
        return out


def _durability(cfg: Mapping[str, Any]) -> Durability:
    return "none" if cfg.get("durability") == "none" else "fsync"


def _instance_key(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _free_instances(count: int, used: Iterable[str]) -> list[str]:
    taken = set(used)
    out: list[str] = []
    n = 1
    while len(out) < count:
        if str(n) not in taken:
            out.append(str(n))
        n += 1
    return out


# ---------------------------------------------------------------------------- one-shots
def scale_down_once(home: Home, now: float, *, actuator: Actuator | None = None,
                    dry_run: bool = False) -> dict[str, Any]:
    """One scale-down pass (the idle-stop timer): drain idle workers above what
    :func:`decide_scale` wants, never scaling up. Skipped while a supervisor runs (it scales
    itself); uses and updates the same state file, so the cool-down is shared."""
    lock = lock_for(home.supervisor_lock)
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        return {"skipped": "a supervisor is running on this home; it scales down itself"}
    try:
        sup = Supervisor(home, actuator, apply_scale=not dry_run)
        cfg = sup.config()
        specs = [s.spec for s in read_specs(home) if s.spec is not None]
        hb = float(cfg["heartbeat_timeout_s"])
        specs = [s for s in specs if death_proof(s, now, hb) is None]
        control = read_control(home)
        runnable = sup.queue.stats(now)["runnable"]
        report: dict[str, Any] = {"actions": []}
        views = sup._workers(specs, control)
        available = [v for v in views if v.available]
        running = len(available)
        busy = sum(1 for v in available if v.state == "busy")
        target = decide_scale(runnable, running, busy, cfg, _ts(sup.state.get("last_scale_at")),
                              now)
        idle = [v for v in available if v.state == "idle"]
        victims = sorted(idle, key=lambda v: _instance_key(v.instance),
                         reverse=True)[:max(0, running - target)]
        names = [v.instance for v in victims]
        out = {"running": running, "busy": busy, "idle": len(idle), "target": target,
               "drained": names if not dry_run else [], "would_drain": names}
        if names and not dry_run:
            sup._drain(names, now, views)
            sup.state["last_scale_at"] = clock.iso(now)
            _emit(home, "scale_down", f"workers {running} -> {running - len(names)} (idle "
                  f"stop: draining instance(s) {', '.join(names)})", now=now,
                  data={"from": running, "to": running - len(names), "target": target,
                        "queued": runnable, "busy": busy, "instances": names,
                        "actuator": "idle-stop"})
            sup._save(now, cfg)
        out.update(report)
        return out
    finally:
        lock.release()


# ---------------------------------------------------------------------------- pid watcher
class PidWatcher:
    """Wakes the loop the instant a watched process exits.

    inotify sees file changes, not deaths, so without this a SIGKILLed worker would wait for
    the next tick. One thread polls a pidfd (``os.pidfd_open``, Linux >= 5.3) per process;
    it owns every pidfd (opens, polls, closes), the main thread only publishes the wanted
    set. A pid whose start time differs from the one given is not watched (reused: the
    pass proves that death itself). Without pidfd support it does nothing and the tick
    bounds the reaction time.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.available = hasattr(os, "pidfd_open")
        self.fired = 0
        self._wanted: dict[int, float | None] = {}
        self._lock = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._r = self._w = -1

    def start(self) -> PidWatcher:
        if os.environ.get("HARNESS_SUPERVISOR_NO_PIDFD"):  # diagnostics: tick-only reaction
            self.available = False
        if not self.available:
            return self
        try:
            probe = os.pidfd_open(os.getpid())
        except OSError:
            self.available = False
            return self
        os.close(probe)
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="harness-pid-watcher",
                                        daemon=True)
        self._thread.start()
        return self

    def watch(self, procs: Iterable[tuple[int, float | None]]) -> None:
        wanted = dict(procs)
        with self._lock:
            if wanted == self._wanted:
                return
            self._wanted = wanted
        self._poke()

    def _poke(self) -> None:
        if self._w >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._w, b"x")

    def stop(self) -> None:
        self._stop = True
        self._poke()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1

    def _run(self) -> None:
        fds: dict[int, int] = {}  # pid -> pidfd
        done: set[int] = set()  # pids that already fired (a zombie's pidfd stays readable)
        try:
            while not self._stop:
                with self._lock:
                    wanted = dict(self._wanted)
                for pid in [p for p in fds if p not in wanted]:
                    os.close(fds.pop(pid))
                done &= set(wanted)
                gone = False  # died (or was reused) between the pass and now: wake anyway
                for pid, start in wanted.items():
                    if pid in fds or pid in done:
                        continue
                    try:
                        fd = os.pidfd_open(pid)
                    except OSError:
                        done.add(pid)
                        gone = True
                        continue
                    actual = process_start_time(pid)
                    if start is not None and (actual is None or abs(actual - start) > 0.05):
                        os.close(fd)
                        done.add(pid)
                        gone = True
                        continue
                    fds[pid] = fd
                if gone:
                    self.fired += 1
                    self.wake()
                poller = select.poll()
                poller.register(self._r, select.POLLIN)
                by_fd = {fd: pid for pid, fd in fds.items()}
                for fd in by_fd:
                    poller.register(fd, select.POLLIN)
                events = poller.poll()
                woke = False
                for fd, _ in events:
                    if fd == self._r:
                        with contextlib.suppress(BlockingIOError, OSError):
                            os.read(self._r, 4096)
                        continue
                    pid = by_fd[fd]
                    os.close(fds.pop(pid))
                    done.add(pid)
                    woke = True
                if woke:
                    self.fired += 1
                    self.wake()
        finally:
            for fd in fds.values():
                os.close(fd)


# ---------------------------------------------------------------------------- the loop
@dataclass
class Tick:
    """A periodic side job of the loop (janitor, metrics snapshot, status line)."""

    name: str
    every_s: float
    func: Callable[[float], Any]
    next_at: float = 0.0  # monotonic
    errors: int = 0


@dataclass
class _Flags:
    stop: int = 0
    reload: bool = False
    signals: list[int] = field(default_factory=list)


def status_text(report: Mapping[str, Any]) -> str:
    """The one-line STATUS= shown by ``systemctl status``."""
    q = report.get("queue") or {}
    w = report.get("workers") or {}
    health = (report.get("health") or {}).get("health", "?")
    return (f"{health}; queued {q.get('queued', 0)} (runnable {q.get('runnable', 0)}), "
            f"running {q.get('running', 0)}; workers {w.get('running', 0)} "
            f"(busy {w.get('busy', 0)}, idle {w.get('idle', 0)})"
            + ("; BACKPRESSURE" if report.get("backpressure") else ""))


def kill_descendants(timeout: float = 5.0) -> list[int]:
    """SIGKILL every remaining descendant (orphaned task processes adopted while we were a
    subreaper) and reap them; returns their pids."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=timeout)
    reap_orphans(())
    return [p.pid for p in procs]


def run_supervisor(home: Home, *, actuator: Actuator | None = None,
                   actuator_name: str | None = None,
                   overrides: Mapping[str, Any] | None = None, once: bool = False,
                   ticks: Iterable[Tick] = (), on_pass: Callable[[dict[str, Any]], bool] | None
                   = None, out: Callable[[str], None] | None = None,
                   stop_workers: bool = True, adopt_orphans: bool = False,
                   verbose: bool = True, scale: bool = True) -> int:
    """Run the supervisor loop until SIGTERM/SIGINT (or ``once`` pass, or ``on_pass``
    returning True). Returns the exit status.

    Holds ``locks/supervisor.lock`` for its life: a second supervisor on the same home
    exits 75. With a process actuator, stopping drains the workers: SIGTERM (they finish or
    hand back their task within stop_grace_s), a second signal ends their grace, a third
    kills them; no child outlives the loop. ``adopt_orphans`` makes this process the
    subreaper of its descendants, so task processes of a crashed worker are reaped and,
    at exit, killed. ``scale`` False runs without an actuator (reclaim, stalls, health and
    circuits only: the fleet is sized by someone else).
    """
    say = out or (lambda line: print(line, flush=True))
    home.require()
    lock = lock_for(home.supervisor_lock)
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        raise TemporaryFailure(f"another supervisor is running on {home.root} (it holds "
                               f"{home.supervisor_lock})") from None
    flags = _Flags()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        flags.stop += 1
        flags.signals.append(signum)

    def on_reload(signum: int, frame: FrameType | None) -> None:
        flags.reload = True

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop),
                 (signal.SIGHUP, on_reload))}
    notifier = Notifier()
    wakeup = Wakeup(home)
    watcher = PidWatcher(wakeup.set)
    sup: Supervisor | None = None
    ticks = list(ticks)
    keep_before = keep_last_good()  # restored when the loop ends (see the finally)
    try:
        if adopt_orphans:
            from .task_runner import become_subreaper

            become_subreaper()
        wakeup.start()
        watcher.start()
        # A bad system.json never stops the supervisor: it runs on the last good values
        # and reports config_invalid; started with a bad file, it waits for a good one.
        config_watch = ConfigWatch()
        while True:
            _emit_config_events(home, config_watch)
            try:
                cfg = dict(load_system(home).values)
                break
            except ConfigError as exc:
                say(f"supervisor: waiting for a valid config: {exc}")
                if flags.stop or once:
                    return EXIT_USAGE
                wakeup.wait(CONFIG_RETRY_S)
                wakeup.clear()
        cfg.update(overrides or {})
        wakeup.follow_queue(open_queue(home))  # the config names the backend: after it
        wakeup.keep_view(open_queue(home))  # this host's jq view, <= 1 s stale
        if actuator is None and scale:
            actuator = make_actuator(home, cfg, name=actuator_name)
        apply_scale = not (once and isinstance(actuator, ProcessActuator))
        sup = Supervisor(home, actuator, overrides=overrides, apply_scale=apply_scale)
        if verbose:
            say(f"supervisor pid {os.getpid()} on {home.root}: actuator "
                f"{actuator.name if actuator is not None else 'none (no scaling)'}, "
                f"pid watcher {'pidfd' if watcher.available else 'off (tick only)'}")
        ready = False
        watchdog_at = 0.0
        while True:
            wakeup.clear()
            if flags.reload:
                flags.reload = False
                _emit(home, "supervisor_reloaded", "configuration re-read (SIGHUP)")
            if flags.stop:
                break
            now = clock.now()
            _emit_config_events(home, config_watch)
            try:
                report = sup.reconcile(now)
            except HarnessError as exc:  # busy lock, bad config edit, disk full: retry
                say(f"supervisor: pass failed, retrying next tick: {exc}")
                report = {"error": str(exc)}
            if verbose:
                for line in report.get("actions", []):
                    say(f"supervisor: {line}")
            if not ready:
                notifier.ready(status=status_text(report))
                ready = True
            else:
                notifier.status(status_text(report))
            watcher.watch(sup.watched_pids())
            if adopt_orphans:
                known = actuator.pids().values() if isinstance(actuator, ProcessActuator) \
                    else ()
                reap_orphans(known)
            if on_pass is not None and on_pass(report):
                break
            mono = time.monotonic()
            for tick in ticks:
                if mono >= tick.next_at:
                    tick.next_at = mono + tick.every_s
                    try:
                        tick.func(now)
                    except Exception as exc:  # a side job never stops the loop
                        tick.errors += 1
                        say(f"supervisor: {tick.name} failed: {type(exc).__name__}: {exc}")
            if once:
                break
            interval = notifier.watchdog_interval_s
            if interval is not None and time.monotonic() >= watchdog_at:
                notifier.watchdog()
                watchdog_at = time.monotonic() + interval
            waits = [float(sup.config()["supervisor_tick_s"])]
            waits += [t.next_at - time.monotonic() for t in ticks]
            expiry = report.get("next_lease_expiry")
            if expiry:  # just past it: expired_leases compares lease_until < now
                waits.append(clock.parse_iso(expiry) + LEASE_WAKE_LATE_S - clock.now())
            if interval is not None:
                waits.append(watchdog_at - time.monotonic())
            wakeup.wait(max(0.0, min(waits)))
        notifier.stopping(status="stopping")
        if stop_workers and isinstance(actuator, ProcessActuator) and actuator.children:
            _stop_children(actuator, sup.config(), flags, say)
        if stop_workers and adopt_orphans and isinstance(actuator, ProcessActuator):
            _stop_adopted(home, actuator, sup.config(), flags, say, watcher, wakeup)
        return 0
    finally:
        try:
            if isinstance(actuator, ProcessActuator) and stop_workers:
                actuator.close(0)
            if adopt_orphans:
                kill_descendants()
        finally:
            watcher.stop()
            wakeup.stop()
            notifier.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            keep_last_good(keep_before)
            lock.release()


def adopted_workers(home: Home, own: Iterable[int]) -> list[tuple[str, psutil.Process]]:
    """Live workers of ``home`` on this host that are neither ours (``own`` pids) nor
    systemd's (a spec with a ``unit``): those a previous ``harness up`` left behind, which
    this one counted in its fleet. Only a worker proven to be the process of its spec (pid
    and start time) is listed: a reused pid is never signalled."""
    mine = set(own) | {os.getpid()}
    out = []
    for read in read_specs(home):
        spec = read.spec
        if not spec or not _same_host(spec) or spec.get("unit") or spec["pid"] in mine:
            continue
        recorded = spec.get("process_start_time")
        if not isinstance(recorded, int | float) or isinstance(recorded, bool):
            continue
        try:
            proc = psutil.Process(spec["pid"])
            if abs(proc.create_time() - recorded) > 0.05 or \
                    proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        out.append((str(spec.get("worker_id")), proc))
    return out


def _stop_adopted(home: Home, actuator: ProcessActuator, cfg: Mapping[str, Any],
                  flags: _Flags, say: Callable[[str], None], watcher: PidWatcher,
                  wakeup: Wakeup) -> None:
    """``harness up`` stops the workers it adopted as it stops its own children: SIGTERM
    (they hand back their task), each further SIGINT/SIGTERM hurries them, SIGKILL after
    the grace. Woken by the pid watcher when one exits."""
    adopted = adopted_workers(home, actuator.pids().values())
    if not adopted:
        return
    grace = float(cfg["stop_grace_s"]) + float(cfg["kill_grace_s"]) + 5.0
    say(f"stopping {len(adopted)} adopted worker(s) ({', '.join(w for w, _ in adopted)}): "
        f"running tasks finish or are handed back (up to {grace:.0f}s)")

    def signal_all(sig: int) -> None:
        for _, proc in adopted:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    def alive() -> list[tuple[str, psutil.Process]]:
        out = []
        for worker_id, proc in adopted:
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append((worker_id, proc))
        return out

    signal_all(signal.SIGTERM)
    seen = flags.stop
    deadline = time.monotonic() + grace
    while True:
        wakeup.clear()
        adopted = alive()
        if not adopted or time.monotonic() >= deadline or seen >= 3:
            break
        if flags.stop > seen:
            seen = flags.stop
            if seen >= 3:
                break
            signal_all(signal.SIGTERM)  # a second signal ends their stop grace
        watcher.watch((proc.pid, None) for _, proc in adopted)
        wakeup.wait(min(1.0, max(0.0, deadline - time.monotonic())))
    if adopted:
        say(f"killing {len(adopted)} adopted worker(s) that did not stop")
        signal_all(signal.SIGKILL)


def _emit_config_events(home: Home, watch: ConfigWatch) -> None:
    """config_invalid / config_valid on a change of the config's validity."""
    for event in watch.check(home):
        _emit(home, event["type"], event["message"], severity=event["severity"],
              data=event["data"])


def _stop_children(actuator: ProcessActuator, cfg: Mapping[str, Any], flags: _Flags,
                   say: Callable[[str], None]) -> None:
    """Drain our worker children: SIGTERM; each further SIGINT/SIGTERM hurries them."""
    grace = float(cfg["stop_grace_s"]) + float(cfg["kill_grace_s"]) + 5.0
    say(f"stopping {len(actuator.children)} worker(s): running tasks finish or are handed "
        f"back (up to {grace:.0f}s; Ctrl-C again to hurry, a third time to kill)")
    actuator.terminate_all()
    seen = flags.stop
    deadline = time.monotonic() + grace
    while actuator.children and time.monotonic() < deadline:
        if flags.stop > seen:
            seen = flags.stop
            if seen >= 3:
                break
            actuator.terminate_all()  # a second signal ends the workers' stop grace
        actuator.wait_all(0.1)
    if actuator.children:
        say(f"killing {len(actuator.children)} worker(s) that did not stop")
        for name in list(actuator.children):
            actuator.kill(name)
        actuator.wait_all(10.0)
