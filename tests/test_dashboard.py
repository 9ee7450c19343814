"""``harness dashboard``: the --once frame, and the live mode driven through a real pty."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import REPO_ROOT, Known, build_known_home

from coordination.events import emit
from coordination.metrics import take_snapshot
from daemons.cli import cli
from daemons.reporting.dashboard import SPARK_UTF8, gather, render_frame, sparkline

HARNESS = str(Path(sys.executable).with_name("harness"))
SCRIPT = REPO_ROOT / "scripts" / "dashboards" / "metrics-dashboard.sh"


@pytest.fixture
def known(tmp_path: Path) -> Known:
    k = build_known_home(tmp_path)
    for i in range(3):
        take_snapshot(k.home, k.now - 120 + 60 * i)
    return k


def _once(known: Known, *extra: str) -> str:
    result = CliRunner().invoke(cli, ["dashboard", "--home", str(known.home.root), "--once",
                                      "--width", "200", *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _row(frame: str, first_cell: str) -> list[str]:
    """The cells of the table row that starts with ``first_cell`` (tables may sit side by
    side, so the row may start mid-line)."""
    lines = [line.split() for line in frame.splitlines()]
    for cells in lines:
        if cells and cells[0] == first_cell:
            return cells
    for cells in lines:
        if first_cell in cells:
            return cells[cells.index(first_cell):]
    raise AssertionError(f"no row {first_cell!r} in\n{frame}")


def test_once_frame_shows_workers_and_queue_numbers(known: Known) -> None:
    frame = _once(known)
    assert "harness dashboard" in frame
    assert "DEGRADED" in frame and "backpressure: ON" in frame
    assert _row(frame, "medium")[:3] == ["medium", "1", "1"]
    assert _row(frame, "low")[:3] == ["low", "1", "0"]
    assert _row(frame, "high")[:3] == ["high", "0", "0"]
    assert _row(frame, "total")[:3] == ["total", "2", "1"]
    assert "dead letters 1" in frame
    busy = _row(frame, known.busy_worker)
    assert busy[1] == "busy" and busy[2] == known.running and busy[3] == "5s"
    # Its heartbeat is 200 s old (limit 60 s): proven dead, so shown dead, not busy.
    assert _row(frame, known.stalled_worker)[1] == "dead"
    assert "heartbeat" in frame and "3 active, 1 busy, 1 idle, 1 stalled" in frame
    assert "Throughput (3 snapshots)" in frame
    done = _row(frame, "done/min")
    assert all(ch in SPARK_UTF8 for ch in done[1])
    assert "task_completed" in frame  # recent events


def test_once_frame_redacts_secrets(known: Known) -> None:
    emit(known.home, "leak", severity="warning",
         message="Authorization: Bearer abcdefghijklmnop1234 and sk-ant-api03-abcdefghijklmnopqrst")
    frame = _once(known)
    assert "abcdefghijklmnop1234" not in frame and "api03-abcdefghijklmnopqrst" not in frame
    assert "Bearer [redacted]" in frame


def test_once_frame_on_an_empty_home(tmp_path: Path) -> None:
    from helpers import make_home

    home = make_home(tmp_path)
    result = CliRunner().invoke(cli, ["--home", str(home.root), "dashboard", "--once"],
                                catch_exceptions=False)
    assert result.exit_code == 0
    assert "(no active workers)" in result.output and "HEALTHY" in result.output


def test_dashboard_needs_a_terminal_without_once(known: Known) -> None:
    result = CliRunner().invoke(cli, ["dashboard", "--home", str(known.home.root)])
    assert result.exit_code == 2 and "--once" in result.output


def test_render_frame_ascii_fallback(known: Known) -> None:
    from rich.console import Console

    console = Console(width=160, file=open(os.devnull, "w"), record=True)  # noqa: SIM115
    with contextlib.closing(console.file):
        console.print(render_frame(gather(known.home), ascii_only=True))
        text = console.export_text()
    assert not any(ch in text for ch in SPARK_UTF8)


def test_sparkline() -> None:
    assert sparkline([]) == ""
    assert sparkline([0.0, 0.0]) == "▁▁"
    assert sparkline([0.0, 4.0, None, 8.0]) == "▁▅ █"


def test_metrics_dashboard_sh_once_and_help(known: Known) -> None:
    env = dict(os.environ, HARNESS_BIN=HARNESS, HARNESS_HOME=str(known.home.root),
               COLUMNS="200")
    proc = subprocess.run(["bash", str(SCRIPT), "--once", "--width", "200", "--no-color"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert known.busy_worker in proc.stdout and "harness dashboard" in proc.stdout
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and "Usage: metrics-dashboard.sh" in proc.stdout
    proc = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True,
                          text=True, env=env, timeout=30)
    assert proc.returncode == 2 and "unknown option" in proc.stderr


# ---------------------------------------------------------------------------- live (pty)
class PtyChild:
    """A child on a new pty (its controlling terminal), always killed and reaped."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # child: never returns into pytest
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.output = b""
        self.status: int | None = None

    def read_until(self, needle: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {needle!r} within {timeout}s; got {self.output[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], min(remaining, 0.5))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the pty
                    chunk = b""
                if not chunk:
                    assert needle in self.output, f"child exited; got {self.output[-2000:]!r}"
                    return
                self.output += chunk

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.status is None:
            with contextlib.suppress(OSError):
                ready, _, _ = select.select([self.fd], [], [], 0.1)
                if ready:
                    self.output += os.read(self.fd, 65536)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                break
            assert time.monotonic() < deadline, "dashboard did not exit"
        return self.status

    def close(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.status = -9
        with contextlib.suppress(OSError):
            os.close(self.fd)


@contextlib.contextmanager
def live_dashboard(known: Known, *extra: str) -> Iterator[PtyChild]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    env.update(TERM="xterm-256color", LANG="C.UTF-8")
    child = PtyChild([HARNESS, "dashboard", "--home", str(known.home.root), *extra], env)
    try:
        yield child
    finally:
        child.close()


def _modes(fd: int) -> Any:
    return termios.tcgetattr(fd)[3]


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_live_dashboard_quits_and_restores_the_terminal(known: Known, key: bytes) -> None:
    with live_dashboard(known, "--interval", "60") as child:
        child.read_until(b"harness dashboard")
        child.read_until(known.busy_worker.encode())
        assert not _modes(child.fd) & termios.ICANON  # cbreak while running
        child.send(key)
        assert child.wait() == 0
        assert _modes(child.fd) & termios.ICANON and _modes(child.fd) & termios.ECHO
        assert b"\x1b[?1049h" in child.output and b"\x1b[?1049l" in child.output
        assert b"\x1b[?25h" in child.output  # cursor shown again
        assert b"Traceback" not in child.output


def test_live_dashboard_redraws_on_file_changes(known: Known) -> None:
    with live_dashboard(known, "--interval", "60") as child:
        child.read_until(b"harness dashboard")
        child.read_until(b"redraws on file changes")
        start = time.monotonic()
        emit(known.home, "marker_event", message="fresh-marker-1234")
        child.read_until(b"fresh-marker-1234", timeout=20)  # far before the 60 s timer
        assert time.monotonic() - start < 20
        child.send(b"q")
        assert child.wait() == 0


def test_live_dashboard_exits_on_sigterm(known: Known) -> None:
    with live_dashboard(known, "--interval", "60") as child:
        child.read_until(b"harness dashboard")
        os.kill(child.pid, signal.SIGTERM)
        assert child.wait() == 0
        assert _modes(child.fd) & termios.ICANON
