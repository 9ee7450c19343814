"""Streamed reads and copies of big append-only files, ``CHUNK`` bytes at a time, so memory
stays bounded whatever the file's size: a :class:`Sink` (a new file, or nowhere in a dry
run), :func:`copy_range` (through an optional compressor, counting newlines) and backwards
searches for a torn last line (:func:`torn_start`) and for the start of the newest lines
(:func:`find_cut`). No locks are taken here: the caller (:mod:`coordination.rotation`)
holds what it needs."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from .errors import HarnessError

#: Read and write unit of every streamed copy (the RSS bound of a rotation is a few of these).
CHUNK = 1 << 20


class Sink:
    """Where a streamed copy goes: a file descriptor (``os.write`` loop) or, in a dry run,
    nowhere (only the size is counted)."""

    def __init__(self, fd: int | None, path: Path | None = None) -> None:
        self.fd = fd
        self.path = path
        self.size = 0

    @property
    def name(self) -> Path:
        """The file's path (only sinks made by :meth:`create` have one)."""
        if self.path is None:
            raise ValueError("this sink writes no file")
        return self.path

    @classmethod
    def create(cls, path: Path, like: os.stat_result | None) -> Sink:
        """A new file (O_EXCL) with the mode and, if possible, the owner of ``like``."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        sink = cls(fd, path)
        if like is not None:
            try:
                os.fchmod(fd, stat.S_IMODE(like.st_mode))
                if (like.st_uid, like.st_gid) != (os.geteuid(), os.getegid()):
                    # e.g. root running the janitor over a home owned by the harness user:
                    # the writers must still be able to append to the new live file.
                    try:
                        os.fchown(fd, like.st_uid, like.st_gid)
                    except PermissionError:
                        pass
            except BaseException:
                sink.discard()
                raise
        return sink

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.fd is None:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def sync(self) -> None:
        """Flush what was written so far (so a later fsync under a lock has little to do)."""
        if self.fd is not None:
            os.fdatasync(self.fd)

    def close(self, fsync: bool) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        """Close and unlink (a no-op once the file was renamed into place)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def copy_range(src: int, start: int, end: int, sink: Sink,
          compressor: Any = None) -> int:
    """Stream bytes [start, end) of ``src`` to ``sink`` (through ``compressor`` if given);
    return how many newlines they hold."""
    lines = 0
    pos = start
    while pos < end:
        chunk = os.pread(src, min(CHUNK, end - pos), pos)
        if not chunk:
            raise HarnessError(f"file shrank to {pos} bytes while copying up to {end}")
        lines += chunk.count(b"\n")
        pos += len(chunk)
        sink.write(compressor.compress(chunk) if compressor is not None else chunk)
    return lines


def count_lines(fd: int, end: int) -> int:
    lines = 0
    pos = 0
    while pos < end:
        chunk = os.pread(fd, min(CHUNK, end - pos), pos)
        if not chunk:
            break
        lines += chunk.count(b"\n")
        pos += len(chunk)
    return lines


def torn_start(fd: int, floor: int, size: int) -> int | None:
    """Offset of the torn last line (the bytes after the last newline) of [floor, size),
    or None when that range is empty or ends with a newline. Reads backwards by chunks."""
    if size <= floor or os.pread(fd, 1, size - 1) == b"\n":
        return None
    pos = size
    while pos > floor:
        lo = max(floor, pos - CHUNK)
        block = os.pread(fd, pos - lo, lo)
        i = block.rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return floor


def find_cut(fd: int, size: int, keep_lines: int, keep_bytes: int) -> tuple[int, int]:
    """Where the kept tail of [0, size) starts, and how many lines it holds: the newest
    ``keep_lines`` lines, fewer if they would exceed ``keep_bytes``. [0, size) ends with a
    newline. Reads backwards, so at most about ``keep_bytes`` + CHUNK bytes are read."""
    cut, kept = size, 0
    if size == 0 or keep_lines <= 0:
        return cut, kept
    pos = size - 1  # the final newline ends the newest line: search before it
    while kept < keep_lines:
        if pos <= 0:  # only the first line of the file is left
            if size <= keep_bytes:
                cut, kept = 0, kept + 1
            return cut, kept
        lo = max(0, pos - CHUNK)
        block = os.pread(fd, pos - lo, lo)
        j = block.rfind(b"\n")
        while j >= 0 and kept < keep_lines:
            start = lo + j + 1  # a line starts after each newline
            if size - start > keep_bytes:
                return cut, kept
            cut, kept = start, kept + 1
            j = block.rfind(b"\n", 0, j)
        pos = lo
    return cut, kept
