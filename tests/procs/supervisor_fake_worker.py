"""A stand-in worker for supervisor tests: registers a spec, optionally claims a task and
runs it as a child in its own session (like the real worker), then never heartbeats again.

usage: supervisor_fake_worker.py HOME INSTANCE [claim] [idle|busy]
Prints ``ready WORKER_ID TASK_ID TASK_PID`` (``-`` when nothing was claimed), then sleeps
until killed. The task child gets HARNESS_WORKER_ID like a real task.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from coordination import clock
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import new_spec, write_spec


def main() -> None:
    home = Home(Path(sys.argv[1]))
    instance = sys.argv[2]
    claim = len(sys.argv) > 3 and sys.argv[3] == "claim"
    now = clock.now()
    worker_id = clock.new_worker_id(instance, now)
    spec = new_spec(worker_id, instance, now)
    spec["state"] = "idle"
    write_spec(home, spec, create=True)
    task_id, task_pid = "-", "-"
    if claim:
        task = TaskQueue(home).claim(worker_id)
        if task is not None:
            env = dict(os.environ, HARNESS_WORKER_ID=worker_id, HARNESS_TASK_ID=task["task_id"])
            child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=env)
            task_id, task_pid = task["task_id"], str(child.pid)
            spec.update({"state": "busy", "current_task_id": task_id,
                         "task_started_at": clock.iso(clock.now()), "progress": 0,
                         "heartbeat_at": clock.iso(clock.now())})
            write_spec(home, spec)
    print(f"ready {worker_id} {task_id} {task_pid}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
