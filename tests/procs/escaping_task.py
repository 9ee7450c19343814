"""A task whose children try every way out of its process group, then waits to be stopped.

argv: PIDFILE. Starts four ``sleep 300`` processes that leave the task's process group:
a child that calls setsid(2), a daemon by double fork (setsid in between; the middle
process exits, so the daemon is re-parented), a child started with start_new_session, and
one moved to a process group of its own with setpgid(2). Writes their pids as JSON to
PIDFILE (by rename) once all four run, then sleeps until it is killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SLEEP = ["sleep", "300"]


def setsid_child() -> int:
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.execvp(SLEEP[0], SLEEP)
    return pid


def double_fork_daemon() -> int:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        grandchild = os.fork()
        if grandchild == 0:
            os.close(w)
            os.execvp(SLEEP[0], SLEEP)
        os.write(w, str(grandchild).encode())
        os._exit(0)
    os.close(w)
    daemon = int(os.read(r, 64))
    os.close(r)
    os.waitpid(pid, 0)  # the middle process is gone: the daemon is an orphan now
    return daemon


def main() -> None:
    pidfile = sys.argv[1]
    pids = {
        "setsid": setsid_child(),
        "double_fork": double_fork_daemon(),
        "new_session": subprocess.Popen(SLEEP, start_new_session=True).pid,
        "setpgid": subprocess.Popen(SLEEP, process_group=0).pid,
    }
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(pids, fh)
    os.replace(tmp, pidfile)
    print("escapees started", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
