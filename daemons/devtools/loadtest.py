"""``harness load-test``: real workers, real supervisor autoscaling, a synthetic workload.

A throwaway home gets a config sized for the scenario; ``harness up`` runs in a child
process (supervisor with the process actuator, workers as its children); tasks are
enqueued over a ramp-up; each task sleeps a duration drawn around the scenario's mean and
fails with the scenario's probability on each attempt (the queue retries it as configured).
While it runs, the harness samples active worker specs for peak concurrency; afterwards it
reads history and events to report throughput, latency percentiles, success rate, scale
operations, backpressure activations and stalls, and passes (exit 0) only when:

- success rate >= 80% (final outcomes, retries counted as the system intends),
- health is not unhealthy,
- stalled workers < 10% of the target,
- peak concurrent workers within 20% of the target.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click

from coordination import clock
from coordination.config import init_home
from coordination.errors import Backpressure, CorruptFileError, HarnessError
from coordination.jsonl import iter_jsonl
from coordination.metrics import percentile
from coordination.paths import Home
from coordination.queue import open_queue
from coordination.specs import read_specs
from coordination.store import read_json
from coordination.tasks import HistoryRecord

from ..context import json_option, print_json


@dataclass(frozen=True)
class Scenario:
    name: str
    tasks: int
    workers: int  # target concurrent workers
    mean_duration_s: float = 2.0
    variance: float = 0.3  # durations uniform in mean * [1 - v, 1 + v]
    failure_rate: float = 0.10
    ramp_up_s: float = 2.0


SCENARIOS = {
    "smoke": Scenario("smoke", 10, 5),
    "light": Scenario("light", 50, 8),
    "medium": Scenario("medium", 100, 15),
    "heavy": Scenario("heavy", 200, 25),
    "stress": Scenario("stress", 300, 35, failure_rate=0.15),
}


def _harness_cmd() -> list[str]:
    return [sys.executable, "-m", "daemons"]


def _task_command(duration: float, failure_rate: float) -> list[str]:
    # Fails with the given probability on every attempt; $RANDOM is per process.
    threshold = round(failure_rate * 32768)
    script = (f"sleep {duration:.3f}; "
              f"if [ $RANDOM -lt {threshold} ]; then echo 'synthetic failure' >&2; exit 1; fi")
    return ["bash", "-c", script]


def prepare_home(root: Path, sc: Scenario, time_scale: float) -> Home:
    home = Home(root)
    init_home(
        home, min_workers=1, max_workers=sc.workers, max_concurrent_workers=sc.workers,
        warm_pool=0, scale_cooldown_s=max(0.2, 2.0 * time_scale), scale_up_threshold=1.0,
        scale_down_threshold=0.5, retry_backoff_base_s=0.2 * time_scale,
        retry_backoff_max_s=max(1.0, 2 * time_scale), heartbeat_interval_s=1,
        heartbeat_timeout_s=30, worker_stall_timeout_s=max(30.0, 20 * sc.mean_duration_s
                                                            * time_scale),
        max_queue_depth=max(10, int(sc.tasks * 0.8)), supervisor_tick_s=0.25,
        actuator="process", durability="fsync",
    )
    return home


def run_scenario(sc: Scenario, time_scale: float = 1.0, timeout_s: float | None = None,
                 root: Path | None = None, seed: int | None = None) -> dict[str, Any]:
    """Run one scenario end to end and return the report (see module docstring)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="harness-load-") as tmp:
        home = prepare_home(root or Path(tmp) / "home", sc, time_scale)
        queue = open_queue(home)
        env = dict(os.environ, HARNESS_HOME=str(home.root))
        # One worker at the start; the supervisor scales up to the scenario's fleet
        # (`up --workers N` alone would keep exactly N).
        up = subprocess.Popen([*_harness_cmd(), "--home", str(home.root), "up",
                               "--workers", "1", "--max-workers", str(sc.workers)],
                              env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
        started = time.monotonic()
        mean = sc.mean_duration_s * time_scale
        budget = timeout_s or (30 + sc.tasks * mean * 3 / max(1, sc.workers) * 4
                               + sc.ramp_up_s * time_scale)
        ids: list[str] = []
        backpressure_refusals = 0
        sampler = _PeakSampler(home)
        sampler.start()
        try:
            ramp = sc.ramp_up_s * time_scale
            for i in range(sc.tasks):
                due = started + ramp * i / max(1, sc.tasks)
                while time.monotonic() < due:
                    time.sleep(min(0.05, max(0.0, due - time.monotonic())))
                duration = mean * rng.uniform(1 - sc.variance, 1 + sc.variance)
                request = {"description": f"load {sc.name} {i}",
                           "command": _task_command(duration, sc.failure_rate),
                           "priority": rng.choice(("high", "medium", "medium", "low"))}
                while True:
                    try:
                        ids.append(queue.enqueue(request).task["task_id"])
                        break
                    except Backpressure:  # back off as a well-behaved producer would
                        backpressure_refusals += 1
                        time.sleep(0.1)
            wanted = set(ids)
            deadline = started + budget
            finished: dict[str, HistoryRecord] = {}
            while time.monotonic() < deadline and len(finished) < len(wanted):
                if up.poll() is not None:
                    tail = up.stderr.read().decode()[-2000:] if up.stderr else ""
                    raise HarnessError(f"harness up exited early ({up.returncode}): {tail}")
                finished = _finals(home, wanted)
                time.sleep(0.2)
            elapsed = time.monotonic() - started
        finally:
            sampler.stop()
            _stop(up)
        finished = _finals(home, set(ids))
        return _report(home, sc, time_scale, ids, finished, sampler.peak, elapsed,
                       backpressure_refusals)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class _PeakSampler(threading.Thread):
    """Counts active worker specs every 50 ms in the background, so the peak is seen even
    while the producer is busy enqueueing (sampling between enqueues missed it)."""

    def __init__(self, home: Home) -> None:
        super().__init__(name="peak-sampler", daemon=True)
        self.home = home
        self.peak = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(0.05):
            self._sample()

    def _sample(self) -> None:
        try:
            self.peak = max(self.peak, _active_workers(self.home))
        except (OSError, HarnessError):  # a spec moved away mid-read: next sample
            pass

    def stop(self) -> None:
        self._stopped.set()
        self.join()
        self._sample()


def _active_workers(home: Home) -> int:
    return sum(1 for s in read_specs(home) if s.spec and s.spec.get("state") != "stopped")


def _finals(home: Home, wanted: set[str]) -> dict[str, HistoryRecord]:
    out: dict[str, HistoryRecord] = {}
    records, _ = open_queue(home).history_since(None)
    for record in records:
        if record.get("final") and record.get("task_id") in wanted:
            out[record["task_id"]] = record
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


def _report(home: Home, sc: Scenario, time_scale: float, ids: list[str],
            finished: dict[str, HistoryRecord], peak: int, elapsed: float,
            refusals: int) -> dict[str, Any]:
    latencies = []
    for r in finished.values():
        created_at, done_at = r.get("created_at"), r.get("completed_at")
        if created_at and done_at:
            latencies.append(clock.parse_iso(done_at) - clock.parse_iso(created_at))
    completed = sum(1 for r in finished.values() if r.get("status") == "completed")
    counts: dict[str, int] = {}
    for _, e in iter_jsonl(home.events_file):
        if e:
            counts[e.get("type", "?")] = counts.get(e.get("type", "?"), 0) + 1
    attempts = sum(int(r.get("attempts") or 0) for r in finished.values())
    health = "unknown"
    try:
        health = str(read_json(home.coordination / "health.json").get("health", "unknown"))
    except (FileNotFoundError, CorruptFileError, AttributeError):
        pass
    success_rate = completed / len(ids) if ids else 0.0
    stalls = counts.get("worker_stalled", 0)
    within = abs(peak - sc.workers) <= 0.2 * sc.workers
    checks = {
        "success_rate>=80%": success_rate >= 0.8,
        "health_not_unhealthy": health != "unhealthy",
        "stalls<10%_of_workers": stalls < 0.1 * sc.workers or stalls == 0,
        "peak_concurrency_within_20%": within,
        "all_tasks_finished": len(finished) == len(ids),
    }
    return {
        "scenario": asdict(sc), "time_scale": time_scale, "elapsed_s": round(elapsed, 3),
        "tasks": len(ids), "finished": len(finished), "completed": completed,
        "failed": sum(1 for r in finished.values() if r.get("status") == "failed"),
        "attempts": attempts, "retries": attempts - len(finished),
        "throughput_per_s": round(len(finished) / elapsed, 3) if elapsed else None,
        "latency_avg_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "latency_p95_s": _round(percentile(latencies, 0.95)),
        "latency_p99_s": _round(percentile(latencies, 0.99)),
        "success_rate": round(success_rate, 4), "peak_concurrent_workers": peak,
        "target_workers": sc.workers,
        "scale_operations": counts.get("scale_up", 0) + counts.get("scale_down", 0),
        "scale_up": counts.get("scale_up", 0), "scale_down": counts.get("scale_down", 0),
        "backpressure_activations": counts.get("backpressure_on", 0),
        "backpressure_refusals": refusals, "worker_stalls": stalls,
        "circuit_opens": counts.get("circuit_open", 0), "health": health,
        "checks": checks, "passed": all(checks.values()),
    }


def register(group: click.Group) -> None:
    group.add_command(load_test)


@click.command("load-test")
@click.option("--scenario", type=click.Choice(sorted(SCENARIOS)), default="smoke",
              show_default=True)
@click.option("--time-scale", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Multiplies task durations, ramp-up and cool-downs (0.25 = 4x faster).")
@click.option("--tasks", type=click.IntRange(min=1), help="Override the scenario's count.")
@click.option("--workers", type=click.IntRange(min=1), help="Target concurrent workers.")
@click.option("--mean-duration", type=click.FloatRange(min=0), help="Seconds per task.")
@click.option("--variance", type=click.FloatRange(0, 1), help="Duration spread (0.3 = ±30%).")
@click.option("--failure-rate", type=click.FloatRange(0, 1), help="Per-attempt failure odds.")
@click.option("--ramp-up", type=click.FloatRange(min=0), help="Seconds to enqueue over.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), help="Give up after.")
@click.option("--seed", type=int, help="Random seed for durations and priorities.")
@json_option
def load_test(scenario: str, time_scale: float, tasks: int | None, workers: int | None,
              mean_duration: float | None, variance: float | None,
              failure_rate: float | None, ramp_up: float | None, timeout_s: float | None,
              seed: int | None, as_json: bool) -> None:
    """Run a workload through real workers and the autoscaling supervisor.

    \b
    Scenarios (tasks / target workers): smoke 10/5, light 50/8, medium 100/15,
    heavy 200/25, stress 300/35 (15% failures; others 10%).
    Exit 0 when: success >= 80%, health not unhealthy, stalls < 10% of workers,
    peak concurrency within 20% of the target; exit 1 otherwise.
    """
    sc = SCENARIOS[scenario]
    overrides: dict[str, Any] = {k: v for k, v in {"tasks": tasks, "workers": workers,
                                   "mean_duration_s": mean_duration, "variance": variance,
                                   "failure_rate": failure_rate, "ramp_up_s": ramp_up}.items()
                 if v is not None}
    sc = replace(sc, **overrides, name=scenario if not overrides else f"{scenario}+custom")
    report = run_scenario(sc, time_scale=time_scale, timeout_s=timeout_s, seed=seed)
    if as_json:
        print_json(report)
    else:
        _print_report(report)
    sys.exit(0 if report["passed"] else 1)


def _print_report(r: dict[str, Any]) -> None:
    sc = r["scenario"]
    click.echo(f"scenario {sc['name']}: {r['tasks']} tasks, target {sc['workers']} workers, "
               f"time scale {r['time_scale']}")
    rows = [
        ("elapsed", f"{r['elapsed_s']} s"), ("throughput", f"{r['throughput_per_s']} tasks/s"),
        ("latency avg / p95 / p99", f"{r['latency_avg_s']} / {r['latency_p95_s']} / "
                                    f"{r['latency_p99_s']} s"),
        ("success rate", f"{r['success_rate']:.1%} ({r['completed']} completed, "
                         f"{r['failed']} failed, {r['retries']} retries)"),
        ("peak concurrent workers", f"{r['peak_concurrent_workers']} (target "
                                    f"{r['target_workers']})"),
        ("scale operations", f"{r['scale_operations']} (up {r['scale_up']}, down "
                             f"{r['scale_down']})"),
        ("backpressure", f"{r['backpressure_activations']} activations, "
                         f"{r['backpressure_refusals']} refused enqueues"),
        ("worker stalls", str(r["worker_stalls"])),
        ("circuit breaker opens", str(r["circuit_opens"])), ("health", r["health"]),
    ]
    for name, value in rows:
        click.echo(f"  {name:<24} {value}")
    for name, ok in r["checks"].items():
        click.echo(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    click.echo("summary: " + ("PASSED" if r["passed"] else "FAILED"))
