"""FileLock: flock(2) per resource, re-entrant in-process, interoperable with flock(1)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import ProcGroup, make_home, needs, req

from coordination.errors import EXIT_TEMPFAIL, LockTimeout
from coordination.locks import FileLock, lock_for
from coordination.queue import TaskQueue

needs_flock = needs("flock")


def flock_try(path: Path) -> int:
    """Exit status of ``flock -n PATH true``: 0 when the lock was free, 1 when held."""
    return subprocess.run(["flock", "-n", str(path), "true"], stdin=subprocess.DEVNULL,
                          timeout=30).returncode


def hold_with_flock(procs: ProcGroup, path: Path) -> None:
    """Start ``flock PATH sh -c 'echo locked; sleep 60'`` and wait until it holds the lock."""
    child = procs.spawn("flock-holder",
                        ["flock", str(path), "sh", "-c", "echo locked; exec sleep 60"])
    child.wait_for_line("locked", timeout=20)


@needs_flock
def test_held_filelock_blocks_flock_1(tmp_path: Path) -> None:
    path = tmp_path / "queue.lock"
    lock = FileLock(path)
    assert flock_try(path) == 0
    lock.acquire()
    try:
        assert lock.held
        assert flock_try(path) == 1
    finally:
        lock.release()
    assert not lock.held
    assert flock_try(path) == 0


@needs_flock
def test_flock_1_holder_makes_acquire_time_out(tmp_path: Path, procs: ProcGroup) -> None:
    path = tmp_path / "queue.lock"
    hold_with_flock(procs, path)
    lock = FileLock(path)
    started = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        lock.acquire(timeout=0.2)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 5
    assert info.value.exit_code == EXIT_TEMPFAIL
    assert str(path) in str(info.value)
    assert not lock.held
    with pytest.raises(LockTimeout):
        lock.acquire(timeout=0)
    procs.close()  # kill the holder (and its sleep): the lock is free again
    lock.acquire(timeout=5)
    lock.release()


@needs_flock
def test_blocking_acquire_wakes_when_flock_1_releases(tmp_path: Path,
                                                      procs: ProcGroup) -> None:
    path = tmp_path / "x.lock"
    child = procs.spawn("short-holder",
                        ["flock", str(path), "sh", "-c", "echo locked; exec sleep 0.5"])
    child.wait_for_line("locked", timeout=20)
    lock = FileLock(path)
    started = time.monotonic()
    lock.acquire(timeout=20)
    try:
        assert time.monotonic() - started >= 0.2
    finally:
        lock.release()


@needs_flock
def test_queue_respects_a_shell_holding_the_queue_lock(tmp_path: Path,
                                                       procs: ProcGroup) -> None:
    home = make_home(tmp_path, lock_timeout_s=0.2)
    queue = TaskQueue(home)
    queue.enqueue(req())
    hold_with_flock(procs, home.lock_path("queue"))
    with pytest.raises(LockTimeout):
        queue.claim("w1")
    procs.close()
    assert queue.claim("w1") is not None


def test_lock_file_is_never_unlinked(tmp_path: Path) -> None:
    path = tmp_path / "res.lock"
    lock = FileLock(path)
    lock.acquire()
    ino = os.stat(path).st_ino
    lock.release()
    assert path.exists() and os.stat(path).st_ino == ino
    with lock.held_for(1):
        pass
    assert path.exists() and os.stat(path).st_ino == ino


def test_lock_does_not_truncate_lock_file(tmp_path: Path) -> None:
    path = tmp_path / "res.lock"
    path.write_text("operator note\n")
    with FileLock(path).held_for(1):
        pass
    assert path.read_text() == "operator note\n"


@needs_flock
def test_reentrant_within_a_process(tmp_path: Path) -> None:
    path = tmp_path / "r.lock"
    lock = lock_for(path)
    lock.acquire()
    lock.acquire(timeout=0)  # re-entrant: no deadlock, no timeout
    with lock.held_for(0):
        assert flock_try(path) == 1
    lock.release()
    assert lock.held and flock_try(path) == 1  # still held once
    lock.release()
    assert not lock.held and flock_try(path) == 0
    with pytest.raises(RuntimeError):
        lock.release()


def test_lock_for_returns_one_instance_per_path(tmp_path: Path) -> None:
    a = lock_for(tmp_path / "same.lock")
    b = lock_for(tmp_path / "sub" / ".." / "same.lock")
    assert a is b
    assert lock_for(tmp_path / "other.lock") is not a


def test_other_thread_waits_for_the_in_process_holder(tmp_path: Path) -> None:
    lock = lock_for(tmp_path / "t.lock")
    outcome: list[str] = []
    release_now = threading.Event()

    def other() -> None:
        try:
            lock.acquire(timeout=0.1)
        except LockTimeout:
            outcome.append("timeout")
        else:
            lock.release()
            outcome.append("acquired")
        release_now.set()

    with lock.held_for(1):
        t = threading.Thread(target=other)
        t.start()
        release_now.wait(10)
    t.join(10)
    assert outcome == ["timeout"]

    def blocking() -> None:
        with lock.held_for(10):
            outcome.append("got it")

    with lock.held_for(1):
        t = threading.Thread(target=blocking)
        t.start()
        time.sleep(0.05)
        assert outcome == ["timeout"]
    t.join(10)
    assert outcome == ["timeout", "got it"]


def test_released_after_exception_in_held_for(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "e.lock")
    with pytest.raises(ZeroDivisionError), lock.held_for(1):
        _ = 1 / 0
    assert not lock.held
    lock.acquire(timeout=0)
    lock.release()
