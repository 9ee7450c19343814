"""Diagnostics: the one logging set-up of every harness process.

Code reports what went wrong beside its work (an event it could not append, a spec it could
not complete, a config it could not read) through ``logging.getLogger("harness.PART")``;
``harness.worker.ID`` reads ``harness worker ID`` in the output. Results of commands are
not diagnostics: they stay ``click.echo`` on stdout (or stderr for a command's own
errors). :func:`setup_logging`, called once by the CLI's ``main``, installs the one handler
on stderr with :class:`DiagnosticFormatter`:

- under systemd, when stderr is the journal (``JOURNAL_STREAM`` names stderr's device and
  inode, as systemd documents; or, without ``JOURNAL_STREAM``, ``INVOCATION_ID`` is set),
  each line gets the syslog priority prefix journald reads (``<4>`` for a warning, ``<3>``
  for an error) and no timestamp of ours: the journal stamps every entry itself;
- elsewhere a plain line: a UTC timestamp in the contract's format, the level and the
  message.

Only the ``harness`` logger is configured (it does not propagate), so the logging of a
library the process hosts (uvicorn under ``harness web``) keeps its own set-up.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

from coordination import clock

ROOT = "harness"
#: syslog priorities (sd-daemon(3)) of the logging levels.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a custom level takes the next standard one
    at or above it)."""
    for level in sorted(PRIORITIES):
        if levelno <= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.CRITICAL]


def stderr_is_journal(environ: Mapping[str, str] | None = None,
                      stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) goes to journald: ``JOURNAL_STREAM`` (``DEV:INO``)
    is its device and inode; a stream redirected elsewhere (a worker's log file) is not,
    though it inherited the variable. Without ``JOURNAL_STREAM``, ``INVOCATION_ID`` (set by
    systemd for every unit) decides."""
    env = os.environ if environ is None else environ
    journal = env.get("JOURNAL_STREAM")
    if not journal:
        return bool(env.get("INVOCATION_ID"))
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return journal == f"{st.st_dev}:{st.st_ino}"


class DiagnosticFormatter(logging.Formatter):
    """``<4>harness worker w-1: message`` for the journal; ``2026-01-01T12:00:00.000Z
    warning harness worker w-1: message`` elsewhere. Every line of a multi-line message (a
    traceback) carries the prefix, since journald reads one entry per line."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name.replace('.', ' ')}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:
            prefix = f"<{priority(record.levelno)}>"
        else:
            prefix = f"{clock.iso(record.created)} {record.levelname.lower()} "
        return "\n".join(prefix + line for line in text.split("\n"))


class _Handler(logging.StreamHandler[TextIO]):
    """The handler :func:`setup_logging` installs (so a second call can find it)."""


def setup_logging(stream: TextIO | None = None, *, journal: bool | None = None,
                  level: int = logging.INFO) -> logging.Handler:
    """Install the one stderr handler on the ``harness`` logger (again: replace it, so a
    second call, e.g. from a test, does not print twice). ``journal`` None: detect it
    (:func:`stderr_is_journal`)."""
    out = sys.stderr if stream is None else stream
    handler = _Handler(out)
    handler.setFormatter(DiagnosticFormatter(
        stderr_is_journal(stream=out) if journal is None else journal))
    logger = logging.getLogger(ROOT)
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
