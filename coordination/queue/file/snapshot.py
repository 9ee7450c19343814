"""``coordination/task-queue.json``: the jq view of the live queue (docs/coordination.md).

Layout (unchanged from the first file backend): a head object ``{"version":1,
"revision":R,"updated_at":...,`` then ``"tasks":[`` and one compact task per line, then
``]}``. ``revision`` is the journal revision the snapshot shows.

Guarantees
- Published by rename: jq never sees a torn file.
- :func:`parse` accepts any valid JSON layout (a file edited with jq and mv), and the fast
  path re-uses each line's bytes as the task's stored form, so loading 100,000 tasks parses
  each task once.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from ... import clock
from ...errors import CorruptFileError, DiskFull, HarnessError
from ...store import Durability, dumps, fsync_dir, parse_json
from ...tasks import Task, check_stored_task, stored_task

QUEUE_FORMAT_VERSION = 1
_MARKER = b',"tasks":[\n'

Sig = tuple[int, int, int]


@dataclass
class Snapshot:
    """A snapshot's head fields; :meth:`tasks` yields its tasks as (task, stored bytes),
    one at a time (a caller that keeps only the bytes never holds every task as a dict:
    100,000 tasks would be 135 MB of dicts)."""

    revision: int
    updated_at: str | None
    sig: Sig
    path: Path
    data: bytes
    body_start: int  # > 0: the published layout, parsed line by line from here

    def tasks(self) -> Iterator[tuple[Task, bytes]]:
        if self.body_start > 0:
            try:
                yield from _published_tasks(self.data, self.body_start)
                return
            except _OtherLayout:
                pass  # a line not as we write it: the whole file is parsed below
        yield from _any_layout_tasks(self.path, self.data)


class _OtherLayout(Exception):
    pass


def stat_sig(path: Path) -> Sig | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


#: Task lines per piece of a rendered view: joining one holds the GIL well under a
#: millisecond, where joining a 100,000-task view at once held it 77 ms (a daemon's loop
#: stalled behind its own background publish).
RENDER_CHUNK = 1024


def render(revision: int, now: float, parts: list[bytes]) -> Iterator[bytes]:
    """The view's bytes, in pieces of RENDER_CHUNK task lines (written as they come)."""
    head = dumps({"version": QUEUE_FORMAT_VERSION, "revision": revision,
                  "updated_at": clock.iso(now)})
    if not parts:
        yield head[:-1] + b',"tasks":[]}\n'
        return
    yield head[:-1] + _MARKER
    for start in range(0, len(parts), RENDER_CHUNK):
        chunk = b",\n".join(parts[start:start + RENDER_CHUNK])
        yield chunk if start == 0 else b",\n" + chunk
    yield b"\n]}\n"


def write_temp(path: Path, data: Iterable[bytes], durability: Durability,
               mode: int) -> Path:
    """Write the pieces of ``data`` to a hidden temp file beside ``path`` (not yet
    published)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode)
    try:
        os.fchmod(fd, mode)
        for piece in data:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
        if durability == "fsync":
            os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"{path}: no space left to republish it; the previous version is "
                           "intact and the queue itself is committed (its journal)") from exc
        raise HarnessError(f"{path}: write failed: {exc.strerror or exc}") from exc
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def publish_temp(tmp: Path, path: Path, durability: Durability, *,
                 keep_replaced: list[int] | None = None) -> Sig:
    """Rename a temp file written by :func:`write_temp` over ``path``; returns its sig.
    With ``keep_replaced``, the file it replaces is opened first and the descriptor added
    there: the caller closes it after releasing the queue lock, so the file system frees
    the old view's blocks then (7-67 ms for a 54 MB view on this ext4), not while every
    queue operation waits for the lock."""
    if keep_replaced is not None:
        try:
            keep_replaced.append(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
        except OSError:
            pass  # none yet (or a link, which the rename replaces anyway)
    os.replace(tmp, path)
    if durability == "fsync":
        fsync_dir(path.parent)
    sig = stat_sig(path)
    assert sig is not None
    return sig


def parse(path: Path) -> Snapshot | None:
    """The snapshot at ``path`` (None when absent). Raises CorruptFileError naming the
    file and the position when it does not parse or breaks the task shape (also from
    :meth:`Snapshot.tasks`)."""
    sig = stat_sig(path)
    if sig is None:
        return None
    try:
        with open(path, "rb", opener=_nofollow) as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    head_end = data.find(_MARKER)
    if head_end > 0 and data.endswith(b"\n]}\n"):
        try:
            head = orjson.loads(data[:head_end] + b"}")
        except orjson.JSONDecodeError:
            head = None
        if isinstance(head, dict) and "tasks" not in head:
            revision = head.get("revision", 0)
            return Snapshot(revision if isinstance(revision, int) else 0,
                            head.get("updated_at"), sig, path, data,
                            head_end + len(_MARKER))
    raw = parse_json(path, data)
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list):
        raise CorruptFileError(path, "top level must be an object with a 'tasks' list")
    revision = raw.get("revision", 0)
    return Snapshot(revision if isinstance(revision, int) else 0, raw.get("updated_at"), sig,
                    path, data, 0)


def _any_layout_tasks(path: Path, data: bytes) -> Iterator[tuple[Task, bytes]]:
    raw = parse_json(path, data)
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list):
        raise CorruptFileError(path, "top level must be an object with a 'tasks' list")
    seen: set[str] = set()
    for index, task in enumerate(raw["tasks"]):
        problems = check_stored_task(task, f"tasks[{index}]")
        if problems:
            raise CorruptFileError(path, "; ".join(problems))
        if task["task_id"] in seen:
            raise CorruptFileError(path, f"tasks[{index}]: duplicate task_id {task['task_id']}")
        seen.add(task["task_id"])
        yield task, dumps(task)


def _published_tasks(data: bytes, start: int) -> Iterator[tuple[Task, bytes]]:
    """The lines of the layout :func:`render` writes; raises _OtherLayout at the first line
    that is not one compact task. Compact JSON holds no raw newline, so ``,\n`` only ever
    ends a line. Every line is cut out first and parsed after: the stored bytes then lie
    together in memory, not between the freed parse results (100,000 tasks: ~70 MB less
    resident)."""
    lines = data[start:len(data) - 4].split(b",\n")  # the tail is "\n]}\n"
    seen: set[str] = set()
    for index, line in enumerate(lines):
        try:
            task = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise _OtherLayout() from None
        if not isinstance(task, dict) or check_stored_task(task, f"tasks[{index}]") \
                or task["task_id"] in seen:
            raise _OtherLayout()
        seen.add(task["task_id"])
        yield stored_task(task), line


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
