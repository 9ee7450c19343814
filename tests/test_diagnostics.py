"""Diagnostics go through logging with one formatter (daemons/diagnostics.py): syslog
priority prefixes and no timestamp of ours when stderr is the journal, a plain timestamped
line elsewhere."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO_ROOT, daemon_env, make_home, set_system

from daemons.diagnostics import (
    DiagnosticFormatter,
    priority,
    setup_logging,
    stderr_is_journal,
)

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def _record(level: int, message: str, name: str = "harness.worker.w-1") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_priorities_follow_syslog() -> None:
    assert [priority(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING,
                                          logging.ERROR, logging.CRITICAL)] == [7, 6, 4, 3, 2]
    assert priority(logging.WARNING + 1) == 3  # a custom level takes the next standard one
    assert priority(100) == 2


def test_journal_lines_carry_the_priority_and_no_timestamp() -> None:
    fmt = DiagnosticFormatter(journal=True)
    assert fmt.format(_record(logging.WARNING, "could not emit x")) == \
        "<4>harness worker w-1: could not emit x"
    # journald reads one entry per line: every line keeps its priority.
    assert fmt.format(_record(logging.ERROR, "first\nsecond", "harness.supervisor")) == \
        "<3>harness supervisor: first\n<3>second"


def test_plain_lines_are_timestamped_with_the_level() -> None:
    line = DiagnosticFormatter(journal=False).format(_record(logging.ERROR, "boom"))
    assert re.fullmatch(STAMP + r" error harness worker w-1: boom", line), line


def test_journal_detection(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as stream:
        st = os.fstat(stream.fileno())
        mine = f"{st.st_dev}:{st.st_ino}"
        assert stderr_is_journal({"JOURNAL_STREAM": mine}, stream)
        # Inherited, but this stream was redirected elsewhere (a worker's log file).
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}",
                                      "INVOCATION_ID": "abc"}, stream)
        assert stderr_is_journal({"INVOCATION_ID": "abc"}, stream)
        assert not stderr_is_journal({}, stream)
    assert not stderr_is_journal({"JOURNAL_STREAM": "1:2"}, io.StringIO())  # no descriptor


@pytest.fixture
def harness_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("harness")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_setup_installs_one_handler(harness_logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(first, journal=True)
    setup_logging(second, journal=True)  # replaces, never doubles
    logging.getLogger("harness.config").warning("config invalid: %s", "max_workers")
    logging.getLogger("harness.config").debug("not shown at the default level")
    assert first.getvalue() == ""
    assert second.getvalue() == "<4>harness config: config invalid: max_workers\n"


def test_a_daemon_under_systemd_logs_with_priority_prefixes(tmp_path: Path) -> None:
    """A real run: `harness metrics snapshot` on a broken config, its stderr the 'journal'
    (JOURNAL_STREAM names it), says so with <4> and no timestamp; the same run with
    stderr elsewhere prints the plain format."""
    home = make_home(tmp_path, durability="none")
    env = daemon_env(PYTHONPATH=str(REPO_ROOT))
    env.pop("JOURNAL_STREAM", None)
    cmd = [sys.executable, "-m", "daemons", "--home", str(home.root)]
    assert subprocess.run([*cmd, "janitor", "run"], env=env, capture_output=True,
                          timeout=120).returncode == 0  # keeps a last good config
    set_system(home, max_workers="many")
    err = tmp_path / "stderr"
    with open(err, "w") as stream:
        st = os.fstat(stream.fileno())
        journal_env = dict(env, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.run([*cmd, "metrics", "snapshot"], env=journal_env,
                              stdout=subprocess.DEVNULL, stderr=stream, timeout=120)
    assert proc.returncode == 0, err.read_text()
    lines = err.read_text().splitlines()
    assert lines and all(line.startswith("<4>harness metrics: config invalid")
                         for line in lines), lines
    plain = subprocess.run([*cmd, "metrics", "snapshot"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert re.match(STAMP + " warning harness metrics: config invalid", plain.stderr), \
        plain.stderr
