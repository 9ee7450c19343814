"""``harness bench``: measure the coordination layer on a throwaway home.

Each benchmark runs ``repeat`` times on a fresh home; the table shows the median with min
and max. Figures are printed, never asserted: tests only check that the command runs.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from coordination.config import DEFAULT_WORKER_TYPES, default_system
from coordination.events import emit
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.store import replace_json

from .context import json_option, print_json

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    name: str
    unit: str  # what one sample measures, e.g. "ms/op" or "ops/s"
    run: Callable[[Path, bool], float]
    doc: str


def make_home(root: Path, **overrides: Any) -> Home:
    home = Home(root)
    home.create()
    cfg = default_system()
    cfg.update(max_queue_depth=10**9, **overrides)
    replace_json(home.system_config, cfg, pretty=True)
    replace_json(home.worker_types_config, DEFAULT_WORKER_TYPES, pretty=True)
    return home


def _fill(queue: TaskQueue, n: int) -> None:
    for start in range(0, n, 5000):
        queue.enqueue_batch([{"description": f"backlog {i}", "command": ["true"],
                              "priority": "low"} for i in range(start, min(n, start + 5000))])


def _enqueue_singles(root: Path, quick: bool, backlog: int) -> float:
    home = make_home(root)
    queue = TaskQueue(home)
    _fill(queue, backlog)
    n = 100 if quick else 500
    t0 = time.perf_counter()
    for i in range(n):
        queue.enqueue({"description": f"bench {i}", "command": ["true"]})
    return (time.perf_counter() - t0) / n * 1000


def _enqueue_batch(root: Path, quick: bool) -> float:
    queue = TaskQueue(make_home(root))
    n = 1000 if quick else 5000
    t0 = time.perf_counter()
    queue.enqueue_batch([{"description": f"b {i}", "command": ["true"]} for i in range(n)])
    return n / (time.perf_counter() - t0)


def _claim_complete(root: Path, quick: bool, backlog: int) -> float:
    home = make_home(root)
    queue = TaskQueue(home)
    _fill(queue, backlog)
    n = 20 if quick else 100
    t0 = time.perf_counter()
    for _ in range(n):
        task = queue.claim("bench-worker")
        assert task is not None
        queue.complete(task["task_id"], "bench-worker")
        # keep the backlog constant so every sample sees the same size
        queue.enqueue({"description": "refill", "command": ["true"], "priority": "low"})
    return (time.perf_counter() - t0) / n * 1000


def _harness_cmd() -> list[str]:
    exe = shutil.which("harness")
    return [exe] if exe else [sys.executable, "-m", "daemons"]


def _cli_enqueue(root: Path, quick: bool) -> float:
    home = make_home(root)
    n = 10 if quick else 30
    env = dict(os.environ, HARNESS_HOME=str(home.root))
    t0 = time.perf_counter()
    for i in range(n):
        subprocess.run([*_harness_cmd(), "task", "add", "-d", f"cli {i}", "--", "true"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    return n / (time.perf_counter() - t0)


def _script_rate(script: str, args: list[str], quick: bool, root: Path) -> float:
    home = make_home(root)
    path = REPO / "scripts" / script
    if not path.exists():
        raise FileNotFoundError(path)
    n = 50 if quick else 200
    env = dict(os.environ, HARNESS_HOME=str(home.root))
    loop = f'for i in $(seq {n}); do "$0" "$@" >/dev/null; done'
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", loop, str(path), *args], env=env, check=True)
    return n / (time.perf_counter() - t0)


def _events_python(root: Path, quick: bool) -> float:
    home = make_home(root)
    n = 500 if quick else 2000
    t0 = time.perf_counter()
    for i in range(n):
        emit(home, "bench_event", message=f"event {i}", source="bench")
    return n / (time.perf_counter() - t0)


BENCHES: tuple[Bench, ...] = (
    Bench("enqueue_empty", "ms/op", lambda r, q: _enqueue_singles(r, q, 0),
          "single enqueue (Python API) into an empty queue"),
    Bench("enqueue_backlog_2000", "ms/op", lambda r, q: _enqueue_singles(r, q, 2000),
          "single enqueue into 2,000 queued tasks"),
    Bench("enqueue_backlog_10000", "ms/op", lambda r, q: _enqueue_singles(r, q, 10000),
          "single enqueue into 10,000 queued tasks"),
    Bench("enqueue_batch", "tasks/s", _enqueue_batch, "one batch (task add --from-file path)"),
    Bench("enqueue_cli", "tasks/s", _cli_enqueue, "`harness task add`, one process per task"),
    Bench("enqueue_create_task_sh", "tasks/s",
          lambda r, q: _script_rate("create-task.sh", ["--description", "x", "--", "true"], q,
                                    r),
          "scripts/create-task.sh, one call per task (inbox only)"),
    Bench("claim_complete_100", "ms/op", lambda r, q: _claim_complete(r, q, 100),
          "claim + complete with 100 live tasks"),
    Bench("claim_complete_1000", "ms/op", lambda r, q: _claim_complete(r, q, 1000),
          "claim + complete with 1,000 live tasks"),
    Bench("claim_complete_10000", "ms/op", lambda r, q: _claim_complete(r, q, 10000),
          "claim + complete with 10,000 live tasks"),
    Bench("events_python", "events/s", _events_python, "coordination.events.emit"),
    Bench("events_emit_event_sh", "events/s",
          lambda r, q: _script_rate("emit-event.sh", ["--type", "bench", "--message", "x"], q,
                                    r),
          "scripts/emit-event.sh, one call per event"),
)


def run_benches(quick: bool, only: tuple[str, ...], repeat: int | None) -> list[dict[str, Any]]:
    selected = [b for b in BENCHES if not only or any(o in b.name for o in only)]
    repeats = repeat or (3 if quick else 5)
    rows = []
    for bench in selected:
        samples: list[float] = []
        error = None
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
                try:
                    samples.append(bench.run(Path(tmp) / "home", quick))
                except (FileNotFoundError, subprocess.CalledProcessError) as exc:
                    error = str(exc)
                    break
        row: dict[str, Any] = {"name": bench.name, "unit": bench.unit, "doc": bench.doc,
                               "runs": len(samples)}
        if samples:
            row.update(median=statistics.median(samples), min=min(samples), max=max(samples))
        if error:
            row["error"] = error
        rows.append(row)
    return rows


def register(group: click.Group) -> None:
    group.add_command(bench)


@click.command()
@click.option("--quick", is_flag=True, help="Fewer operations and 3 repeats (for CI).")
@click.option("--only", multiple=True, help="Run benchmarks whose name contains this.")
@click.option("--repeat", type=click.IntRange(1, 50), help="Repeats per benchmark.")
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks and exit.")
@json_option
def bench(quick: bool, only: tuple[str, ...], repeat: int | None, list_only: bool,
          as_json: bool) -> None:
    """Measure enqueue, claim, event and dispatch costs on a throwaway home.

    Each figure is the median of repeated runs, with min and max. Nothing is asserted.
    """
    if list_only:
        for b in BENCHES:
            click.echo(f"{b.name:<24} {b.unit:<9} {b.doc}")
        return
    rows = run_benches(quick, only, repeat)
    if as_json:
        print_json(rows)
        return
    click.echo(f"{'benchmark':<24} {'median':>10} {'min':>10} {'max':>10}  unit")
    for r in rows:
        if "median" in r:
            click.echo(f"{r['name']:<24} {r['median']:>10.3f} {r['min']:>10.3f} "
                       f"{r['max']:>10.3f}  {r['unit']}")
        else:
            click.echo(f"{r['name']:<24} {'-':>10} {'-':>10} {'-':>10}  {r.get('error')}")
