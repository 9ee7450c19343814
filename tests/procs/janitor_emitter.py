"""Append events in a loop, printing each event_id once its emit succeeded.

Usage: janitor_emitter.py HOME MODE COUNT TAG [PAUSE_S]
MODE: python (coordination.events.emit in this process), script (scripts/emit-event.sh),
cli (python -m daemons events emit). A failed emit prints nothing (it is not counted).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from coordination.errors import HarnessError
from coordination.events import emit
from coordination.paths import Home

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    root, mode, count, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    home = Home(Path(root))
    env = dict(os.environ, HARNESS_HOME=root)
    for i in range(count):
        message = f"{tag}-{i}"
        if mode == "python":
            try:
                event_id = emit(home, "t", message=message, source=tag)["event_id"]
            except HarnessError as exc:
                print(f"emit failed: {exc}", file=sys.stderr)
                continue
        else:
            if mode == "script":
                argv = [str(REPO / "scripts" / "emit-event.sh"), "--type", "t",
                        "--message", message, "--source", tag]
            else:
                argv = [sys.executable, "-m", "daemons", "events", "emit", "--type", "t",
                        "--message", message, "--source", tag]
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stderr.decode(errors="replace"))
                continue
            event_id = done.stdout.decode().strip()
        sys.stdout.write(event_id + "\n")
        sys.stdout.flush()
        if pause:
            time.sleep(pause)


if __name__ == "__main__":
    main()
