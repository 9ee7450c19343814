"""One exception hierarchy, rooted in :class:`HarnessError`, each class with its exit code.

Exit codes follow the CLI contract: 0 ok, 1 error, 2 usage / bad input, 75 temporary
failure (EX_TEMPFAIL: retrying later may succeed, e.g. a busy lock or backpressure).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75


class HarnessError(Exception):
    """Base of every error harness raises on purpose. ``exit_code`` is the CLI's status."""

    exit_code = EXIT_ERROR


class UsageError(HarnessError):
    """Bad input from the caller: unknown priority, oversize field, bad JSON argument."""

    exit_code = EXIT_USAGE


class NotInitialized(UsageError):
    """The home has no coordination directory; ``harness init`` creates one."""


class ConfigError(HarnessError):
    """A config file is unreadable or a key is invalid; the message names file and key."""

    exit_code = EXIT_USAGE


class CorruptFileError(HarnessError):
    """A coordination file does not parse or breaks its schema.

    The message names the file and the position; nothing is ever written over such a file
    (``harness doctor --repair`` quarantines it instead).
    """

    def __init__(self, path: object, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


class NotFound(HarnessError):
    """The named task, worker or dead letter does not exist."""


class InvalidTransition(HarnessError):
    """The operation does not apply to the task in its current status."""


class TemporaryFailure(HarnessError):
    """Retry later: a lock could not be taken in time, or the queue is back-pressured."""

    exit_code = EXIT_TEMPFAIL


class LockTimeout(TemporaryFailure):
    """A lock stayed held by someone else for longer than ``lock_timeout_s``."""


class Backpressure(TemporaryFailure):
    """More tasks are queued than ``max_queue_depth``; enqueue again later or use --force."""


class DiskFull(HarnessError):
    """A write failed with ENOSPC/EDQUOT. The previous version of the file is intact."""


class UnsafePath(HarnessError):
    """A path inside the home is a symbolic link (or its folder is one): harness refuses to
    follow it out of the home, writes nothing there, and ``harness doctor`` reports it."""


class DatabaseUnavailable(TemporaryFailure):
    """The PostgreSQL server of a postgres home refused the connection or went away
    (exit 75: retry once it is back). The message shows its URL with the password
    redacted."""


class SchemaVersionError(HarnessError):
    """The database's harness schema is missing, older than this code (run `harness db
    migrate`) or newer than this code knows (upgrade harness; nothing is written)."""
