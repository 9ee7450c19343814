"""Store primitives: publish-by-rename JSON, whole-line JSONL appends, tolerant readers.

Guarantees
- :func:`replace_bytes` / :func:`replace_json`: readers see the old file or the new file,
  never a torn one. The new content is written to a hidden temp file in the same directory
  (``.NAME.tmp-PID-RANDOM``), fsynced, renamed over the target, and the directory fsynced
  (with ``durability="none"`` both fsyncs are skipped: atomic, but not crash-durable).
  On any failure (ENOSPC included) the temp file is removed and the old file is untouched.
- :func:`append_line`: one ``write(2)`` of one whole line with O_APPEND; callers hold the
  resource's lock so a rotating janitor never loses or duplicates it.
- :func:`read_jsonl`: never raises on bad content; a torn or garbage line is skipped and
  counted in :attr:`JsonlRead.bad_lines`. A whole record glued after a torn fragment on
  the same line is kept (:func:`salvage_record`): a torn line never loses the next one.
- No link is followed out of the home: every write opens the file's folder with
  ``O_NOFOLLOW | O_DIRECTORY`` and the file relative to that descriptor (openat) with
  ``O_NOFOLLOW``, so neither the file nor its folder can be a symbolic link planted or
  swapped in; :class:`UnsafePath` is raised instead (:func:`open_in_folder`).
- Modes do not depend on the umask: files are created ``0600`` (``0640`` in a setgid
  folder, as a home made by ``harness init --group`` has) and set with fchmod
  (:func:`file_mode_for`).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import orjson

from .errors import CorruptFileError, DiskFull, HarnessError, UnsafePath

Durability = Literal["fsync", "none"]
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (orjson; non-str keys rejected)."""
    return orjson.dumps(obj)


def dumps_pretty(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n"


#: Mode of every file harness creates; FILE_MODE_GROUP in a home shared with a group.
FILE_MODE = 0o600
FILE_MODE_GROUP = 0o640
_LINK_ERRORS = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)


def file_mode_for(folder_mode: int) -> int:
    """The mode of a file created in a folder of mode ``folder_mode``: 0640 when the folder
    is shared with its group (setgid, as ``harness init --group`` makes them), else 0600."""
    return FILE_MODE_GROUP if folder_mode & stat.S_ISGID else FILE_MODE


def _unsafe(path: Path, what: str) -> UnsafePath:
    return UnsafePath(f"{path}: {what} is a symbolic link (or not a regular {what}); harness "
                      f"does not follow links inside the home. Replace it with a real "
                      f"{what} (`harness doctor` lists every link).")


def open_folder(folder: Path) -> int:
    """A descriptor of ``folder``, refusing a symbolic link (:class:`UnsafePath`)."""
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _LINK_ERRORS:
            raise _unsafe(folder, "folder") from None
        raise


def open_in_folder(path: Path, flags: int, folder_fd: int | None = None) -> int:
    """``os.open(path, flags | O_NOFOLLOW)`` relative to a descriptor of its folder
    (``folder_fd``, else one opened here with :func:`open_folder`), so neither the file
    nor the folder may be a symbolic link (:class:`UnsafePath`). A file this call creates
    gets :func:`file_mode_for` the folder, whatever the umask."""
    own = folder_fd is None
    dfd = open_folder(path.parent) if folder_fd is None else folder_fd
    try:
        mode = file_mode_for(os.fstat(dfd).st_mode)
        try:
            fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in _LINK_ERRORS:
                raise _unsafe(path, "file") from None
            raise
        if flags & os.O_CREAT:
            st = os.fstat(fd)
            if st.st_mode & 0o777 != mode and st.st_uid == os.geteuid() and \
                    (st.st_size == 0 or flags & os.O_EXCL):
                os.fchmod(fd, mode)  # created now: the umask does not decide
        return fd
    finally:
        if own:
            os.close(dfd)


def prepare_task_folder(folder: Path, stale: str) -> None:
    """Make ``folder`` (``results/<task_id>/``) a real directory of the home and remove
    its file ``stale`` (a previous attempt's result), without following a link: neither
    ``folder`` nor its parent may be one (:class:`UnsafePath`), so a planted link can
    neither send the task to run elsewhere nor make the worker delete a file there."""
    parent = open_folder(folder.parent)
    try:
        mode = 0o2750 if os.fstat(parent).st_mode & stat.S_ISGID else 0o700
        try:
            os.mkdir(folder.name, mode, dir_fd=parent)
        except FileExistsError:
            pass
        try:
            fd = os.open(folder.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC, dir_fd=parent)
        except OSError as exc:
            if exc.errno in _LINK_ERRORS:
                raise _unsafe(folder, "folder") from None
            raise
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, mode)
            try:
                os.unlink(stale, dir_fd=fd)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def read_in_folder(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` (at most ``limit`` + 1), refusing a link as the file or its
    folder (:class:`UnsafePath`): a task's ``result.json`` linked to a file elsewhere is
    never read into the history."""
    fd = open_in_folder(path, os.O_RDONLY)
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(limit + 1)
    finally:
        os.close(fd)


def move_aside(path: Path, folder: Path, stamp: str) -> Path:
    """Move ``path`` (a file, or a link itself, never its target) into ``folder`` as
    ``NAME.STAMP`` by rename; returns the new path. Used for quarantine."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = folder / f"{path.name}.{stamp}"
    os.replace(path, target)
    return target


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_write_error(path: Path, exc: OSError) -> NoReturn:
    if exc.errno in _DISK_FULL:
        raise DiskFull(f"{path}: no space left ({os.strerror(exc.errno or 0)}); the previous "
                       f"version is intact. Free space (`harness janitor run`) and retry.") from exc
    raise HarnessError(f"{path}: write failed: {exc.strerror or exc}") from exc


def replace_bytes(path: Path, data: bytes, durability: Durability = "fsync") -> None:
    """Atomically publish ``data`` as ``path`` (see module docstring)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        dfd = open_folder(path.parent)  # the temp file and the rename stay in this folder
    except OSError as exc:
        _raise_write_error(path, exc)
    try:
        try:
            fd = open_in_folder(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dfd)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if durability == "fsync":
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp.name, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            try:
                os.unlink(tmp.name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            _raise_write_error(path, exc)
        if durability == "fsync":
            os.fsync(dfd)
    finally:
        os.close(dfd)


def replace_json(path: Path, obj: Any, durability: Durability = "fsync",
                 pretty: bool = False) -> None:
    replace_bytes(path, dumps_pretty(obj) if pretty else dumps(obj) + b"\n", durability)


def read_json(path: Path) -> Any:
    """Parse ``path``; raise :class:`CorruptFileError` naming file, line and column.

    Raises FileNotFoundError when the file does not exist (callers decide what absent means).
    """
    data = path.read_bytes()
    return parse_json(path, data)


def parse_json(path: Path, data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptFileError(
            path, f"invalid JSON at line {exc.lineno} column {exc.colno} (byte {exc.pos}): "
                  f"{exc.msg}; the file was not modified (see `harness doctor --repair`)"
        ) from None


def append_line(path: Path, obj: Any, durability: Durability = "fsync") -> None:
    """Append ``obj`` as one JSON line with one write. The caller holds the file's lock."""
    append_bytes(path, dumps(obj) + b"\n", durability)


def append_bytes(path: Path, data: bytes, durability: Durability = "fsync") -> None:
    """Append whole lines (``data`` ends with a newline) with one ``write(2)``.

    The caller holds the file's lock. A short write (disk full mid-line) is cut off again,
    so the file never keeps a torn line; then :class:`DiskFull` is raised.
    """
    try:
        dfd = open_folder(path.parent)
        try:
            fd = open_in_folder(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, dfd)
            try:
                start = os.fstat(fd).st_size
                try:
                    written = os.write(fd, data)
                except OSError:
                    os.ftruncate(fd, start)
                    raise
                if written != len(data):
                    os.ftruncate(fd, start)
                    raise OSError(errno.ENOSPC, "short write")
                if durability == "fsync":
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            if durability == "fsync" and start == 0:
                os.fsync(dfd)  # a new directory entry must survive a crash too
        finally:
            os.close(dfd)
    except OSError as exc:
        _raise_write_error(path, exc)


@dataclass
class JsonlRead:
    """What :func:`read_jsonl` found: the parsed objects and how many lines were bad."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    bad_line_numbers: list[int] = field(default_factory=list)
    torn_tail: bool = False


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Yield ``(line_number, object_or_None)`` streaming; None marks a bad line.

    A missing file yields nothing. A final line without newline is yielded as bad (torn).
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed in finally below, generator-safe
    except FileNotFoundError:
        return
    try:
        for number, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                yield number, None
                continue
            stripped = raw.strip()
            if not stripped:
                continue
            obj = parse_record(stripped)
            yield number, obj
            if obj is None:
                glued = salvage_record(stripped)
                if glued is not None:
                    yield number, glued  # the fragment was reported bad just above
    finally:
        fh.close()


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """One JSONL line as an object; None for a blank, unparseable or non-object line."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def salvage_record(raw: bytes) -> dict[str, Any] | None:
    """The whole record glued after a torn fragment in an unparseable line, if any.

    A writer that died mid-append (an older emit-event.sh on a full disk, a crash) leaves
    a fragment without its newline; the next append then lands on the same line. The
    record is the longest suffix starting at ``{"`` that parses as an object: readers keep
    it and count the fragment as one bad line, instead of losing both."""
    start = raw.find(b'{"', 1)
    while start != -1:
        obj = parse_record(raw[start:])
        if obj is not None:
            return obj
        start = raw.find(b'{"', start + 1)
    return None


def _records_of(raw: bytes, bad: list[int] | None = None) -> list[dict[str, Any]]:
    """The records of one line: itself, or the one salvaged after a torn fragment. A line
    that does not parse whole is counted in ``bad`` (one element per bad line)."""
    raw = raw.strip()
    if not raw:
        return []
    obj = parse_record(raw)
    if obj is None:
        if bad is not None:
            bad.append(1)
        obj = salvage_record(raw)
    return [] if obj is None else [obj]


def read_appended(path: Path, offset: int, size: int, bad: list[int] | None = None
                  ) -> tuple[list[dict[str, Any]], int]:
    """The records of the whole lines in ``path`` between ``offset`` and ``size`` (a size
    the caller just read with stat), and the offset after the last whole line: a line still
    being written is left for the next call. Unparseable lines are skipped (counted in
    ``bad``; a record glued after a torn fragment is kept). The caller owns rotation (a new
    inode, or ``size`` below ``offset``): it starts again at 0."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(max(0, size - offset))
    whole = data[:data.rfind(b"\n") + 1]
    records = [r for raw in whole.splitlines() for r in _records_of(raw, bad)]
    return records, offset + len(whole)


def read_jsonl(path: Path) -> JsonlRead:
    """Read a whole JSONL file (see :func:`iter_jsonl`); an absent file reads as empty."""
    result = JsonlRead()
    for number, obj in iter_jsonl(path):
        if obj is None:
            result.bad_lines += 1
            result.bad_line_numbers.append(number)
        else:
            result.records.append(obj)
    if result.bad_line_numbers:
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - 1))
                result.torn_tail = fh.read(1) not in (b"\n", b"")
        except OSError:
            pass
    return result


def tail_jsonl(path: Path, limit: int, chunk: int = 1 << 16,
               end: int | None = None, bad: list[int] | None = None) -> list[dict[str, Any]]:
    """The last ``limit`` parseable records, reading the file backwards (cheap on big files);
    with ``end``, only the bytes before that offset count (a follower that noted the size
    first, then reads from there, sees every later line exactly once). Unparseable lines
    met on the way are counted in ``bad`` (a record glued after a torn fragment is kept)."""
    if limit <= 0:
        return []
    try:
        fh = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return []
    newest_first: list[dict[str, Any]] = []

    def take(raw: bytes) -> None:
        if len(newest_first) < limit:
            newest_first.extend(_records_of(raw, bad))

    with fh:
        size = os.fstat(fh.fileno()).st_size
        pos, buf = (size if end is None else min(end, size)), b""
        # Count parseable records, not raw lines: blank and garbage lines do not count.
        while pos > 0 and len(newest_first) < limit:
            step = min(chunk, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            parts = buf.split(b"\n")
            buf = parts[0]
            for raw in reversed(parts[1:]):
                take(raw)
        if pos == 0 and buf:
            take(buf)
    newest_first.reverse()
    return newest_first


def iter_lines_reverse(path: Path, max_bytes: int, chunk: int = 1 << 18
                       ) -> Iterator[bytes]:
    """Complete lines of ``path``, newest first, reading at most ``max_bytes`` from its end.

    A line cut by the byte limit is not yielded; a missing file yields nothing.
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed in finally, generator-safe
    except FileNotFoundError:
        return
    try:
        pos = os.fstat(fh.fileno()).st_size
        carry = b""
        spent = 0
        while pos > 0 and spent < max_bytes:
            step = min(chunk, pos, max_bytes - spent)
            pos -= step
            spent += step
            fh.seek(pos)
            parts = (fh.read(step) + carry).split(b"\n")
            carry = parts[0]
            for raw in reversed(parts[1:]):
                if raw.strip():
                    yield raw
        if pos == 0 and carry.strip():
            yield carry
    finally:
        fh.close()


def tail_lines(path: Path, count: int, max_bytes: int = 1 << 16) -> list[str]:
    """The last ``count`` lines of a text file (a backwards read of at most ``max_bytes``;
    the first line of a cut read is dropped, being probably partial); [] when missing."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return []
    with open(path, "rb") as fh:
        start = max(0, size - max_bytes)
        fh.seek(start)
        data = fh.read()
    parts = data.decode(errors="replace").split("\n")
    if start > 0:
        parts = parts[1:]  # the first line is probably cut
    if parts and parts[-1] == "":
        parts.pop()
    return parts[-count:] if count > 0 else []


def _matching_records(lines: Iterable[bytes], needles: Sequence[bytes]
                      ) -> Iterator[dict[str, Any]]:
    """Records of the lines that contain one of ``needles`` (a byte-level prefilter, so
    only candidate lines are parsed); unparseable lines are skipped."""
    for raw in lines:
        if any(n in raw for n in needles):
            record = parse_record(raw)
            if record is not None:
                yield record


def scan_jsonl(path: Path, needles: Sequence[bytes]) -> Iterator[dict[str, Any]]:
    """Objects of the lines of a JSONL file that contain one of ``needles``; nothing for a
    missing file."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with below, generator-safe
    except FileNotFoundError:
        return
    with fh:
        yield from _matching_records(fh, needles)

# ---------------------------------------------------------------------------- archives
def jsonl_archives(path: Path) -> list[Path]:
    """The janitor's rotated archives of the JSONL file ``path`` (``NAME.N.jsonl.gz`` beside
    it, and in a legacy ``archive/`` folder), newest (lowest N) first; [] when none."""
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    found: list[tuple[int, Path]] = []
    for folder in (path.parent, path.parent / "archive"):
        for candidate in folder.glob(f"{stem}.*.jsonl.gz"):
            middle = candidate.name[len(stem) + 1:-len(".jsonl.gz")]
            if middle.isdigit():
                found.append((int(middle), candidate))
    return [p for _, p in sorted(found)]


def scan_jsonl_gz(path: Path, needles: Sequence[bytes]) -> Iterator[dict[str, Any]]:
    """Objects of the lines of a gzip JSONL archive that contain one of ``needles`` (a
    cheap byte filter before parsing); unparseable lines are skipped, and a truncated or
    unreadable archive ends the scan quietly (archives are a best-effort record)."""
    import gzip

    try:
        with gzip.open(path, "rb") as fh:
            yield from _matching_records(fh, needles)
    except (OSError, EOFError):
        return
