"""The queue's journal: ``coordination/task-queue.journal`` (docs/coordination.md).

Format: a header line ``{"journal":1,"gen":G,"base":R,"created_at":...}`` then one compact
JSON line per committed transaction (``rev`` R+1, R+2, ...) and, between them, snapshot
notes (``{"snap":...}``). The file is preallocated (``posix_fallocate``) in steps of
:data:`GROWTH` and lines are written with ``pwrite`` at the end of the data, so the bytes
after the last line are zeros.

Why preallocated: an ``fdatasync`` after an append that grows the file also commits the new
size (a metadata journal commit): 2.3 ms on the reference machine, against 0.23 ms for a
write into space that is already allocated. One commit is one ``pwrite`` and one
``fdatasync``.

Guarantees
- A line is whole once its ``\\n`` is there; readers without the lock stop at the first
  line that is not yet whole (a concurrent write), never parse a partial one.
- A torn line (a crash in the middle of a write: bytes, no newline, then zeros) is cut
  (overwritten with zeros) by the next writer, under the queue lock, before it writes.
- Rotation (compaction) publishes a new file by rename; a process that still reads the old
  one finishes it through its open descriptor, then follows the new one.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ...errors import CorruptFileError, DiskFull, HarnessError
from ...store import Durability, dumps, fsync_dir

JOURNAL_VERSION = 1
GROWTH = 4 << 20  # preallocation step
READ_CHUNK = 1 << 18
# The first read past the end of the data is this small: the space after it is zeros
# (preallocated), and a reader that follows a busy journal finds one or two new lines
# there, so 256 KiB of zeros copied per look would cost more than the lines (3 looks per
# task in a worker). The chunk doubles while it comes back full of data.
FIRST_READ = 1 << 13


@dataclass
class JournalRead:
    """What one catch-up found."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    rotated: bool = False  # the file was replaced since the last read
    torn_cut: int = 0  # bytes of a torn line zeroed (only under the lock)


class Journal:
    """One process's view of the journal file: an open descriptor and the offset after the
    last whole line it has read."""

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self.fd: int | None = None
        self.ino: int | None = None
        self.end = 0  # offset just after the last whole line read
        self.allocated = 0
        self.header: dict[str, Any] | None = None
        self.after_rev = -1

    def __del__(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # ------------------------------------------------------------------ open / create
    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.ino = self.header = None
        self.end = self.allocated = 0

    def _open_current(self) -> bool:
        """Open the file at :attr:`path` (False when there is none)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise HarnessError(f"{self.path}: cannot open the queue journal: "
                               f"{exc.strerror or exc}") from exc
        self.close()
        st = os.fstat(fd)
        self.fd, self.ino, self.end, self.allocated = fd, st.st_ino, 0, st.st_size
        return True

    @staticmethod
    def header_line(gen: int, base: int, created_at: str) -> bytes:
        return dumps({"journal": JOURNAL_VERSION, "gen": gen, "base": base,
                      "created_at": created_at}) + b"\n"

    def create(self, gen: int, base: int, created_at: str, lines: list[bytes],
               durability: Durability) -> None:
        """Publish a new journal (header, then ``lines``) by rename over the current one;
        the caller holds the queue lock. The old file is kept as ``NAME.prev`` (hard link)
        for ``doctor --repair``."""
        data = self.header_line(gen, base, created_at) + b"".join(lines)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                         | os.O_NOFOLLOW, self.mode)
            try:
                os.fchmod(fd, self.mode)
                os.posix_fallocate(fd, 0, max(GROWTH, len(data) + GROWTH))
                os.pwrite(fd, data, 0)
                if durability == "fsync":
                    os.fsync(fd)
            finally:
                os.close(fd)
            prev = self.path.with_name(self.path.name + ".prev")
            if self.path.exists():
                link_tmp = prev.with_name(f".{prev.name}.tmp-{os.getpid()}")
                try:
                    os.link(self.path, link_tmp)
                    os.replace(link_tmp, prev)
                except OSError:
                    _unlink_quietly(link_tmp)
            os.replace(tmp, self.path)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"{self.path}: no space left to start a new queue journal; "
                               "the current one is intact") from exc
            raise HarnessError(f"{self.path}: cannot write a new journal: {exc}") from exc
        if durability == "fsync":
            fsync_dir(self.path.parent)

    # ------------------------------------------------------------------ reading
    def read_new(self, *, locked: bool, after_rev: int = -1) -> JournalRead:
        """The whole lines written since the last call, following a rotation. ``locked``:
        the caller holds the queue lock, so a torn tail is cut and a bad whole line is
        corruption (without the lock, both mean "not yet written": stop there). Commit lines
        of revision ``after_rev`` or older are passed over unparsed (a process that just
        loaded the snapshot skips what it already has)."""
        self.after_rev = after_rev
        out = JournalRead()
        try:
            st = os.stat(self.path)
            current = st.st_ino
        except FileNotFoundError:
            current = None
        if self.fd is not None and current != self.ino:
            # Replaced by a compaction: finish the old file (nobody writes to it any more),
            # then follow the new one from its start.
            self._read_into(out, locked=False)
            out.rotated = True
            if current is None:
                self.close()
                return out
        if (self.fd is None or current != self.ino) and not self._open_current():
            return out
        self._read_into(out, locked=locked)
        return out

    def _read_into(self, out: JournalRead, *, locked: bool) -> None:
        assert self.fd is not None
        fd = self.fd
        size = os.fstat(fd).st_size
        self.allocated = size
        pos = self.end
        buf = bytearray()  # bytes after the last whole line (amortised O(n) growth)
        want = FIRST_READ
        while pos < size:
            chunk = os.pread(fd, min(want, size - pos), pos)
            want = min(want * 2, READ_CHUNK)
            if not chunk:
                break
            zero = chunk.find(b"\0")
            buf += chunk if zero < 0 else chunk[:zero]
            pos += len(chunk)
            cut = buf.rfind(b"\n")
            if cut >= 0:
                start = self.end
                for raw in bytes(buf[:cut + 1]).splitlines(keepends=True):
                    if self._old_commit(raw):
                        start += len(raw)
                        self.end = start
                        continue
                    line = self._parse(raw, start, locked=locked)
                    if line is None:
                        return
                    if self.header is None and "journal" in line:
                        self.header = line
                    else:
                        out.lines.append(line)
                    start += len(raw)
                    self.end = start
                del buf[:cut + 1]
            if zero >= 0:
                break
        if buf and locked:
            # Bytes with no newline before the zeros or the end: a write cut short by a
            # crash. Never data: zero them so the next line starts clean.
            os.pwrite(fd, b"\0" * len(buf), self.end)
            os.fdatasync(fd)
            out.torn_cut = len(buf)

    def _old_commit(self, raw: bytes) -> bool:
        """A commit line (they start ``{"rev":N,``) of revision ``after_rev`` or older."""
        if self.after_rev < 0 or not raw.startswith(b'{"rev":'):
            return False
        comma = raw.find(b",", 7, 30)
        try:
            return comma > 0 and int(raw[7:comma]) <= self.after_rev
        except ValueError:
            return False

    def _parse(self, raw: bytes, offset: int, *, locked: bool) -> dict[str, Any] | None:
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            line = None
        if isinstance(line, dict):
            return line
        if locked:
            raise CorruptFileError(self.path, f"byte {offset}: a whole line that is not a JSON "
                                   "object; the journal was not modified (see `harness doctor "
                                   "--repair`)")
        return None

    # ------------------------------------------------------------------ writing
    def append(self, data: bytes, durability: Durability) -> None:
        """Write whole lines at the end of the data (the caller holds the queue lock and
        has read up to the end). Space is allocated before the write, so a full disk fails
        here with nothing written."""
        assert self.fd is not None
        fd = self.fd
        need = self.end + len(data)
        try:
            if need > self.allocated:
                size = max(need, self.allocated) + GROWTH
                os.posix_fallocate(fd, 0, size)
                self.allocated = size
            written = os.pwrite(fd, data, self.end)
            if written != len(data):
                os.pwrite(fd, b"\0" * written, self.end)
                raise OSError(errno.ENOSPC, "short write")
            if durability == "fsync":
                os.fdatasync(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"{self.path}: no space left for the queue journal; nothing "
                               "was committed. Free space (`harness janitor run`) and retry."
                               ) from exc
            raise HarnessError(f"{self.path}: write failed: {exc.strerror or exc}") from exc
        self.end = need

    def sync(self) -> None:
        if self.fd is not None:
            os.fdatasync(self.fd)

    def sync_written(self) -> None:
        """fdatasync what this process wrote (called after the queue lock is released).
        Raises :class:`HarnessError` when the flush fails: the line is written and others
        may have read it, but its durability is unknown."""
        if self.fd is None:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise HarnessError(f"{self.path}: fdatasync failed ({exc.strerror or exc}); the "
                               "last commit is written but may not survive a crash") from exc

    def data_size(self) -> int:
        """Bytes of whole lines (the journal's logical size)."""
        return self.end


def read_all(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """Header, every whole parseable line and the count of bad ones, of a journal file
    (for doctor and repair; tolerant, never writes)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, [], 0
    zero = data.find(b"\0")
    if zero >= 0:
        data = data[:zero]
    header: dict[str, Any] | None = None
    lines: list[dict[str, Any]] = []
    bad = 0
    for raw in data.split(b"\n")[:-1]:
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(line, dict):
            bad += 1
        elif header is None and "journal" in line:
            header = line
        else:
            lines.append(line)
    return header, lines, bad


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
