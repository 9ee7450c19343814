"""Claimer child: claim + complete in a loop, printing what it did.

    claimer.py HOME --worker-id W [--stop-file F] [--spec] [--drain]

``--spec`` registers a worker spec (pid and start time) first, so a killed claimer is
provably dead, and moves it to completed/ on a clean exit. Prints ``ready``, then
``claimed <task_id> <attempt>`` and ``completed <task_id>`` lines, then ``exit``.

Exit condition: ``--drain``: nothing left to claim and the queue and inbox are empty;
``--stop-file``: the file exists and the queue and inbox are empty. Without either it runs
until killed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from coordination import clock
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import complete_spec, new_spec, write_spec


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("home")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--stop-file")
    parser.add_argument("--spec", action="store_true")
    parser.add_argument("--drain", action="store_true")
    args = parser.parse_args()
    home = Home(Path(args.home))
    queue = TaskQueue(home)
    stop = Path(args.stop_file) if args.stop_file else None
    out = sys.stdout
    if args.spec:
        spec = new_spec(args.worker_id, "test", clock.now())
        spec["state"] = "idle"
        write_spec(home, spec, create=True)
    out.write("ready\n")
    out.flush()
    done = 0
    while True:
        task = queue.claim(args.worker_id)
        if task is None:
            if args.drain or (stop is not None and stop.exists()):
                stats = queue.stats()
                if stats["live"] == 0 and stats["inbox_pending"] == 0:
                    break
            time.sleep(0.002)
            continue
        out.write(f"claimed {task['task_id']} {task['attempts']}\n")
        out.flush()
        queue.complete(task["task_id"], args.worker_id)
        out.write(f"completed {task['task_id']}\n")
        out.flush()
        done += 1
    if args.spec:
        complete_spec(home, args.worker_id, "idle", clock.now(), {"tasks_done": done})
    out.write("exit\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
