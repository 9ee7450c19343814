"""Several hosts sharing one PostgreSQL database (issue 13: leases, fencing, reclaim).

Each simulated host is a home of its own (its specs, events and inbox) over the same
database, with ``HARNESS_HOST_ID`` set for its processes; the workers are real ``harness
worker run`` processes and the tasks real process groups. A host's supervisor is stepped
by the test (``Supervisor.reconcile``) or run as ``harness supervisor reclaim``. Leases are
short (``heartbeat_timeout_s``) to keep the runtime small; no test asserts a duration.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import ProcGroup, daemon_env, events, make_home, present, req, wait_until

from coordination import clock
from coordination.paths import Home
from coordination.queue import QueueBackend, open_queue
from coordination.tasks import HistoryRecord, Task

HOSTS = ("h1", "h2", "h3")


class Fleet:
    """Three homes over one database, one per simulated host, and their workers."""

    def __init__(self, tmp_path: Path, url: str, procs: ProcGroup, **system: Any) -> None:
        self.procs = procs
        self.homes = {h: make_home(tmp_path, f"home-{h}", queue_backend="postgres",
                                   database_url=url, **system) for h in HOSTS}
        self.workers: dict[str, list[Any]] = {h: [] for h in HOSTS}
        self.fast = tmp_path / "fast"  # tasks exit at once once this file exists

    def queue(self, host: str = "h1") -> QueueBackend:
        return open_queue(self.homes[host], shared=False)

    def start_worker(self, host: str) -> Any:
        n = len(self.workers[host])
        child = self.procs.spawn(f"worker-{host}-{n}", [
            sys.executable, "-m", "daemons", "worker", "run", "--home",
            str(self.homes[host].root), "--instance", f"{host}-{n}"],
            env=daemon_env(HARNESS_HOST_ID=host))
        child.wait_for_line("started worker-", timeout=30)
        self.workers[host].append(child)
        return child

    def task(self, seconds: float, **fields: Any) -> dict[str, Any]:
        """A task that sleeps ``seconds``, or exits at once once ``self.fast`` exists."""
        script = f"if [ -e {self.fast} ]; then exit 0; fi; sleep {seconds}"
        return req(command=["sh", "-c", script], **fields)

    def kill_host(self, host: str) -> None:
        """SIGKILL every process of ``host``: its workers and all their descendants (the
        tasks' process groups)."""
        victims: list[psutil.Process] = []
        for child in self.workers[host]:
            try:
                proc = psutil.Process(child.pid)
                victims += [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for proc in victims:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        for child in self.workers[host]:
            child.wait(30)

    def stop_all(self) -> None:
        """SIGTERM every worker still running and reap it."""
        for children in self.workers.values():
            for child in children:
                child.kill(signal.SIGCONT)
                child.kill(signal.SIGTERM)
        for children in self.workers.values():
            for child in children:
                child.wait(60)


@pytest.fixture
def fleet(tmp_path: Path, pg_database: Callable[..., str], procs: ProcGroup,
          adopt_orphans: None) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(**system: Any) -> Fleet:
        made.append(Fleet(tmp_path, pg_database(), procs, **system))
        return made[-1]

    yield make
    for fl in made:
        fl.stop_all()


#: Short leases: a worker heartbeats every 0.2 s; a silent one loses its task after 2 s.
FAST = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 2, "retry_backoff_base_s": 0,
        "retry_jitter": 0, "safety_recheck_s": 1}


def finals(queue: QueueBackend, task_id: str) -> list[HistoryRecord]:
    return [r for r in queue.history_of(task_id) if r.get("final")]


def outcomes(queue: QueueBackend, task_id: str) -> Counter[str]:
    return Counter(str(r["outcome"]) for r in queue.history_of(task_id))


def running_on(queue: QueueBackend, host: str) -> list[Task]:
    return [t for t in queue.live_tasks("running") if t["host_id"] == host]


def all_completed(queue: QueueBackend, ids: list[str]) -> bool:
    return all(any(r["status"] == "completed" for r in finals(queue, t)) for t in ids)


def supervisor_step(home: Home, host: str, monkeypatch: pytest.MonkeyPatch,
                    now: float | None = None) -> dict[str, Any]:
    """One reconcile pass of ``host``'s supervisor (no actuator: no scaling) at ``now``."""
    from daemons.supervisor.reconcile import Supervisor

    monkeypatch.setenv("HARNESS_HOST_ID", host)
    try:
        return Supervisor(home).reconcile(clock.now() if now is None else now)
    finally:
        monkeypatch.delenv("HARNESS_HOST_ID")


# ------------------------------------------------------------------------------ a dead host
def test_a_killed_host_s_tasks_are_reclaimed_by_another_host_and_none_is_lost(
        fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch) -> None:
    """h1 runs two tasks; SIGKILL takes its workers and their task processes. h2's
    supervisor leaves them alone while their leases hold (fail closed), then reclaims
    both once they expire; h2 and h3 run them to completion, each exactly once."""
    fl = fleet(**FAST)
    queue = fl.queue()
    ids = [queue.enqueue(fl.task(60, max_attempts=3)).task["task_id"] for _ in range(2)]
    fl.start_worker("h1")
    fl.start_worker("h1")
    wait_until(lambda: len(running_on(queue, "h1")) == 2, 30, "h1 running both tasks")
    fl.start_worker("h2")
    fl.start_worker("h3")
    fl.kill_host("h1")
    killed_at = time.monotonic()
    fl.fast.touch()
    # Fail closed: a pass just before the first lease ends reclaims nothing, although
    # h1's workers have no spec in h2's home and are in fact dead.
    first_end = clock.parse_iso(min(t["lease_until"] or "" for t in running_on(queue, "h1")))
    early = supervisor_step(fl.homes["h2"], "h2", monkeypatch, now=first_end - 0.05)
    assert early["reclaimed"] == []
    assert {t["task_id"] for t in running_on(queue, "h1")} == set(ids)
    reclaimed: list[dict[str, Any]] = []

    def step() -> bool:
        reclaimed.extend(supervisor_step(fl.homes["h2"], "h2", monkeypatch)["reclaimed"])
        return not running_on(queue, "h1")
    wait_until(step, 30, "h2's supervisor reclaiming h1's tasks", interval=0.1)
    reclaim_s = time.monotonic() - killed_at
    assert sorted(r["task_id"] for r in reclaimed) == sorted(ids)
    assert {r["cause"] for r in reclaimed} == {"lease_expired"}
    wait_until(lambda: all_completed(queue, ids), 60, "the reclaimed tasks completing")
    for task_id in ids:
        done = finals(queue, task_id)
        assert len(done) == 1 and done[0]["status"] == "completed", done
        assert done[0]["host_id"] in ("h2", "h3") and done[0]["attempts"] == 2
        assert outcomes(queue, task_id) == Counter(completed=1, reclaimed=1)
    print(f"reclaim of a dead host's tasks: {reclaim_s:.2f}s after SIGKILL "
          f"(heartbeat_timeout_s {FAST['heartbeat_timeout_s']})")
    errors = [f for f in queue.check() if f.level == "error"]
    assert errors == []


# ------------------------------------------------------------------------------ fencing
def test_a_worker_stopped_past_its_lease_is_fenced_when_it_resumes(
        fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch) -> None:
    """h1's worker is SIGSTOPped while its task runs (the task goes on and ends). Past the
    lease h2's supervisor reclaims the task and h2's worker completes it. SIGCONT: h1's
    worker finds its lease lost, records nothing (outcome lost) and keeps serving; the
    task is completed once, by h2."""
    fl = fleet(**FAST)
    queue = fl.queue()
    task_id = queue.enqueue(fl.task(1, max_attempts=3)).task["task_id"]
    h1 = fl.start_worker("h1")
    wait_until(lambda: running_on(queue, "h1"), 30, "h1 claiming the task")
    h1.kill(signal.SIGSTOP)
    fl.start_worker("h2")
    fl.fast.touch()  # the rerun on h2 exits at once; h1's own sleep 1 ends meanwhile

    def reclaimed() -> bool:
        out = supervisor_step(fl.homes["h2"], "h2", monkeypatch)
        return any(r["task_id"] == task_id for r in out["reclaimed"])
    wait_until(reclaimed, 30, "h2 reclaiming the stopped worker's task", interval=0.1)
    wait_until(lambda: all_completed(queue, [task_id]), 30, "h2 completing the task")
    h1.kill(signal.SIGCONT)
    lost = wait_until(lambda: events(fl.homes["h1"], "task_lost")
                      + events(fl.homes["h1"], "task_outcome_dropped"), 30,
                      "h1's worker noticing its lost lease")
    assert all(e["task_id"] == task_id for e in lost)
    done = finals(queue, task_id)
    assert len(done) == 1 and done[0]["host_id"] == "h2", done
    assert outcomes(queue, task_id) == Counter(completed=1, reclaimed=1)
    assert h1.popen.poll() is None  # fenced, not dead: it goes on serving
    assert events(fl.homes["h1"], "task_completed") == []


# ------------------------------------------------------------------------------ restart
def test_a_database_restart_mid_run_loses_nothing_and_completes_nothing_twice(
        fleet: Callable[..., Fleet], pg_cluster: Any) -> None:
    """PostgreSQL restarts while workers on h1 and h2 run tasks: they keep their tasks,
    reconnect, and record every outcome once the server is back; no task is run again."""
    if pg_cluster.datadir is None:
        pytest.skip("HARNESS_TEST_DATABASE_URL names a server these tests did not start")
    # A lease long enough to outlive the restart: nobody reclaims anything here.
    fl = fleet(**dict(FAST, heartbeat_timeout_s=20))
    queue = fl.queue()
    ids = [t.task["task_id"] for t in queue.enqueue_batch(
        [fl.task(1.5, max_attempts=1) for _ in range(6)])]
    workers = [fl.start_worker("h1"), fl.start_worker("h2")]
    wait_until(lambda: len(queue.live_tasks("running")) == 2, 30, "two tasks running")
    pg_cluster.restart(down_s=3.0)  # the running tasks end while there is no server
    wait_until(lambda: _quietly(lambda: all_completed(queue, ids)), 90,
               "every task completing after the restart")
    for task_id in ids:
        done = finals(queue, task_id)
        assert len(done) == 1 and done[0]["status"] == "completed", done
        assert done[0]["attempts"] == 1
        assert outcomes(queue, task_id) == Counter(completed=1)
    assert all(w.popen.poll() is None for w in workers), [w.stderr() for w in workers]
    # They did meet the outage (each says so once a minute at most).
    assert all("cannot record the outcome" in w.stderr() for w in workers)
    assert queue.live_tasks() == []


def _quietly(check: Callable[[], bool]) -> bool:
    """``check()``, False while the server is still coming back."""
    from coordination.errors import DatabaseUnavailable

    try:
        return check()
    except DatabaseUnavailable:
        return False


# ------------------------------------------------------------------------------ races
def test_two_supervisors_racing_reclaim_each_expired_task_once(
        fleet: Callable[..., Fleet], procs: ProcGroup,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Twenty tasks claimed on h1 whose worker never heartbeats; once their leases expire,
    `harness supervisor reclaim` on h2 and on h3 run at the same time: every task is
    reclaimed exactly once between them."""
    fl = fleet(heartbeat_timeout_s=1, retry_backoff_base_s=60)
    queue = fl.queue()
    queue.enqueue_batch([req() for _ in range(20)])
    monkeypatch.setenv("HARNESS_HOST_ID", "h1")
    for _ in range(20):
        assert queue.claim("worker-h1-gone") is not None
    monkeypatch.delenv("HARNESS_HOST_ID")
    wait_until(lambda: len(queue.expired_leases()) == 20, 10, "the leases expiring")
    racers = [procs.spawn(f"reclaim-{h}", [
        sys.executable, "-m", "daemons", "--home", str(fl.homes[h].root), "supervisor",
        "reclaim", "--json"], env=daemon_env(HARNESS_HOST_ID=h)) for h in ("h2", "h3")]
    for racer in racers:
        assert racer.wait(60) == 0, racer.stderr()
    got = [item["task_id"] for racer in racers
           for item in json.loads("".join(racer.lines()))["reclaimed"]]
    assert len(got) == len(set(got)) == 20
    for task in queue.live_tasks():
        assert task["status"] == "queued" and task["attempts"] == 1
        assert outcomes(queue, task["task_id"]) == Counter(reclaimed=1)


def test_another_host_s_task_with_a_valid_lease_is_never_reclaimed(
        fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch) -> None:
    """h2's supervisor has no spec for h1's worker (it lives in h1's home): before leases,
    a running task of an unknown worker older than heartbeat_timeout_s was an orphan.
    Now another host's task is judged by its lease alone: kept while the lease holds."""
    fl = fleet(heartbeat_timeout_s=30)
    queue = fl.queue()
    now = clock.now()
    task_id = queue.enqueue(req(), now=now - 100).task["task_id"]
    monkeypatch.setenv("HARNESS_HOST_ID", "h1")
    claimed = queue.claim("worker-h1-busy", now=now - 40)  # started 40 s ago
    monkeypatch.delenv("HARNESS_HOST_ID")
    assert claimed is not None and claimed["host_id"] == "h1"
    assert claimed["lease_token"] is not None
    queue.heartbeat("worker-h1-busy", {task_id: claimed["lease_token"]}, now=now - 1)
    out = supervisor_step(fl.homes["h2"], "h2", monkeypatch)
    assert out["reclaimed"] == []
    assert present(queue.get(task_id))["status"] == "running"
    # Its lease runs out 29 s from now: then any host reclaims it.
    from daemons.supervisor.reclaim import reclaim_pass

    late = reclaim_pass(fl.homes["h3"], now + 30, queue=queue, host="h3")
    assert [r["task_id"] for r in late["reclaimed"]] == [task_id]
