"""Tolerant readers of the home's JSONL files: whole, appended ranges, newest first, archives.

Guarantees
- :func:`read_jsonl`: never raises on bad content; a torn or garbage line is skipped and
  counted in :attr:`JsonlRead.bad_lines`. A whole record glued after a torn fragment on
  the same line is kept (:func:`salvage_record`): a torn line never loses the next one.
- The backwards readers (:func:`tail_jsonl`, :func:`iter_lines_reverse`,
  :func:`tail_lines`) read only the end of a file, in chunks, so a long file costs what
  the caller asks for, not its size.

The writers (publish by rename, whole-line appends) are :mod:`coordination.store`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson


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
