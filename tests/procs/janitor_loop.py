"""Run the janitor over HOME again and again until the file STOP exists; print the number
of completed runs. A run that finds janitor.lock busy (another janitor) is retried.

Usage: janitor_loop.py HOME STOP
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from coordination.errors import LockTimeout
from coordination.paths import Home
from daemons.janitor.run import run_janitor


def main() -> None:
    home, stop = Home(Path(sys.argv[1])), Path(sys.argv[2])
    runs = 0
    while not stop.exists():
        try:
            run_janitor(home, time.time())
            runs += 1
        except LockTimeout:
            pass
        time.sleep(0.005)
    print(f"runs {runs}", flush=True)


if __name__ == "__main__":
    main()
