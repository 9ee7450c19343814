"""The queue's own costs for ``harness bench``: enqueue (single, batch, the CLI's batch),
claim + complete over a backlog, event appends, calls from bash loops (scripts/ and the
CLI) and ``jq`` on the view. Each runs in this process or in children it waits for."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from coordination.events import emit
from coordination.paths import Home
from coordination.queue import open_queue

from .bench_support import REPO, check_exit, child_env, fill, harness_cmd, make_home


def enqueue_singles(root: Path, quick: bool, backlog: int) -> float:
    """ms per single enqueue (Python API) with ``backlog`` queued."""
    with closing(open_queue(make_home(root), shared=False)) as queue:
        fill(queue, backlog)
        n = 100 if quick else 500
        t0 = time.perf_counter()
        for i in range(n):
            queue.enqueue({"description": f"bench {i}", "command": ["true"]})
        return (time.perf_counter() - t0) / n * 1000


def enqueue_batch(root: Path, quick: bool, backlog: int) -> float:
    """Tasks per second of one enqueue_batch with ``backlog`` queued."""
    with closing(open_queue(make_home(root), shared=False)) as queue:
        fill(queue, backlog)
        n = 1000 if quick else 5000
        t0 = time.perf_counter()
        queue.enqueue_batch([{"description": f"b {i}", "command": ["true"]}
                             for i in range(n)])
        return n / (time.perf_counter() - t0)


def enqueue_batch_cli(root: Path, quick: bool) -> float:
    """Tasks per second of one ``harness task add --from-file`` (process start included)."""
    home = make_home(root)
    n = 1000 if quick else 5000
    batch = root.parent / "batch.jsonl"
    batch.write_text("".join(f'{{"description": "f {i}", "command": ["true"]}}\n'
                             for i in range(n)))
    t0 = time.perf_counter()
    proc = subprocess.run([*harness_cmd(), "task", "add", "--from-file", str(batch)],
                          env=child_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          check=False)
    elapsed = time.perf_counter() - t0
    check_exit(proc, "harness task add --from-file")
    return n / elapsed


#: Runs ``"$@"`` N times in each of P parallel loops (``bash -c SCRIPT name N P cmd...``).
_LOOP = r'''
n=$1 p=$2; shift 2
one() { local i; for ((i = 0; i < n; i++)); do "$@" >/dev/null || exit 1; done; }
if ((p == 1)); then one "$@"; exit; fi
pids=(); for ((j = 0; j < p; j++)); do one "$@" & pids+=($!); done
rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=1; done; exit $rc
'''


def _loop_rate(home: Home, argv: list[str], n: int, parallel: int) -> float:
    """Calls per second of ``argv`` from ``parallel`` bash loops of ``n`` calls each."""
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "-c", _LOOP, "bench-loop", str(n), str(parallel), *argv],
                          env=child_env(home), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - t0
    check_exit(proc, Path(argv[0]).name)
    return n * parallel / elapsed


#: Times each of N calls of ``"$@"`` with $EPOCHREALTIME; prints one "start end" per call.
_TIMED_LOOP = r'''
n=$1; shift
for ((i = 0; i < n; i++)); do
    s=$EPOCHREALTIME; "$@" >/dev/null || exit 1; e=$EPOCHREALTIME
    echo "${s/,/.} ${e/,/.}"
done
'''


def emit_event_latency(root: Path, quick: bool) -> list[float]:
    """Milliseconds per scripts/emit-event.sh call, measured around each call in bash
    (fork + exec of the script included, no Python in the loop)."""
    home = make_home(root)
    argv = [_script(EMIT_EVENT[0]), *EMIT_EVENT[1]]
    proc = subprocess.run(["bash", "-c", _TIMED_LOOP, "bench-loop", str(50 if quick else 200),
                           *argv], env=child_env(home), stdin=subprocess.DEVNULL,
                          capture_output=True, check=False)
    check_exit(proc, "emit-event.sh")
    pairs = (line.split() for line in proc.stdout.decode().splitlines())
    return [(float(end) - float(start)) * 1000 for start, end in pairs]


def _script(name: str) -> str:
    path = REPO / "scripts" / name
    if not path.exists():
        raise FileNotFoundError(path)
    return str(path)


CREATE_TASK = ("create-task.sh", ["--description", "x", "--", "true"])
EMIT_EVENT = ("emit-event.sh", ["--type", "bench", "--message", "x"])
TASK_ADD = ["task", "add", "-d", "x", "--", "true"]
EVENTS_EMIT = ["events", "emit", "--type", "bench", "--message", "x"]


def calls(kind: str, n: tuple[int, int], parallel: int = 1,
           backlog: int = 0) -> Callable[[Path, bool], float]:
    """A bench of repeated calls: ``kind`` is a script of scripts/ or ``cli:events`` /
    ``cli:task``; ``n`` is the calls per loop (quick, full)."""
    def run(root: Path, quick: bool) -> float:
        home = make_home(root)
        with closing(open_queue(home, shared=False)) as queue:
            fill(queue, backlog)
        if kind == "cli:task":
            argv = [*harness_cmd(), *TASK_ADD]
        elif kind == "cli:events":
            argv = [*harness_cmd(), *EVENTS_EMIT]
        else:
            script, args = CREATE_TASK if kind == CREATE_TASK[0] else EMIT_EVENT
            argv = [_script(script), *args]
        return _loop_rate(home, argv, n[0] if quick else n[1], parallel)
    return run


# ---------------------------------------------------------------------------- claim, events
def claim_complete(root: Path, quick: bool, backlog: int, *, time_refill: bool = True,
                    **home_overrides: Any) -> float:
    """ms per claim + complete with ``backlog`` queued; each op enqueues a refill so every
    sample sees the same backlog, timed too unless not ``time_refill``."""
    with closing(open_queue(make_home(root, **home_overrides), shared=False)) as queue:
        fill(queue, backlog)
        n = 20 if quick else 100
        spent = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            task = queue.claim("bench-worker")
            if task is None:
                raise RuntimeError("nothing to claim")
            queue.complete(task["task_id"], "bench-worker")
            if not time_refill:
                spent += time.perf_counter() - t0
            # keep the backlog constant so every sample sees the same size
            queue.enqueue({"description": "refill", "command": ["true"], "priority": "low"})
            if time_refill:
                spent += time.perf_counter() - t0
        return spent / n * 1000


def events_python(root: Path, quick: bool) -> float:
    """Events per second appended by ``coordination.events.emit``, one call each."""
    home = make_home(root)
    n = 500 if quick else 2000
    t0 = time.perf_counter()
    for i in range(n):
        emit(home, "bench_event", message=f"event {i}", source="bench")
    return n / (time.perf_counter() - t0)


def jq_length(root: Path, quick: bool) -> list[float]:
    """``jq '.tasks | length' task-queue.json`` with 10,000 queued, per call (ms)."""
    import shutil

    jq = shutil.which("jq")
    if jq is None:
        raise RuntimeError("needs jq (apt install jq)")
    home = make_home(root)
    queue = open_queue(home, shared=False)
    fill(queue, 10_000)
    queue.close()  # publishes the jq view
    samples = []
    for _ in range(5 if quick else 20):
        t0 = time.perf_counter()
        proc = subprocess.run([jq, ".tasks | length", str(home.queue_file)],
                              capture_output=True, check=False)
        samples.append((time.perf_counter() - t0) * 1000)
        if proc.returncode != 0 or proc.stdout.strip() != b"10000":
            raise RuntimeError(f"jq printed {proc.stdout[:40]!r}, exit {proc.returncode}")
    return samples
