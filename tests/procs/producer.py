"""Producer child: enqueue tasks through TaskQueue.enqueue, printing each acknowledged id.

    producer.py HOME --prefix P [--count N] [--seed S] [--via-inbox]

Prints ``ready`` once set up, then ``ack <task_id>`` (one write per line, flushed) only
after enqueue returned, and ``done`` at the end. ``--count 0`` enqueues until killed.
Backpressure is waited out, never fatal. ``--via-inbox`` hands every request to the inbox
without the queue lock (``submit(durable=True)``, create-task.sh's contract: acknowledged
once the inbox file is durable; the next queue operation of any process admits it).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from coordination.errors import Backpressure
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.tasks import PRIORITIES


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("home")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--via-inbox", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    queue = TaskQueue(Home(Path(args.home)))
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    i = 0
    while args.count == 0 or i < args.count:
        request = {"command": ["true"], "description": f"{args.prefix}-{i}",
                   "priority": rng.choice(PRIORITIES), "correlation_id": args.prefix}
        try:
            if args.via_inbox:
                task_id = queue.submit(request, durable=True)
            else:
                task_id = queue.enqueue(request).task["task_id"]
        except Backpressure:
            time.sleep(0.01)
            continue
        out.write(f"ack {task_id}\n")
        out.flush()
        i += 1
    out.write("done\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
