"""One flock(2) lock file per resource, interoperable with ``flock(1)``.

Rules (after filelock's UnixFileLock): the lock file is opened without O_TRUNC and never
unlinked, because unlinking a lock file lets two waiters hold "the" lock on two different
inodes. Shell scripts take the same lock with ``flock coordination/locks/NAME.lock CMD``.

We do not use the ``filelock`` package here: it opens lock files with O_TRUNC and waits by
sleeping ``poll_interval`` (50 ms by default), which would dominate dispatch latency.

Waiting across processes is polling, not a kernel wake-up: flock(2) has no timeout, and
every caller passes one (``lock_timeout_s``, or 0 for "only if free"), so
:meth:`FileLock.acquire` retries ``flock(LOCK_EX | LOCK_NB)`` with a back-off that starts
at 0.5 ms and doubles up to 20 ms (0.5, 1, 2, 4, 8, 16, 20, 20, ... ms), and raises
:class:`LockTimeout` at the deadline. A waiter therefore sees a release up to about 20 ms
late once it has waited ~30 ms; short holds are caught within a millisecond or two. Only
``timeout=None`` (used by no daemon) blocks in flock(2) and wakes the instant the holder
releases. Within one process the lock is re-entrant: threads share one descriptor and
queue on an RLock (which does wake promptly, and honours the same timeout), because a
second descriptor of the same process would deadlock against the first under flock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LockTimeout, UnsafePath

_registry: dict[str, FileLock] = {}
_registry_guard = threading.Lock()


class FileLock:
    """An exclusive flock on ``path``, re-entrant within one process.

    Threads of one process share one file descriptor and serialise on an RLock, because
    two descriptors of one process would deadlock each other under flock semantics.
    Use :func:`lock_for` to get the process-wide instance for a path.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._rlock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    def acquire(self, timeout: float | None = None) -> None:
        """Take the lock; ``timeout`` None waits forever. Raises :class:`LockTimeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._rlock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            raise LockTimeout(f"timed out after {timeout}s waiting for {self.path} (in-process)")
        if self._depth > 0:
            self._depth += 1
            return
        try:
            # 0600: never wider than the home's files (harness init creates them first);
            # O_NOFOLLOW: a lock file swapped for a link is an error (doctor: symlink).
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafePath(f"{self.path} is a symbolic link; harness does not "
                                     "follow links inside the home (see `harness doctor`)"
                                     ) from None
                raise
            try:
                self._flock(fd, deadline, timeout)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self._rlock.release()
            raise
        self._fd = fd
        self._depth = 1

    def _flock(self, fd: int, deadline: float | None, timeout: float | None) -> None:
        if deadline is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        # flock(2) has no timeout; try non-blocking with a short, growing back-off.
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout(
                    f"timed out after {timeout}s waiting for {self.path}; another process holds"
                    f" it (see `fuser {self.path}`)"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)

    def release(self) -> None:
        if self._depth <= 0:
            raise RuntimeError(f"release of unheld lock {self.path}")
        self._depth -= 1
        if self._depth == 0:
            fd, self._fd = self._fd, None
            assert fd is not None
            # Closing the descriptor releases the flock; the file itself stays.
            os.close(fd)
        self._rlock.release()

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (from any thread)."""
        return self._depth > 0

    @contextmanager
    def held_for(self, timeout: float | None = None) -> Iterator[None]:
        self.acquire(timeout)
        try:
            yield
        finally:
            self.release()


def lock_for(path: Path) -> FileLock:
    """The process-wide :class:`FileLock` for ``path`` (one per resolved path)."""
    key = os.path.abspath(path)
    with _registry_guard:
        lock = _registry.get(key)
        if lock is None:
            lock = _registry[key] = FileLock(Path(key))
        return lock


def reset_after_fork() -> None:
    """Forget inherited lock state in a forked child (its parent's locks are not its own)."""
    global _registry_guard
    _registry.clear()
    _registry_guard = threading.Lock()


os.register_at_fork(after_in_child=reset_after_fork)
