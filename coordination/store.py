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
  counted in :attr:`JsonlRead.bad_lines`.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from .errors import CorruptFileError, DiskFull, HarnessError

Durability = Literal["fsync", "none"]
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (orjson; non-str keys rejected)."""
    return orjson.dumps(obj)


def dumps_pretty(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_write_error(path: Path, exc: OSError) -> None:
    if exc.errno in _DISK_FULL:
        raise DiskFull(f"{path}: no space left ({os.strerror(exc.errno or 0)}); the previous "
                       f"version is intact. Free space (`harness janitor run`) and retry.") from exc
    raise HarnessError(f"{path}: write failed: {exc.strerror or exc}") from exc


def replace_bytes(path: Path, data: bytes, durability: Durability = "fsync") -> None:
    """Atomically publish ``data`` as ``path`` (see module docstring)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durability == "fsync":
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        _raise_write_error(path, exc)
    if durability == "fsync":
        fsync_dir(path.parent)


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
        created = durability == "fsync" and not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
        if created:
            fsync_dir(path.parent)  # the new directory entry must survive a crash too
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
            yield number, parse_record(stripped)
    finally:
        fh.close()


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """One JSONL line as an object; None for a blank, unparseable or non-object line."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def read_appended(path: Path, offset: int, size: int) -> tuple[list[dict[str, Any]], int]:
    """The records of the whole lines in ``path`` between ``offset`` and ``size`` (a size
    the caller just read with stat), and the offset after the last whole line: a line still
    being written is left for the next call. Unparseable lines are skipped. The caller owns
    rotation (a new inode, or ``size`` below ``offset``): it starts again at 0."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(max(0, size - offset))
    whole = data[:data.rfind(b"\n") + 1]
    records = [r for r in map(parse_record, whole.splitlines()) if r is not None]
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
               end: int | None = None) -> list[dict[str, Any]]:
    """The last ``limit`` parseable records, reading the file backwards (cheap on big files);
    with ``end``, only the bytes before that offset count (a follower that noted the size
    first, then reads from there, sees every later line exactly once)."""
    if limit <= 0:
        return []
    try:
        fh = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return []
    newest_first: list[dict[str, Any]] = []

    def take(raw: bytes) -> None:
        raw = raw.strip()
        if not raw or len(newest_first) >= limit:
            return
        obj = parse_record(raw)
        if obj is not None:
            newest_first.append(obj)

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
            for raw in fh:
                if any(n in raw for n in needles):
                    obj = parse_record(raw)
                    if obj is not None:
                        yield obj
    except (OSError, EOFError):
        return
