"""``harness bench --peers``: the same workload on a peer queue, in the same run.

The peer is huey's ``SqliteHuey`` (a SQLite-backed queue, WAL journal) with its process
consumer: the reference the queue-port issue measured against. ``peer_throughput`` runs
``tasks`` tasks that each spawn ``true`` (as harness's ``true`` tasks do) on ``workers``
consumer processes and times them from the first enqueue to the last result.

huey is optional (the ``bench`` extra: ``pip install -e '.[bench]'``); without it the rows
report an error naming the extra, and everything else still runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_APP = '''
import subprocess
from huey import SqliteHuey

huey = SqliteHuey(filename={db!r}, fsync={fsync!r})


@huey.task()
def run_true():
    subprocess.run(["true"], check=True)
    return 1
'''


def peer_throughput(root: Path, workers: int, tasks: int, *, fsync: bool = False) -> float:
    """Tasks per second of huey SqliteHuey with ``workers`` process workers (raises
    RuntimeError when huey is not installed or its consumer fails)."""
    try:
        import huey  # noqa: F401
    except ImportError:
        raise RuntimeError("huey is not installed (pip install -e '.[bench]')") from None
    root.mkdir(parents=True, exist_ok=True)
    module = f"peerapp_{os.getpid()}_{workers}_{int(fsync)}"
    (root / f"{module}.py").write_text(_APP.format(db=str(root / f"{module}.db"),
                                                   fsync=fsync))
    env = {**os.environ, "PYTHONPATH": str(root)}
    consumer = subprocess.Popen(
        [sys.executable, "-m", "huey.bin.huey_consumer", f"{module}.huey", "-w", str(workers),
         "-k", "process", "-q", "-n", "-C"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    sys.path.insert(0, str(root))
    try:
        app = __import__(module)
        time.sleep(1.0)  # let the consumer's workers start (they poll the database)
        if consumer.poll() is not None:
            err = (consumer.stderr.read() if consumer.stderr else b"").decode()[-300:]
            raise RuntimeError(f"huey consumer exited with {consumer.returncode}: {err}")
        t0 = time.monotonic()
        results = [app.run_true() for _ in range(tasks)]
        deadline = t0 + 600
        for result in results:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or result.get(blocking=True, timeout=remaining,
                                              backoff=1.0, max_delay=0.005) != 1:
                raise RuntimeError(f"huey did not finish {tasks} tasks within 600 s")
        return tasks / (time.monotonic() - t0)
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(module, None)
        if consumer.poll() is None:
            os.killpg(consumer.pid, signal.SIGINT)
            try:
                consumer.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(consumer.pid, signal.SIGKILL)
                consumer.wait()
        if consumer.stderr is not None:
            consumer.stderr.close()
