"""The host's floors: what this machine allows any Python, file-based, durable queue, with
no queue logic at all, measured the way the dispatch and throughput benches measure
harness (``harness bench`` rows ``dispatch_floor`` and ``throughput_floor_2w_600``).

A floor does the file-system and process work harness's contract asks for each task, and
nothing else:

- **dispatch**: the producer appends one line to a journal and fdatasyncs it; an idle
  worker, asleep in epoll on an inotify watch of that journal, wakes, makes the task's
  result folder and log file and starts ``date +%s.%N`` (``subprocess.Popen``, its own
  process group, output to the log). The figure is the enqueue call to the date's clock
  reading, as in ``dispatch_latency``.
- **throughput**: worker processes take tasks under one flock(2): per task, one append
  carrying the previous task's completion and this task's claim, fdatasync'd; then the
  result folder, the log file, ``true`` and its exit status. No JSON is parsed, and no
  event, history line, heartbeat or spec is written.

A target below its floor cannot be met on this host by work on harness: these rows put
the host's limits beside harness's figures in every run (docs/performance.md, "Floors").
Each floor runs its workers as fresh ``python -c`` processes, so they never inherit the
bench process's state.
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from coordination.inotify import MODIFY, INotify, pending_events

_TRUE = ("true",)
_DATE = ("date", "+%s.%N")


def _spawn_task(argv: tuple[str, ...], folder: Path, task_id: str) -> int:
    """Make the task's result folder and log file, run ``argv`` there and return its exit
    status: the per-task work a worker cannot skip."""
    result = folder / "results" / task_id
    os.mkdir(result, 0o700)
    log = os.open(folder / "logs" / f"{task_id}.log",
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=result, process_group=0)
    finally:
        os.close(log)
    return proc.wait()


def _prepare(folder: Path) -> None:
    for sub in ("results", "logs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "journal").touch()


def _worker(code: str, folder: Path, *args: object) -> subprocess.Popen[bytes]:
    call = f"from daemons.devtools.floors import {code}; {code}({str(folder)!r}, " \
           f"{', '.join(repr(a) for a in args)})"
    return subprocess.Popen([sys.executable, "-c", call], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)


def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def dispatch_worker(folder: str, samples: int) -> None:
    """The idle worker of :func:`dispatch_floor` (runs in its own process): for each line
    appended to the journal, run ``date`` for it, then write the task id to stdout."""
    where = Path(folder)
    journal = os.open(where / "journal", os.O_RDONLY | os.O_CLOEXEC)
    offset = 0
    with INotify() as inotify:
        inotify.add_watch(where / "journal", MODIFY)
        poller = select.epoll()
        poller.register(inotify.fileno(), select.EPOLLIN)
        print("ready", flush=True)
        for _ in range(samples):
            line = b""
            while not line.endswith(b"\n"):
                poller.poll()
                pending_events(inotify)
                chunk = os.pread(journal, 4096, offset)
                offset += len(chunk)
                line += chunk
            task_id = line.decode().strip()
            _spawn_task(_DATE, where, task_id)
            print(task_id, flush=True)


def dispatch_floor(root: Path, samples: int) -> list[float]:
    """Milliseconds from the enqueue call (append + fdatasync of a journal line) to the
    ``date`` clock reading of the task it started on an idle worker, one per sample."""
    folder = root / "floor-dispatch"
    _prepare(folder)
    worker = _worker("dispatch_worker", folder, samples)
    assert worker.stdout is not None
    out: list[float] = []
    try:
        if worker.stdout.readline() != b"ready\n":
            raise RuntimeError("the floor's worker did not start")
        journal = os.open(folder / "journal", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            for i in range(samples):
                time.sleep(0.007)  # idle, as dispatch_latency's worker is
                task_id = f"t-{i:06d}"
                t0 = time.time()
                os.write(journal, f"{task_id}\n".encode())
                os.fdatasync(journal)
                if worker.stdout.readline().strip() != task_id.encode():
                    raise RuntimeError("the floor's worker lost a task")
                started = (folder / "logs" / f"{task_id}.log").read_text().split()[0]
                out.append((float(started) - t0) * 1000)
        finally:
            os.close(journal)
    finally:
        _reap([worker])
    return out


def throughput_worker(folder: str, tasks: int) -> None:
    """One worker of :func:`throughput_floor` (runs in its own process): waits for a line
    on stdin, then takes tasks until ``tasks`` were taken by all, and says ``done``."""
    where = Path(folder)
    journal = os.open(where / "journal", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    counter = os.open(where / "counter", os.O_RDWR | os.O_CLOEXEC)
    lock = os.open(where / "lock", os.O_RDWR | os.O_CLOEXEC)
    print("ready", flush=True)
    sys.stdin.readline()
    done = b""
    while True:
        fcntl.flock(lock, fcntl.LOCK_EX)
        taken = int(os.pread(counter, 16, 0))
        if taken < tasks:
            os.pwrite(counter, b"%-15d" % (taken + 1), 0)
            task_id = f"t-{taken:06d}"
            record = done + f'{{"op":"claim","task_id":"{task_id}"}}\n'.encode()
        else:
            record = done
        if record:
            os.write(journal, record)
            os.fdatasync(journal)
        fcntl.flock(lock, fcntl.LOCK_UN)
        if taken >= tasks:
            break
        status = _spawn_task(_TRUE, where, task_id)
        done = f'{{"op":"complete","task_id":"{task_id}","exit_code":{status}}}\n'.encode()
    print("done", flush=True)


def throughput_floor(root: Path, workers: int, tasks: int) -> float:
    """Tasks per second of ``true`` on ``workers`` floor workers (see the module doc)."""
    folder = root / f"floor-throughput-{workers}w"
    _prepare(folder)
    (folder / "counter").write_bytes(b"%-15d" % 0)
    (folder / "lock").touch()
    procs = [_worker("throughput_worker", folder, tasks) for _ in range(workers)]
    try:
        for proc in procs:  # the clock starts once every interpreter is up
            assert proc.stdout is not None
            if proc.stdout.readline() != b"ready\n":
                raise RuntimeError("a floor worker did not start")
        t0 = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline() != b"done\n":
                raise RuntimeError("a floor worker failed")
        elapsed = time.monotonic() - t0
    finally:
        _reap(procs)
    completed = (folder / "journal").read_bytes().count(b'"op":"complete"')
    if completed != tasks:
        raise RuntimeError(f"the floor completed {completed} of {tasks} tasks")
    return tasks / elapsed
