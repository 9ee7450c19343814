"""Supervisor measurements (reported, never asserted): how fast a dead worker's task is
queued again, and what an idle supervisor costs.

``python -m daemons.devtools.supervisor_bench [--trials N] [--idle-seconds S] [--no-pidfd]`` prints
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil

from coordination.config import default_system, init_home
from coordination.metrics import percentile
from coordination.paths import Home
from coordination.queue import open_queue

from ..process_groups import become_subreaper, reap_orphans

HARNESS = [sys.executable, "-m", "daemons"]


def _home(root: Path, **overrides: Any) -> Home:
    home = Home(root)
    init_home(home, **overrides)
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
    task = open_queue(home).get(task_id)
    if task is None:
        return None, None
    return task["status"], task.get("worker_id")


def _reclaim_samples(root: Path, home: Home, trials: int, sup_env: dict[str, str],
                     worker_env: dict[str, str], settle_s: float,
                     kill: Callable[[subprocess.Popen[bytes]], None]) -> list[float]:
    """Seconds from ``kill(worker)`` to its task ``queued`` again, per trial, under a
    ``harness supervisor run --no-scale`` (each trial: a fresh worker, a ``sleep 300``
    task, ``settle_s`` once it runs, then the kill). Removes ``root`` and reaps every
    orphan at the end."""
    sup = _spawn([*HARNESS, "supervisor", "run", "--no-scale", "--home", str(home.root)],
                 root / "supervisor.log", sup_env)
    samples: list[float] = []
    try:
        _wait(home.health_file.exists, 60, "the supervisor's first pass", 0.02)
        queue = open_queue(home)
        for trial in range(trials):
            worker = _spawn([*HARNESS, "worker", "run", "--instance", f"b{trial}", "--home",
                             str(home.root)], root / f"worker-{trial}.log", worker_env)
            try:
                task_id = queue.enqueue({"command": ["sleep", "300"],
                                         "description": f"bench {trial}"}).task["task_id"]
                _wait(lambda: _status(home, task_id)[0] == "running", 60,  # noqa: B023
                      "the task to start")
                time.sleep(settle_s)
                t0 = time.time()
                kill(worker)
                worker.wait(30)
                _wait(lambda: _status(home, task_id)[0] == "queued", 120,  # noqa: B023
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
    return samples


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

    def kill(worker: subprocess.Popen[bytes]) -> None:
        os.kill(worker.pid, signal.SIGKILL)
    samples = _reclaim_samples(root, home, trials, env, env, 0.3, kill)
    return {"trials": len(samples), "pid_watcher": "pidfd" if pidfd else "off (tick only)",
            "supervisor_tick_s": default_system()["supervisor_tick_s"],
            "p50_s": round(statistics.median(samples), 4),
            "p90_s": round(percentile(samples, 0.9) or 0.0, 4),
            "min_s": round(min(samples), 4), "max_s": round(max(samples), 4),
            "samples_s": [round(s, 4) for s in samples]}


#: Lease settings of the dead-host bench: the default heartbeat_timeout_s (60 s) would make
#: each trial a minute long; the figure scales with it (target: timeout + 2 s).
HOST_LEASE = {"heartbeat_timeout_s": 5.0, "heartbeat_interval_s": 1.0}


def measure_host_reclaim_latency(trials: int = 5, *,
                                 workdir: Path | None = None) -> dict[str, Any]:
    """Seconds from SIGKILL of a whole simulated host (its worker and its task's process
    group, ``HARNESS_HOST_ID=ha``) to its task being ``queued`` again by the supervisor of
    another host (``harness supervisor run --no-scale``, ``HARNESS_HOST_ID=hb``), which
    may only judge it by its lease (:data:`HOST_LEASE`). The two hosts share one file home
    here: the lease rule and the supervisor's wake-up at the next lease expiry are the same
    code on a postgres home."""
    become_subreaper()
    root = Path(tempfile.mkdtemp(prefix="harness-host-reclaim-bench-", dir=workdir))
    home = _home(root / "home", circuit_min_tasks=10**6, **HOST_LEASE)

    def kill_host(worker: subprocess.Popen[bytes]) -> None:
        host = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
        for proc in host:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
    # Killed mid-lease (0.5 s after the claim), as a host dies at any instant.
    samples = _reclaim_samples(root, home, trials, dict(_env(), HARNESS_HOST_ID="hb"),
                               dict(_env(), HARNESS_HOST_ID="ha"), 0.5, kill_host)
    return {"trials": len(samples), **HOST_LEASE,
            "p50_s": round(statistics.median(samples), 4),
            "max_s": round(max(samples), 4), "samples_s": [round(s, 4) for s in samples]}


def _cpu_seconds(proc: psutil.Process) -> float:
    """CPU time (user + system) of ``proc``: /proc/PID/schedstat's nanosecond run time when
    readable (the clock-tick figures of cpu_times() are 10 ms coarse), else cpu_times()."""
    try:
        with open(f"/proc/{proc.pid}/schedstat", "rb") as fh:
            return int(fh.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        t = proc.cpu_times()
        return float(t.user + t.system)


def _process_cpu(proc: psutil.Process) -> float:
    """CPU seconds of all of ``proc``'s threads (schedstat of the process is the main
    thread's only, so the task directories are summed)."""
    try:
        total = 0.0
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{tid}/schedstat", "rb") as fh:
                total += int(fh.read().split()[0]) / 1e9
        return total
    except (OSError, ValueError, IndexError):
        return _cpu_seconds(proc)


def sample_idle(windows: int = 6, window_s: float = 10.0, *, warmup_s: float = 5.0,
                workdir: Path | None = None) -> dict[str, Any]:
    """Run ``harness supervisor run`` (default settings, process actuator: it keeps one
    idle worker through min_workers/warm_pool; nothing is queued) and measure, after
    ``warmup_s``, ``windows`` consecutive windows of ``window_s``.

    Returns ``supervisor_cpu_percent`` and ``worker_cpu_percent`` (lists, one value per
    window, in percent of one core; the worker figure sums every descendant), the whole
    window's ``supervisor_cpu_s``/``worker_cpu_s``/``duration_s``, and the resident set
    sizes ``supervisor_rss_mib``/``worker_rss_mib`` at the end (largest worker)."""
    root = Path(tempfile.mkdtemp(prefix="harness-idle-bench-", dir=workdir))
    home = _home(root / "home", actuator="process")
    sup = _spawn([*HARNESS, "supervisor", "run", "--home", str(home.root)],
                 root / "supervisor.log", _env())
    try:
        _wait(home.health_file.exists, 60, "the supervisor's first pass", 0.02)
        proc = psutil.Process(sup.pid)
        _wait(lambda: bool(proc.children()), 60, "the supervisor's idle worker", 0.02)
        time.sleep(warmup_s)
        kids = proc.children(recursive=True)

        def kids_cpu() -> float:
            used = 0.0
            for k in kids:
                with contextlib.suppress(psutil.Error):
                    used += _process_cpu(k)
            return used

        sup_pct: list[float] = []
        kid_pct: list[float] = []
        sup_first, kid_first, t_first = _process_cpu(proc), kids_cpu(), time.monotonic()
        sup_prev, kid_prev, t_prev = sup_first, kid_first, t_first
        for _ in range(windows):
            time.sleep(window_s)
            sup_now, kid_now, t_now = _process_cpu(proc), kids_cpu(), time.monotonic()
            sup_pct.append(100 * (sup_now - sup_prev) / (t_now - t_prev))
            kid_pct.append(100 * (kid_now - kid_prev) / (t_now - t_prev))
            sup_prev, kid_prev, t_prev = sup_now, kid_now, t_now
        rss_sup = proc.memory_info().rss
        rss_kids = [0]
        for k in kids:
            with contextlib.suppress(psutil.Error):
                rss_kids.append(k.memory_info().rss)
    finally:
        _stop(sup, 60)
        shutil.rmtree(root, ignore_errors=True)
    return {"duration_s": round(t_prev - t_first, 2), "workers": len(kids),
            "supervisor_cpu_s": round(sup_prev - sup_first, 6),
            "worker_cpu_s": round(kid_prev - kid_first, 6),
            "supervisor_cpu_percent": sup_pct, "worker_cpu_percent": kid_pct,
            "supervisor_rss_mib": round(rss_sup / 2**20, 1),
            "worker_rss_mib": round(max(rss_kids) / 2**20, 1),
            "supervisor_tick_s": default_system()["supervisor_tick_s"]}


def measure_idle_cpu(duration_s: float = 60.0, *, warmup_s: float = 5.0,
                     workdir: Path | None = None) -> dict[str, Any]:
    """CPU used by an idle ``harness supervisor run`` (default settings: one idle worker
    kept by min_workers/warm_pool, nothing queued) over ``duration_s``; the worker's own
    CPU is reported apart (see :func:`sample_idle`)."""
    out = sample_idle(1, duration_s, warmup_s=warmup_s, workdir=workdir)
    return {"duration_s": out["duration_s"], "supervisor_cpu_s": out["supervisor_cpu_s"],
            "supervisor_cpu_percent": round(out["supervisor_cpu_percent"][0], 3),
            "workers": out["workers"], "workers_cpu_s": out["worker_cpu_s"],
            "supervisor_rss_mib": out["supervisor_rss_mib"],
            "worker_rss_mib": out["worker_rss_mib"],
            "supervisor_tick_s": out["supervisor_tick_s"]}


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
