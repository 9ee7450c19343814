"""``harness init``: a fresh home has every file an operator's first jq reads."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from helpers import needs

from coordination.doctor import check
from coordination.events import emit
from coordination.paths import Home
from coordination.queue import TaskQueue


def init(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemons", "--home", str(root), "init",
                           *args], capture_output=True, text=True, timeout=60, check=False)


def test_init_creates_an_empty_events_file_and_keeps_it(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    done = init(home.root, "--json")
    assert done.returncode == 0, done.stderr
    assert str(home.events_file) in json.loads(done.stdout)["written"]
    st = home.events_file.stat()
    assert st.st_size == 0 and stat.S_ISREG(st.st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(st.st_mode) == 0o644 & ~umask
    event = emit(home, "hello", message="first")
    again = init(home.root, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["written"] == []  # nothing rewritten, nothing lost
    assert json.loads(home.events_file.read_text())["event_id"] == event["event_id"]
    assert check(home).ok


@needs("jq")
def test_events_file_of_a_fresh_home_reads_with_jq(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    assert init(home.root).returncode == 0
    done = subprocess.run(["jq", "-c", "select(.severity == \"error\")",
                           str(home.events_file)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0 and done.stdout == "", done.stderr


def test_init_publishes_an_empty_queue(tmp_path: Path) -> None:
    """The issue's first command, `jq '.tasks | length' coordination/task-queue.json`,
    works on a fresh home: the backend publishes an empty, valid queue."""
    home = Home(tmp_path / "home")
    done = init(home.root)
    assert done.returncode == 0, done.stderr
    assert json.loads(home.queue_file.read_text())["tasks"] == []
    assert TaskQueue(home).live_tasks() == []
    assert check(home).ok
