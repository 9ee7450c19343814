"""Crash child: enqueue some tasks (acknowledged), then SIGKILL itself at one exact point
of a queue commit or of a compaction.

    crash_at.py HOME POINT

POINT is one of:
- ``append-mid``: the journal write of a commit has put half of its line on disk;
- ``append-unsynced``: the commit's line is written, its fdatasync not done;
- ``compact-before-journal``: a compaction published its durable snapshot and the base
  link, but not the new journal;
- ``compact-mid-journal``: the new journal is written to its temp file, not yet renamed.

Prints ``ack <task_id>`` for each acknowledged task, then ``go`` just before the
operation that dies. Fault injection wraps the os calls of the journal module in this
process only.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from coordination.paths import Home
from coordination.queue import FileQueue
from coordination.queue.file import backend, journal


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    home = Home(Path(sys.argv[1]))
    point = sys.argv[2]
    queue = FileQueue(home)
    for i in range(5):
        task_id = queue.enqueue({"command": ["true"], "description": f"acked {i}"}).task["task_id"]
        print(f"ack {task_id}", flush=True)
    claimed = queue.claim("w-crash")
    print(f"claimed {claimed['task_id'] if claimed else None}", flush=True)
    real_pwrite, real_fdatasync, real_replace = os.pwrite, os.fdatasync, os.replace
    armed = {"on": False}

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if armed["on"] and point == "append-mid" and bytes(data[:7]) == b'{"rev":':
            real_pwrite(fd, bytes(data[:len(data) // 2]), offset)
            die()
        return real_pwrite(fd, data, offset)

    def fdatasync(fd: int) -> None:
        if armed["on"] and point == "append-unsynced":
            die()
        real_fdatasync(fd)

    def replace(src: Any, dst: Any) -> None:
        if armed["on"] and point == "compact-mid-journal" and str(dst) == str(home.queue_journal):
            die()
        real_replace(src, dst)

    # The journal calls os.pwrite etc. through the os module: patch the module itself.
    os.pwrite = pwrite
    os.fdatasync = fdatasync  # type: ignore[assignment]  # our stand-in takes an int fd only
    os.replace = replace  # type: ignore[assignment]  # and plain (src, dst)
    if point == "compact-before-journal":
        real_create = journal.Journal.create

        def create(self: journal.Journal, *args: Any, **kw: Any) -> None:
            if armed["on"]:
                die()
            real_create(self, *args, **kw)
        journal.Journal.create = create  # type: ignore[method-assign]
    print("go", flush=True)
    armed["on"] = True
    if point.startswith("append"):
        queue.enqueue({"command": ["true"], "description": "never acknowledged"})
    else:
        backend.FileQueue.sync(queue, durable=True)
    print("survived", flush=True)  # the test fails on this line
    return 1


if __name__ == "__main__":
    sys.exit(main())
