"""Supervisor measurements (reported, never asserted): how fast a dead worker's task is
queued again, and what an idle supervisor costs.

``python -m daemons.supervisor_bench [--trials N] [--idle-seconds S] [--no-pidfd]`` prints
both as JSON. Each function runs real processes (``harness supervisor run``, ``harness
worker run``) on a throwaway home with default settings and returns a dict.
"""

from __future__ import annotations

import argparse
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

import orjson
import psutil

from coordination.config import DEFAULT_WORKER_TYPES, default_system
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.store import replace_json

from .supervisor import health_path, reap_orphans
from .task_runner import become_subreaper

HARNESS = [sys.executable, "-m", "daemons"]


def _home(root: Path, **overrides: Any) -> Home:
    home = Home(root)
    home.create()
    cfg = default_system()
    cfg.update(overrides)
    replace_json(home.system_config, cfg, pretty=True)
    replace_json(home.worker_types_config, DEFAULT_WORKER_TYPES, pretty=True)
    return home


def _env(pidfd: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                        "HARNESS_HOME", "HARNESS_INSTANCE")}
    if not pidfd:
        env["HARNESS_SUPERVISOR_NO_PIDFD"] = "1"
    return env


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def _wait(cond: Any, timeout: float, what: str, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def _status(home: Home, task_id: str) -> tuple[str | None, str | None]:
    try:
        data = orjson.loads(home.queue_file.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None, None
    for task in data.get("tasks", []):
        if task["task_id"] == task_id:
            return task["status"], task.get("worker_id")
    return None, None


def _quantile(values: list[float], q: float) -> float:
    data = sorted(values)
    pos = (len(data) - 1) * q
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def measure_reclaim_latency(trials: int = 20, *, pidfd: bool = True,
                            workdir: Path | None = None) -> dict[str, Any]:
    """Seconds from SIGKILL of a busy worker to its task being ``queued`` again in
    task-queue.json, with a running ``harness supervisor run --no-scale`` (default
    settings; no actuator, so it neither starts nor drains the measured workers). The
    killed worker is reaped at once, as systemd would."""
    become_subreaper()  # the killed workers' orphaned tasks are reaped here, not by init
    root = Path(tempfile.mkdtemp(prefix="harness-reclaim-bench-", dir=workdir))
    # Default settings, except that the circuit breaker must not pause the "default" type
    # after five reclaimed (failed) attempts, as it rightly would.
    home = _home(root / "home", circuit_min_tasks=10**6)
    env = _env(pidfd)
    sup = _spawn([*HARNESS, "supervisor", "run", "--no-scale", "--home", str(home.root)],
                 root / "supervisor.log", env)
    samples: list[float] = []
    try:
        _wait(health_path(home).exists, 60, "the supervisor's first pass", 0.02)
        queue = TaskQueue(home)
        for trial in range(trials):
            worker = _spawn([*HARNESS, "worker", "run", "--instance", f"b{trial}", "--home",
                             str(home.root)], root / f"worker-{trial}.log", env)
            try:
                task_id = queue.enqueue({"command": ["sleep", "300"],
                                         "description": f"bench {trial}"}).task["task_id"]
                _wait(lambda: _status(home, task_id)[0] == "running", 60,  # noqa: B023
                      "the task to start")
                time.sleep(0.3)  # let the supervisor's pass see the busy worker
                t0 = time.time()
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(30)
                _wait(lambda: _status(home, task_id)[0] == "queued", 60,  # noqa: B023
                      "the reclaim")
                samples.append(time.time() - t0)
                queue.cancel(task_id)
            finally:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(30)
    finally:
        _stop(sup)
        shutil.rmtree(root, ignore_errors=True)
        time.sleep(0.2)
        reap_orphans(())
    return {"trials": len(samples), "pid_watcher": "pidfd" if pidfd else "off (tick only)",
            "supervisor_tick_s": default_system()["supervisor_tick_s"],
            "p50_s": round(statistics.median(samples), 4),
            "p90_s": round(_quantile(samples, 0.9), 4),
            "min_s": round(min(samples), 4), "max_s": round(max(samples), 4),
            "samples_s": [round(s, 4) for s in samples]}


def measure_idle_cpu(duration_s: float = 60.0, *, warmup_s: float = 5.0,
                     workdir: Path | None = None) -> dict[str, Any]:
    """CPU used by an idle ``harness supervisor run`` (default settings: one idle worker
    kept by min_workers/warm_pool, nothing queued) over ``duration_s``; the worker's own
    CPU is reported apart."""
    root = Path(tempfile.mkdtemp(prefix="harness-idle-bench-", dir=workdir))
    home = _home(root / "home", actuator="process")
    sup = _spawn([*HARNESS, "supervisor", "run", "--home", str(home.root)],
                 root / "supervisor.log", _env())
    try:
        _wait(health_path(home).exists, 60, "the supervisor's first pass", 0.02)
        time.sleep(warmup_s)
        proc = psutil.Process(sup.pid)
        kids = proc.children(recursive=True)

        def cpu(p: psutil.Process) -> float:
            t = p.cpu_times()
            return float(t.user + t.system)

        before = cpu(proc)
        kids_before = {k.pid: cpu(k) for k in kids}
        t0 = time.monotonic()
        time.sleep(duration_s)
        elapsed = time.monotonic() - t0
        used = cpu(proc) - before
        kids_used = 0.0
        for k in kids:
            with contextlib.suppress(psutil.Error):
                kids_used += cpu(k) - kids_before.get(k.pid, 0.0)
    finally:
        _stop(sup, 60)
        shutil.rmtree(root, ignore_errors=True)
    return {"duration_s": round(elapsed, 2), "supervisor_cpu_s": round(used, 4),
            "supervisor_cpu_percent": round(100 * used / elapsed, 3),
            "workers": len(kids), "workers_cpu_s": round(kids_used, 4),
            "supervisor_tick_s": default_system()["supervisor_tick_s"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--no-pidfd", action="store_true",
                        help="Also measure the reclaim latency without the pid watcher.")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"reclaim_latency": measure_reclaim_latency(args.trials)}
    if args.no_pidfd:
        out["reclaim_latency_tick_only"] = measure_reclaim_latency(args.trials, pidfd=False)
    if args.idle_seconds > 0:
        out["idle_cpu"] = measure_idle_cpu(args.idle_seconds)
    sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    main()
