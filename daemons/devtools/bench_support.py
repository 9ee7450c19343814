"""What the bench modules share: throwaway homes, the environment and command of a child
``harness``, and a check of its exit status (daemons/devtools/bench.py runs them all)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from coordination.config import init_home
from coordination.paths import Home
from coordination.queue import QueueBackend

REPO = Path(__file__).resolve().parents[2]

#: One run's figure for a row: a single value, or samples (latencies, windows).
Figure = float | list[float]


def make_home(root: Path, **overrides: Any) -> Home:
    """An initialised home at ``root`` with no backpressure limit, and ``overrides``."""
    home = Home(root)
    init_home(home, **{"max_queue_depth": 10**9, **overrides})
    return home


def child_env(home: Home | None = None) -> dict[str, str]:
    """This environment without systemd's and harness's own variables, with
    ``HARNESS_HOME`` set to ``home`` if given."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                        "HARNESS_HOME", "HARNESS_INSTANCE")}
    if home is not None:
        env["HARNESS_HOME"] = str(home.root)
    return env


def harness_cmd() -> list[str]:
    """The ``harness`` command beside this Python (``python -m daemons`` without one)."""
    exe = Path(sys.executable).with_name("harness")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "daemons"]


def check_exit(proc: subprocess.CompletedProcess[bytes], what: str) -> None:
    """RuntimeError naming ``what`` and the end of its stderr unless it exited with 0."""
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{what} exited with {proc.returncode}: {' | '.join(tail)}")


def fill(queue: QueueBackend, n: int) -> None:
    """Queue ``n`` low-priority ``true`` tasks (a backlog), 5,000 per commit."""
    for start in range(0, n, 5000):
        queue.enqueue_batch([{"description": f"backlog {i}", "command": ["true"],
                              "priority": "low"} for i in range(start, min(n, start + 5000))])
