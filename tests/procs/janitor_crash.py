"""Run the janitor over HOME and die abruptly (os._exit, no clean-up) at rotation STEP.

Usage: janitor_crash.py HOME STEP  (a step named in coordination.rotation._checkpoint)
Exit status 9 means it died there; 0 that the step was never reached.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from coordination import rotation
from coordination.paths import Home
from daemons.janitor import run as janitor


def main() -> None:
    home, target = Home(Path(sys.argv[1])), sys.argv[2]

    def crash(step: str, path: Path) -> None:
        if step == target:
            os._exit(9)

    rotation._checkpoint = crash
    janitor.run_janitor(home, time.time())


if __name__ == "__main__":
    main()
