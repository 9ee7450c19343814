"""Worker benchmarks (measured, never asserted): dispatch latency, idle cost, throughput.

:func:`run_worker_bench` starts real ``harness worker run`` processes on throwaway homes and
returns a dict of figures:

- ``dispatch_latency_ms``: enqueue -> the task's process is running, on an idle worker
  (each task runs ``date +%s.%N``; its output is the start instant). ``from_call`` counts
  from just before ``QueueBackend.enqueue`` (includes the enqueue's own commit), ``from_commit``
  from its return. p50/p95/p99/max over ``samples``.
- ``idle_cpu``: CPU seconds an idle worker used over ``idle_seconds`` (psutil cpu_times).
- ``rss_mib``: the idle worker's resident set size.
- ``throughput``: ``true`` tasks per second end to end (enqueue of a batch -> all
  completed) with 1 and with 2 workers.

``harness bench`` (daemons/devtools/bench.py) reuses the pieces: :func:`dispatch_samples` (raw
latencies), :func:`measure_throughput` and :func:`spawn_ceiling` (how fast this machine can
merely spawn and reap ``true``, the bound end-to-end throughput is compared with).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from coordination import clock
from coordination.config import init_home
from coordination.metrics import percentile
from coordination.paths import Home
from coordination.queue import QueueBackend, open_queue
from coordination.specs import read_specs


def _home(root: Path, **overrides: Any) -> Home:
    home = Home(root)
    init_home(home, **{"max_queue_depth": 10**6, "retry_backoff_base_s": 0, **overrides})
    return home


def _start_worker(home: Home, instance: str, logdir: Path,
                  env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.update(env_extra or {})
    out = open(logdir / f"worker-{instance}.out", "wb")  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemons", "worker", "run", "--home", str(home.root),
             "--instance", instance], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        out.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(s.spec and s.spec.get("pid") == proc.pid for s in read_specs(home)):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}: "
                               f"{(logdir / f'worker-{instance}.out').read_text()}")
        time.sleep(0.01)
    raise RuntimeError("worker did not register within 30s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _idle(home: Home, pid: int) -> bool:
    for s in read_specs(home):
        if s.spec and s.spec.get("pid") == pid:
            return s.spec.get("state") == "idle" and s.spec.get("current_task_id") is None
    return False


def _wait_gone(queue: QueueBackend, task_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = queue.get(task_id)
        if found is not None and found.get("status") in ("completed", "failed", "cancelled"):
            return
        time.sleep(0.002)
    raise RuntimeError(f"task {task_id} did not finish within {timeout}s")


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(q: float) -> float:
        return round(percentile(ordered, q) or 0.0, 3)

    return {"n": len(ordered), "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
            "max": round(ordered[-1], 3), "mean": round(statistics.fmean(ordered), 3)}


def dispatch_samples(root: Path, samples: int, durability: str,
                     **home_overrides: Any) -> tuple[list[float], list[float]]:
    """Dispatch latencies in ms on one idle ``harness worker run`` (home under ``root``,
    with system.json ``home_overrides``, e.g. a postgres queue): ``(from_call,
    from_commit)``, one value per task, in order. Each task starts only once the worker is
    idle again, so every sample is a wake-up from idle."""
    home = _home(root / f"latency-{durability}", durability=durability, **home_overrides)
    queue = open_queue(home, shared=False)
    worker = _start_worker(home, "lat", root)
    from_call: list[float] = []
    from_commit: list[float] = []
    try:
        for _ in range(samples):
            deadline = time.monotonic() + 10
            while not _idle(home, worker.pid) and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(0.005)
            t0 = time.time()
            task = queue.enqueue({"command": ["date", "+%s.%N"]}).task
            t1 = time.time()
            _wait_gone(queue, task["task_id"])
            lines = home.task_log(task["task_id"]).read_text().splitlines()
            started = float(next(line for line in lines if not line.startswith("===")))
            from_call.append((started - t0) * 1000)
            from_commit.append((started - t1) * 1000)
    finally:
        _stop([worker])
        queue.close()
    return from_call, from_commit


def _latency(root: Path, samples: int, durability: str) -> dict[str, Any]:
    from_call, from_commit = dispatch_samples(root, samples, durability)
    return {"from_call": _percentiles(from_call), "from_commit": _percentiles(from_commit)}


def _idle_cost(root: Path, seconds: float, durability: str) -> dict[str, Any]:
    home = _home(root / "idle", durability=durability)
    worker = _start_worker(home, "idle", root)
    try:
        proc = psutil.Process(worker.pid)
        time.sleep(1.0)  # let start-up settle
        before = proc.cpu_times()
        time.sleep(seconds)
        after = proc.cpu_times()
        rss = proc.memory_info().rss
        threads = proc.num_threads()
    finally:
        _stop([worker])
    cpu = (after.user - before.user) + (after.system - before.system)
    return {"seconds": seconds, "cpu_seconds": round(cpu, 4),
            "cpu_percent": round(100 * cpu / seconds, 4), "rss_mib": round(rss / 2**20, 1),
            "threads": threads}


def measure_throughput(root: Path, workers: int, tasks: int, durability: str, *,
                       hosts: int = 1, **home_overrides: Any) -> dict[str, Any]:
    """``tasks`` ``true`` tasks end to end on ``workers`` already registered workers: the
    clock starts before the batch enqueue and stops when no task is live (all completed).
    With ``hosts`` > 1 (a shared queue: ``home_overrides`` name a postgres database) the
    workers are spread over that many homes, each its own simulated host
    (``HARNESS_HOST_ID``)."""
    homes = [_home(root / f"throughput-{workers}-{durability}" / f"host{h}",
                   durability=durability, **home_overrides) for h in range(hosts)]
    home = homes[0]
    queue = open_queue(home, shared=False)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(workers):
            host = i % hosts
            procs.append(_start_worker(homes[host], f"tp{i}", root,
                                       {"HARNESS_HOST_ID": f"bench-host{host}"}))
        t0 = time.monotonic()
        queue.enqueue_batch([{"command": ["true"]} for _ in range(tasks)])
        deadline = t0 + 600
        while queue.stats()["live"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tasks} tasks not done within 600s")
            # A look every 5 ms, as huey's result.get in peer_bench: a watcher woken by
            # each of the workers' commits would take CPU from the workers it measures.
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
    finally:
        _stop(procs)
        queue.close()
    return {"workers": workers, "tasks": tasks, "seconds": round(elapsed, 3),
            "tasks_per_s": round(tasks / elapsed, 1)}


def idle_rss_with_backlog(root: Path, backlog: int) -> float:
    """Resident set (MiB) of an idle worker whose queue holds ``backlog`` queued tasks of a
    paused type (so it loads them all and claims none)."""
    from coordination.control import update_control

    home = _home(root / "rss-backlog", durability="none")
    queue = open_queue(home, shared=False)
    for start in range(0, backlog, 5000):
        queue.enqueue_batch([{"command": ["true"], "description": f"backlog {i}"}
                             for i in range(start, min(backlog, start + 5000))])
    queue.close()
    update_control(home, lambda s: s["paused_types"].update(
        {"default": {"since": clock.iso(time.time()), "until": None, "reason": "bench"}}))
    worker = _start_worker(home, "rss", root)
    try:
        proc = psutil.Process(worker.pid)
        deadline = time.monotonic() + 120
        while not _idle(home, worker.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # its first claim attempt has loaded the whole queue by now
        return float(proc.memory_info().rss / 2**20)
    finally:
        _stop([worker])


def spawn_ceiling(n: int, method: str = "subprocess") -> float:
    """Processes per second this machine can merely spawn and reap, ``true`` after
    ``true``: ``subprocess.run`` (what a worker's runner builds on) or bare
    ``os.posix_spawn`` + ``waitpid``. No coordination at all: an upper bound."""
    true = shutil.which("true") or "/bin/true"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    t0 = time.perf_counter()
    if method == "subprocess":
        for _ in range(n):
            subprocess.run([true], check=True, env=env)
    elif method == "posix_spawn":
        for _ in range(n):
            pid = os.posix_spawn(true, [true], env)
            os.waitpid(pid, 0)
    else:
        raise ValueError(f"unknown spawn method {method!r}")
    return n / (time.perf_counter() - t0)


def run_worker_bench(samples: int = 200, *, idle_seconds: float = 60.0,
                     throughput_tasks: int = 300, durability: str = "fsync") -> dict[str, Any]:
    """Run every worker benchmark on throwaway homes; returns the figures (see module doc).
    ``durability`` is system.json's (``fsync``, the default, or ``none``)."""
    root = Path(tempfile.mkdtemp(prefix="harness-worker-bench-"))
    try:
        return {
            "durability": durability,
            "dispatch_latency_ms": _latency(root, samples, durability),
            "idle": _idle_cost(root, idle_seconds, durability),
            "throughput": [measure_throughput(root, 1, throughput_tasks, durability),
                           measure_throughput(root, 2, throughput_tasks, durability)],
            "load_average": os.getloadavg(),
            "cpus": os.cpu_count(),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    import json

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    idle = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    mode = sys.argv[3] if len(sys.argv) > 3 else "fsync"
    print(json.dumps(run_worker_bench(n, idle_seconds=idle, durability=mode), indent=2))
