"""A large home for measuring ``harness status`` and ``harness check`` (docs/observability.md).

``make_large_home(root)`` writes a home with 10,000 history records (one a minute over the
last week), 200,000 event lines, 50 active worker specs, 500 live tasks and a day of
metrics snapshots; ``bench_status_check(root)`` times cold ``harness`` processes on it.
Figures are reported, never asserted::

    .venv/bin/python -m daemons.devtools.observability_bench /tmp/obs-bench --repeat 5
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from coordination import clock
from coordination.config import init_home
from coordination.metrics import take_snapshot
from coordination.paths import Home
from coordination.queue import open_queue
from coordination.specs import new_spec
from coordination.store import append_bytes, replace_json

EVENT_TYPES = (("task_enqueued", "info"), ("task_claimed", "info"),
               ("task_completed", "info"), ("task_retry_scheduled", "warning"),
               ("worker_heartbeat_late", "warning"), ("task_failed", "error"))


def make_large_home(root: Path, *, history: int = 10_000, events: int = 200_000,
                    workers: int = 50, live: int = 500, snapshots: int = 1440,
                    now: float | None = None, seed: int = 7) -> Home:
    """Write the benchmark home at ``root`` (which must not be an initialised home yet)."""
    rng = random.Random(seed)
    ts = time.time() if now is None else now
    home = Home(Path(root))
    init_home(home, max_queue_depth=10**6, durability="none")
    queue = open_queue(home, shared=False)
    queue.enqueue_batch([{"command": ["./agent.sh", "--repo", f"repo-{i % 40}"],
                          "description": f"fix issue #{i}", "priority":
                          ("critical", "high", "medium", "low")[i % 4]}
                         for i in range(live)], now=ts - 3600)
    running = []
    for i in range(min(workers // 2, live)):
        task = queue.claim(f"worker-bench-{i:03d}", now=ts - 300 + i)
        if task is not None:
            running.append(task)
    for i in range(workers):
        worker_id = f"worker-bench-{i:03d}"
        spec = new_spec(worker_id, f"{i}", ts - 7200, pid=1)
        spec.update({"hostname": "bench-host", "heartbeat_at": clock.iso(ts - rng.uniform(0, 10))})
        if i < len(running):
            spec.update({"state": "busy", "current_task_id": running[i]["task_id"],
                         "task_started_at": running[i]["started_at"],
                         "progress": rng.randint(1, 99)})
        else:
            spec.update({"state": "idle"})
        replace_json(home.specs_active / f"{worker_id}.json", spec, "none", pretty=True)
    template = dict(running[0] if running else queue.live_tasks()[0])
    lines = []
    task_ids = []
    for i in range(history):
        end = ts - (history - i) * 60.0
        ok = rng.random() > 0.1
        record = dict(template, task_id=f"t-{clock.compact(end)}-{i:010x}",
                      created_at=clock.iso(end - 400), started_at=clock.iso(end - 300),
                      completed_at=clock.iso(end) if ok else None, updated_at=clock.iso(end),
                      status="completed" if ok else "failed", attempts=1,
                      worker_id=f"worker-bench-{i % workers:03d}",
                      last_error=None if ok else "exit 1: tests failed",
                      exit_code=0 if ok else 1)
        record.update(final=ok, outcome="completed" if ok else "failed",
                      recorded_at=clock.iso(end),
                      result={"tokens_used": rng.randint(1000, 90_000), "summary": "done"})
        task_ids.append(record["task_id"])
        lines.append(orjson.dumps(record) + b"\n")
    append_bytes(home.history_file, b"".join(lines), "none")
    chunk: list[bytes] = []
    for i in range(events):
        at = ts - (events - i) * (7 * 86400 / events)
        kind, severity = EVENT_TYPES[0 if rng.random() < 0.5 else rng.randrange(6)]
        chunk.append(orjson.dumps({
            "event_id": f"ev-{clock.compact(at)}-{i:012x}", "timestamp": clock.iso(at),
            "type": kind, "severity": severity, "source": "worker-bench",
            "message": f"{kind.replace('_', ' ')} on attempt 1", "task_id": rng.choice(task_ids),
            "worker_id": f"worker-bench-{i % workers:03d}", "correlation_id": None,
            "data": {"attempt": 1}}) + b"\n")
        if len(chunk) == 20_000:
            append_bytes(home.events_file, b"".join(chunk), "none")
            chunk = []
    if chunk:
        append_bytes(home.events_file, b"".join(chunk), "none")
    if snapshots:
        first = take_snapshot(home, ts - 1)
        out = []
        for i in range(snapshots - 1):
            snap = copy.deepcopy(first)
            snap["timestamp"] = clock.iso(ts - (snapshots - i) * 60.0)
            snap["queue"]["queued"] = rng.randint(300, 600)
            snap["throughput"]["completed_per_min_1m"] = float(rng.randint(0, 12))
            out.append(orjson.dumps(snap) + b"\n")
        append_bytes(home.metrics_file, b"".join(out), "none")
    queue.close()  # publishes the jq view; no timer of ours outlives the build
    return home


def _time(argv: list[str], env: dict[str, str], repeat: int) -> dict[str, Any]:
    """Wall time and CPU time (user + system, from the children's rusage) per run: on a
    busy machine the CPU time is the steadier figure."""
    samples, cpu = [], []
    codes = set()
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env, timeout=120, check=False)
        samples.append((time.perf_counter() - start) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
        codes.add(proc.returncode)
    return {"median_ms": round(statistics.median(samples), 1),
            "min_ms": round(min(samples), 1), "max_ms": round(max(samples), 1),
            "cpu_median_ms": round(statistics.median(cpu), 1),
            "runs": repeat, "exit_codes": sorted(codes)}


def bench_status_check(root: Path, *, repeat: int = 5,
                       bytecode_cache: bool = True) -> dict[str, Any]:
    """Wall time of cold ``harness status --json``, ``harness check`` and, for reference,
    ``harness --help`` (interpreter and CLI start-up alone) on the large home under
    ``root/home`` (made first when absent).

    ``bytecode_cache`` True points PYTHONPYCACHEPREFIX at ``root/pycache`` (filled by the
    warm-up run, so nothing is written beside the sources): the figure of an installed
    harness. False sets PYTHONDONTWRITEBYTECODE=1: modules without a bytecode file beside
    them (an editable checkout's own) are compiled again by every run."""
    root = Path(root)
    home = Home(root / "home")
    made = 0.0
    if not home.system_config.exists():
        start = time.perf_counter()
        make_large_home(home.root)
        made = time.perf_counter() - start
    harness = str(Path(sys.executable).with_name("harness"))
    env = dict(os.environ)
    env.pop("HARNESS_HOME", None)
    env.pop("PYTHONPYCACHEPREFIX", None)
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    commands = {
        "harness --help": [harness, "--help"],
        "harness status --json": [harness, "--home", str(home.root), "status", "--json"],
        "harness check": [harness, "--home", str(home.root), "check"],
    }
    for argv in commands.values():  # warm the page cache (and the bytecode cache)
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=env, timeout=120, check=False)
    sizes = {p.name: p.stat().st_size for p in (home.history_file, home.events_file,
                                               home.metrics_file, home.queue_file)}
    return {"home": str(home.root), "made_in_s": round(made, 2), "file_bytes": sizes,
            "bytecode_cache": bytecode_cache,
            "results": {name: _time(argv, env, repeat) for name, argv in commands.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("root", type=Path, help="Directory for the benchmark home.")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    out = [bench_status_check(args.root, repeat=args.repeat, bytecode_cache=cache)
           for cache in (False, True)]
    sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    main()
