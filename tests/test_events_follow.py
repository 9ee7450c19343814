"""`harness events tail -f`: woken by inotify, follows a janitor rotation, stops on a signal.

The follower is a real process reading a pipe; events are appended by this process."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import daemon_env, make_home

from coordination.events import emit
from daemons.janitor.run import run_janitor

pytestmark = pytest.mark.timeout(90)


class Follower:
    def __init__(self, home_root: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemons", "--home", str(home_root), "events", "tail",
             "-f", "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=daemon_env(PYTHONFAULTHANDLER="1"))
        assert self.proc.stdout is not None
        self.buffer = b""

    def lines(self, count: int, timeout: float = 20.0) -> list[dict[str, object]]:
        """The next ``count`` events it prints."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while self.buffer.count(b"\n") < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.proc.send_signal(signal.SIGABRT)
                self.proc.wait()
                err = self.proc.stderr.read() if self.proc.stderr else b""
                raise AssertionError(f"only {self.buffer!r} after {timeout}s; stderr {err!r}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    err = self.proc.stderr.read() if self.proc.stderr else b""
                    raise AssertionError(f"follower exited: {err!r}")
                self.buffer += chunk
        out = []
        for _ in range(count):
            line, self.buffer = self.buffer.split(b"\n", 1)
            out.append(json.loads(line))
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def test_follow_prints_new_events_survives_rotation_and_stops_on_sigint(tmp_path: Path) -> None:
    home = make_home(tmp_path, events_max_lines=10, events_keep_lines=2, durability="none")
    emit(home, "before", message="already there")
    follower = Follower(home.root, "-n", "1")
    try:
        assert [e["type"] for e in follower.lines(1)] == ["before"]
        for i in range(3):
            emit(home, "live", message=f"live {i}")
        assert [e["message"] for e in follower.lines(3)] == ["live 0", "live 1", "live 2"]
        # Over its line limit: the janitor archives all but the newest two lines; what is
        # appended afterwards is printed once, nothing is printed twice.
        for i in range(8):
            emit(home, "fill", message=f"fill {i}")
        assert len(follower.lines(8)) == 8
        summary = run_janitor(home, time.time())
        assert any(r.get("file", "").endswith("dashboard-events.jsonl")
                   for r in summary.get("rotations", [])), summary
        emit(home, "after", message="after the rotation")
        assert [e["type"] for e in follower.lines(2)] == ["janitor_run", "after"]
        started = time.monotonic()
        follower.proc.send_signal(signal.SIGINT)
        assert follower.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
        assert follower.buffer.strip() == b""  # nothing printed twice
    finally:
        follower.close()
