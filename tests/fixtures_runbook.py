"""Fixture homes for tests/test_runbook.py: realistic content built through the real API.

:func:`build_home` simulates about 40 minutes of a small fleet, ending at ``now``, with the
public API only (``TaskQueue`` enqueue/claim/complete/fail/reclaim/cancel with ``now=...``,
``specs.new_spec``/``write_spec``/``complete_spec``, ``events.emit``, ``control``,
``metrics.take_snapshot``), so every file has the shape the daemons give it:

- three worker types (``default``, ``shell``, and ``agent`` with a command template and a
  token budget) and 30-odd tasks of mixed priorities, enqueued over time and run by a
  discrete-event simulation of five worker lifetimes (two slots at a time);
- completed tasks with ``result.tokens_used``, retries (non-final ``failed`` records),
  dead letters with different ``last_error`` texts, a reclaim after a worker crash, a
  dependency failure, an operator cancel, a deduplicated request, a rejected inbox file;
- completed worker specs (``drained``, ``crashed``, ``idle``) and two active ones whose pids
  are real processes supplied by the caller (the test spawns and reaps them): one busy
  with a running task, one idle; heartbeats fresh at ``now``;
- queued tasks left at the end (one waiting for its retry back-off), task logs, result
  files, a metrics snapshot every five simulated minutes and a few operator events.

Variants for the failure drills are applied on top by the ``make_*`` functions.
"""

from __future__ import annotations

import heapq
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordination import clock
from coordination.config import default_system
from coordination.config_keys import DEFAULT_WORKER_TYPES
from coordination.control import update_control
from coordination.events import emit
from coordination.metrics import take_snapshot
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import complete_spec, new_spec, write_spec
from coordination.store import replace_json

#: Simulated span of the fixture's history, in seconds before ``now``.
SPAN_S = 40 * 60

AGENT_TYPE: dict[str, Any] = {
    "description": "Runs the coding agent on the task's description.",
    "command_template": ["./run-agent.sh", "--task", "{task_id}", "--prompt", "{description}"],
    "env_allowlist": ["ANTHROPIC_API_KEY"],
    "default_budget": 200000,
    "timeout_s": 1800,
    "max_attempts": 2,
    "cwd": None,
    "limits": {"memory_mb": 4096, "cpu_seconds": None, "processes": 256},
}


@dataclass
class Plan:
    """What happens to one task: its request, when it is enqueued (seconds after the start
    of the simulation), and per attempt how long it runs and how it ends."""

    at: float
    request: dict[str, Any]
    # Each attempt: (duration_s, outcome) with outcome "ok", or "fail:<error>:<exit code>".
    attempts: list[tuple[float, str]]
    tokens: int | None = None
    log: list[str] = field(default_factory=list)


def _plans() -> list[Plan]:
    rnd = random.Random(20260101)
    plans: list[Plan] = []
    repos = ["billing", "search", "frontend", "ingest", "auth"]
    for i in range(12):  # agent tasks: the token spenders
        repo = repos[i % len(repos)]
        attempts: list[tuple[float, str]] = [(rnd.uniform(40, 240), "ok")]
        if i == 3:
            attempts = [(600.0, "fail:timeout after 600.0s (killed by SIGTERM):124"),
                        (600.0, "fail:timeout after 600.0s (killed by SIGTERM):124")]
        elif i == 7:
            attempts = [(35.0, "fail:exit code 1: rate limited (HTTP 429):1"),
                        (rnd.uniform(60, 120), "ok")]
        plans.append(Plan(
            at=60.0 + i * 150 + rnd.uniform(0, 30),
            request={"description": f"Fix the flaky tests of {repo} (issue #{410 + i})",
                     "worker_type": "agent", "priority": ("high", "medium", "medium")[i % 3],
                     "correlation_id": f"sprint-{12 + i // 6}", "timeout_s": 600},
            attempts=attempts, tokens=rnd.randrange(8_000, 90_000),
            log=[f"cloning {repo}", "running the test suite", "3 failures found",
                 "patch applied", "tests pass"]))
    for i in range(10):  # shell tasks: builds and test runs
        attempts = [(rnd.uniform(5, 90), "ok")]
        if i in (2, 6):
            attempts = [(12.0, "fail:exit code 2: make: *** [Makefile:31: test] Error 2:2"),
                        (14.0, "fail:exit code 2: make: *** [Makefile:31: test] Error 2:2")]
        plans.append(Plan(
            at=30.0 + i * 200 + rnd.uniform(0, 40),
            request={"description": f"make -C /srv/build/{repos[i % 5]} test",
                     "worker_type": "shell", "priority": ("medium", "low")[i % 2],
                     "max_attempts": 2},
            attempts=attempts, tokens=None if i % 3 else 0,
            log=["make: Entering directory", "pytest -q", "42 passed"]
            if attempts[0][1] == "ok" else ["make: Entering directory", "FAILED test_io.py",
                                            "make: *** [Makefile:31: test] Error 2"]))
    for i in range(8):  # default tasks: their own argv
        attempts = [(rnd.uniform(1, 20), "ok")]
        if i == 5:
            attempts = [(3.0, "fail:exit code 1: rsync: connection refused:1"),
                        (3.0, "fail:exit code 1: rsync: connection refused:1"),
                        (3.0, "fail:exit code 1: rsync: connection refused:1")]
        plans.append(Plan(
            at=90.0 + i * 260 + rnd.uniform(0, 60),
            request={"command": ["./scripts/sync.sh", "--repo", repos[i % 5]],
                     "description": f"mirror {repos[i % 5]}",
                     "priority": ("low", "medium", "critical", "low")[i % 4],
                     "dedup_key": f"sync-{repos[i % 5]}-{i}"},
            attempts=attempts, tokens=None))
    return plans


@dataclass
class _Worker:
    worker_id: str
    instance: str
    start: float
    end: float | None  # None: still alive at ``now``
    exit_reason: str | None
    pid: int
    busy: str | None = None
    lease: str | None = None  # the lease token of the task it runs
    done: int = 0
    failed: int = 0
    tokens: int = 0
    spec: dict[str, Any] = field(default_factory=dict)


def _write_system(home: Home, **overrides: Any) -> None:
    cfg = default_system()
    cfg.update(overrides)
    replace_json(home.system_config, cfg, pretty=True)


def build_home(root: Path, live_pids: Sequence[int], *, now: float | None = None,
               **system: Any) -> Home:
    """Create and fill a home at ``root`` (see the module docstring). ``live_pids``: two
    running processes that stand in for the two active workers (busy, idle)."""
    now = clock.now() if now is None else now
    start = now - SPAN_S
    home = Home(root)
    home.create()
    # Fast writes while building; the real setting (fsync) is written at the end.
    _write_system(home, durability="none", retry_backoff_base_s=120, retry_jitter=0, **system)
    types = json.loads(json.dumps(DEFAULT_WORKER_TYPES))
    types["worker_types"]["agent"] = AGENT_TYPE
    replace_json(home.worker_types_config, types, pretty=True)
    queue = TaskQueue(home)
    plans = _plans()
    by_id: dict[str, Plan] = {}
    attempt_no: dict[str, int] = {}
    crashed_pid = _dead_pid_guess()
    workers = [
        _Worker(clock.new_worker_id("1", start + 5), "1", start + 5, start + 1320, "drained",
                crashed_pid + 1),
        _Worker(clock.new_worker_id("2", start + 6), "2", start + 6, start + 1700, "crashed",
                crashed_pid),
        _Worker(clock.new_worker_id("3", start + 900), "3", start + 900, now - 240, "idle",
                crashed_pid + 2),
        _Worker(clock.new_worker_id("1", start + 1330), "1", start + 1330, None, None,
                live_pids[0]),
        _Worker(clock.new_worker_id("2", start + 1790), "2", start + 1790, None, None,
                live_pids[1]),
    ]
    heap: list[tuple[float, int, str, Any]] = []
    seq = iter(range(1_000_000))

    def push(t: float, kind: str, payload: Any) -> None:
        heapq.heappush(heap, (t, next(seq), kind, payload))

    for plan in plans:
        push(start + plan.at, "enqueue", plan)
    for w in workers:
        push(w.start, "start", w)
        if w.end is not None:
            push(w.end, "exit", w)
    for minute in range(5, 40, 5):
        push(start + minute * 60 - 1, "snapshot", None)
    push(start + 700, "reject", None)
    push(start + 1500, "cancel", None)
    push(start + 1000, "operator", None)
    push(now - 400, "alert", None)

    def spec_update(w: _Worker, t: float, **changes: Any) -> None:
        w.spec.update(changes, heartbeat_at=clock.iso(t))
        write_spec(home, w.spec)
        if w.busy and w.lease:  # a live worker's heartbeat extends its lease too
            queue.heartbeat(w.worker_id, {w.busy: w.lease}, now=t)

    def try_claim(w: _Worker, t: float) -> None:
        if w.busy or (w.end is not None and t >= w.end) or not w.spec:
            return
        task = queue.claim(w.worker_id, now=t)
        if task is None:
            push(t + 20, "free", w)  # the safety re-check of an idle worker
            return
        tid = task["task_id"]
        w.busy, w.lease = tid, task["lease_token"]
        spec_update(w, t, state="busy", current_task_id=tid, task_started_at=clock.iso(t),
                    progress=0)
        emit(home, "task_started", source="worker", task_id=tid, worker_id=w.worker_id,
             correlation_id=task["correlation_id"], now=t,
             message=f"attempt {task['attempts']} started as pid {40000 + len(attempt_no)}")
        n = attempt_no[tid] = attempt_no.get(tid, 0) + 1
        duration, _ = by_id[tid].attempts[min(n, len(by_id[tid].attempts)) - 1]
        if w.exit_reason == "crashed" and w.end is not None and t + duration > w.end:
            return  # dies with the task in hand
        if w.end is None and t + duration > now:
            return  # still running at ``now``
        push(t + duration, "finish", w)

    while heap:
        t, _, kind, payload = heapq.heappop(heap)
        if t > now:
            break
        if kind == "enqueue":
            plan = payload
            result = queue.enqueue(plan.request, now=t)
            by_id[result.task["task_id"]] = plan
            if plan.request.get("dedup_key", "").endswith("-3"):
                queue.enqueue(plan.request, now=t + 2)  # a producer retrying: deduplicated
            for w in workers:
                if not w.busy:
                    try_claim(w, t + 0.05)
        elif kind == "start":
            w = payload
            w.spec = new_spec(w.worker_id, w.instance, t, types=None,
                              unit=f"harness-worker@{w.instance}.service", pid=w.pid)
            if w.end is not None:  # a process that no longer exists: no start time
                w.spec["process_start_time"] = t - 0.4
            w.spec["state"] = "idle"
            write_spec(home, w.spec, create=True)
            emit(home, "worker_started", source="worker", worker_id=w.worker_id, now=t,
                 message=f"worker {w.worker_id} registered",
                 data={"pid": w.pid, "instance": w.instance, "types": None,
                       "unit": w.spec["unit"]})
            try_claim(w, t + 0.1)
        elif kind == "free":
            try_claim(payload, t)
        elif kind == "finish":
            w = payload
            tid = w.busy
            assert tid is not None
            plan = by_id[tid]
            n = attempt_no[tid]
            _, outcome = plan.attempts[min(n, len(plan.attempts)) - 1]
            _write_task_files(home, tid, plan, outcome, t)
            if outcome == "ok":
                tokens = plan.tokens
                res = None if tokens is None else {"tokens_used": tokens, "files_changed": 3}
                queue.complete(tid, w.worker_id, result=res, now=t)
                w.done += 1
                w.tokens += tokens or 0
            else:
                error, _, code = outcome.removeprefix("fail:").rpartition(":")
                queue.fail(tid, w.worker_id, error=error, exit_code=int(code),
                           result={"tokens_used": plan.tokens // 3} if plan.tokens else None,
                           now=t)
                w.failed += 1
            w.busy = None
            spec_update(w, t, state="idle", current_task_id=None, task_started_at=None,
                        tasks_done=w.done, tasks_failed=w.failed, tokens_used=w.tokens,
                        progress=0)
            try_claim(w, t + 0.5)
        elif kind == "exit":
            w = payload
            if w.exit_reason == "crashed":
                # The supervisor notices the dead pid and takes the task back.
                push(t + 1.7, "reclaim", w)
                continue
            if w.busy:  # a drain lets the task finish: exit a little later
                push(t + 30, "exit", w)
                continue
            w.end = t
            complete_spec(home, w.worker_id, w.exit_reason or "idle", t,
                          extra={"tasks_done": w.done, "tasks_failed": w.failed,
                                 "tokens_used": w.tokens, "heartbeat_at": clock.iso(t)})
            emit(home, "worker_stopped", source="worker", worker_id=w.worker_id, now=t,
                 message=f"worker {w.worker_id} exited: {w.exit_reason}",
                 data={"exit_reason": w.exit_reason, "tasks_done": w.done,
                       "tasks_failed": w.failed, "tokens_used": w.tokens})
            if w.exit_reason == "drained":
                update_control(home, lambda s: s["drain"]["instances"].update(
                    {"1": clock.iso(start + 1300)}), now=start + 1300)
        elif kind == "reclaim":
            w = payload
            proof = f"pid {w.pid} is gone"
            if w.busy:
                task = queue.reclaim(w.busy, reason=proof, now=t)
                requeued = task["status"] == "queued"
                emit(home, "task_reclaimed", source="supervisor", severity="warning",
                     task_id=w.busy, worker_id=w.worker_id, now=t,
                     message=f"reclaimed from {w.worker_id}: {proof}; "
                     + ("queued again" if requeued else f"now {task['status']}"),
                     data={"proof": proof, "cause": "dead_worker",
                           "attempt": task["attempts"], "requeued": requeued,
                           "status": task["status"]})
            complete_spec(home, w.worker_id, "crashed", t,
                          extra={"tasks_done": w.done, "tasks_failed": w.failed,
                                 "tokens_used": w.tokens})
            emit(home, "worker_crashed", source="supervisor", severity="warning",
                 worker_id=w.worker_id, now=t, message=f"worker {w.worker_id} is dead: {proof}",
                 data={"proof": proof, "instance": w.instance, "pid": w.pid,
                       "task_id": w.busy})
            w.busy = None
            for other in workers:
                if not other.busy:
                    try_claim(other, t + 0.2)
        elif kind == "snapshot":
            take_snapshot(home, t)
        elif kind == "reject":
            bad = home.inbox / "nightly-report.json"
            bad.write_text('{"task_id": "nightly-report", "priority": "urgent", '
                           '"command": ["./report.sh"]}\n')
            queue.ingest(now=t)
        elif kind == "cancel":
            # An operator cancels a queued task: a low-priority one enqueued for it.
            added = queue.enqueue({"command": ["./scripts/reindex.sh", "--full"],
                                   "description": "full reindex", "priority": "low",
                                   "not_before": clock.iso(t + 3600)}, now=t - 60)
            queue.cancel(added.task["task_id"], reason="superseded by incremental reindex",
                         now=t)
        elif kind == "alert":
            emit(home, "performance_alert", source="harness-check", severity="warning", now=t,
                 message="error_rate: WARNING 0.24 (warning >= 0.2, critical >= 0.5)",
                 data={"check": "error_rate", "level": "warning", "previous": "ok",
                       "value": 0.24, "warning": 0.2, "critical": 0.5})
        elif kind == "operator":
            emit(home, "deploy.started", source="cli", correlation_id="deploy-42", now=t,
                 message="deploying 1.4.2", data={"version": "1.4.2"})
            emit(home, "deploy.finished", source="cli", correlation_id="deploy-42",
                 now=t + 95, message="deployed 1.4.2", data={"version": "1.4.2"})
            # A build whose dependency fails for good: cancelled with dependency_failed.
            fail = queue.enqueue({"command": ["false"], "description": "build docs",
                                  "priority": "high", "max_attempts": 1}, now=t)
            queue.enqueue({"command": ["./publish-docs.sh"], "description": "publish docs",
                           "depends_on": [fail.task["task_id"]]}, now=t + 1)
            by_id[fail.task["task_id"]] = Plan(t, {}, [(1.0, "fail:exit code 1:1")])
            for w in workers:
                if not w.busy:
                    try_claim(w, t + 2)

    # The last minute: worker 1 takes a new agent task (still running at ``now``), worker 2
    # fails a lint run (queued again, waiting for its back-off), and a nightly job is
    # scheduled for later.
    busy, idle = workers[3], workers[4]
    late = queue.enqueue({"description": "Upgrade the search index mapping",
                          "worker_type": "agent", "priority": "high",
                          "correlation_id": "sprint-14"}, now=now - 150)
    by_id[late.task["task_id"]] = Plan(0, {}, [(3600.0, "ok")])
    lint = queue.enqueue({"description": "make -C /srv/build/frontend lint",
                          "worker_type": "shell", "priority": "medium"}, now=now - 140)
    by_id[lint.task["task_id"]] = Plan(0, {}, [(69.0, "fail:exit code 1: 3 eslint errors:1")],
                                       log=["eslint src/", "3 errors"])
    for w, t in ((busy, now - 149), (idle, now - 139)):
        if not w.busy:
            try_claim(w, t)
    push(now - 100, "nightly", None)
    while heap:
        t, _, kind, payload = heapq.heappop(heap)
        if kind == "nightly":
            queue.enqueue({"command": ["./scripts/sync.sh", "--repo", "auth"],
                           "description": "mirror auth (nightly)", "priority": "low",
                           "not_before": clock.iso(now + 6 * 3600)}, now=t)
        elif kind == "finish" and t <= now:
            w = payload
            assert w.busy is not None
            tid, plan = w.busy, by_id[w.busy]
            _write_task_files(home, tid, plan, plan.attempts[0][1], t)
            queue.fail(tid, w.worker_id, error="exit code 1: 3 eslint errors", exit_code=1,
                       now=t)
            w.failed += 1
            w.busy = None
            spec_update(w, t, state="idle", current_task_id=None, task_started_at=None,
                        tasks_failed=w.failed, progress=0)
    for w in workers:
        if w.end is None:
            spec_update(w, now - (1.5 if w.busy else 4.0),
                        **({"progress": 212} if w.busy else {}))
    take_snapshot(home, now - 0.5)
    _write_system(home, **system)
    return home


def _dead_pid_guess() -> int:
    """A pid no process has now (the crashed and exited workers' pids)."""
    pid = 4_000_000  # above the default pid_max of 4194304's usual range of use
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 7


def _write_task_files(home: Home, task_id: str, plan: Plan, outcome: str, t: float) -> None:
    log = home.task_log(task_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    stamp = clock.iso(t)
    with open(log, "a") as fh:
        fh.write(f"=== harness: {task_id} attempt at {stamp}\n")
        for line in plan.log or ["working"]:
            fh.write(line + "\n")
        if outcome != "ok":
            fh.write(outcome.removeprefix("fail:").rpartition(":")[0] + "\n")
    if plan.tokens is not None and outcome == "ok":
        rdir = home.result_dir(task_id)
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "result.json").write_text(json.dumps({"tokens_used": plan.tokens,
                                                      "files_changed": 3}) + "\n")


# ---------------------------------------------------------------------------- variants
def make_killed_worker(home: Home, now: float | None = None) -> str:
    """A worker SIGKILLed mid-task: its active spec names a pid that is gone, and its task
    is still ``running`` in the queue. Returns the worker id."""
    now = clock.now() if now is None else now
    queue = TaskQueue(home)
    wid = clock.new_worker_id("4", now - 300)
    spec = new_spec(wid, "4", now - 300, unit="harness-worker@4.service", pid=_dead_pid_guess())
    spec["process_start_time"] = now - 300.3
    write_spec(home, spec, create=True)
    task = queue.enqueue({"description": "Refactor the auth middleware", "worker_type": "agent",
                          "priority": "critical", "correlation_id": "incident-7"}, now=now - 200)
    claimed = queue.claim(wid, types=["agent"], now=now - 190)
    assert claimed is not None and claimed["task_id"] == task.task["task_id"], claimed
    spec.update({"state": "busy", "current_task_id": claimed["task_id"],
                 "task_started_at": clock.iso(now - 190), "heartbeat_at": clock.iso(now - 40),
                 "progress": 17})
    write_spec(home, spec)
    return wid


def make_stuck_worker(home: Home, pid: int, now: float | None = None) -> str:
    """A worker frozen by SIGSTOP: its process ``pid`` (already stopped by the caller) still
    exists, but its heartbeat stopped 5 minutes ago while it held a running task."""
    now = clock.now() if now is None else now
    queue = TaskQueue(home)
    wid = clock.new_worker_id("5", now - 900)
    spec = new_spec(wid, "5", now - 900, unit="harness-worker@5.service", pid=pid)
    write_spec(home, spec, create=True)
    queue.enqueue({"description": "make -C /srv/build/billing integration",
                   "worker_type": "shell", "priority": "high"}, now=now - 700)
    claimed = queue.claim(wid, types=["shell"], now=now - 690)
    assert claimed is not None
    spec.update({"state": "busy", "current_task_id": claimed["task_id"],
                 "task_started_at": clock.iso(now - 690), "heartbeat_at": clock.iso(now - 300),
                 "progress": 4})
    write_spec(home, spec)
    return wid


def make_corrupt_queue(home: Home) -> None:
    """task-queue.json cut in the middle (e.g. a disk that lied about a write)."""
    queue = TaskQueue(home)
    queue.sync()  # the jq view as 1 s of quiet leaves it
    queue.close()
    data = home.queue_file.read_bytes()
    home.queue_file.write_bytes(data[: len(data) // 2])


def make_torn_tails(home: Home) -> None:
    """Torn last lines, as an append cut short by a crash (not by harness) leaves them."""
    with open(home.events_file, "ab") as fh:
        fh.write(b'{"event_id":"ev-20260101T000000000-aaaaaaaaaaaa","timestamp":"20')
    with open(home.history_file, "ab") as fh:
        fh.write(b'{"task_id":"t-torn","desc')


def make_full_queue(home: Home, now: float | None = None) -> None:
    """A burst of low-priority work, and max_queue_depth set to what is queued now, so the
    next enqueue exits 75."""
    now = clock.now() if now is None else now
    queue = TaskQueue(home)
    queue.enqueue_batch([{"command": ["./reindex.sh", str(shard)], "priority": "low",
                          "description": f"reindex shard {shard}"} for shard in range(1, 5)],
                        now=now - 5)
    queued = sum(1 for t in queue.live_tasks() if t["status"] == "queued")
    set_system_keys(home, max_queue_depth=queued)


def set_system_keys(home: Home, **values: Any) -> None:
    """Change keys of the home's system.json (published by rename)."""
    cfg = json.loads(home.system_config.read_text())
    cfg.update(values)
    replace_json(home.system_config, cfg, pretty=True)
