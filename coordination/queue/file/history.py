"""Reading ``task-history.jsonl`` incrementally: the file backend's history cursor.

The cursor is ``"STREAM:OFFSET"``: the offset after the last whole line returned, in the
stream ``INODE.N``. A line still being written is left for the next call; a rotation
(another inode, or a file shorter than the offset) starts over at the new file's beginning
in a new stream (N counts restarts on a reused inode), so a caller that compares the part
before ``:`` knows it started over.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ... import clock
from ...jsonl import parse_record, read_appended

CHUNK = 1 << 16
#: appends are ordered by time to within one lock hold; a backwards read goes this much
#: further back than ``start_at`` before it stops.
SLACK_S = 60.0


def _cursor(stream: str, offset: int) -> str:
    return f"{stream}:{offset}"


def read_since(path: Path, cursor: str | None, *, start_at: float | None = None,
               limit: int | None = None) -> tuple[list[dict[str, Any]], str]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [], _cursor("0.0", 0)
    offset = 0
    stream = f"{st.st_ino}.0"
    if cursor:
        try:
            stream_s, off_s = cursor.rsplit(":", 1)
            ino_s, _, gen_s = stream_s.partition(".")
            ino, gen, off = int(ino_s), int(gen_s or 0), int(off_s)
        except ValueError:
            ino, gen, off = -1, 0, 0
        if ino == st.st_ino and off <= st.st_size:
            offset, stream = off, f"{ino}.{gen}"
        elif ino == st.st_ino:
            stream = f"{ino}.{gen + 1}"  # the same inode, rewritten shorter: a new stream
    elif start_at is not None:
        return _tail_since(path, stream, st.st_size, start_at, limit)
    end = st.st_size
    if limit is not None:
        # Read in bounded steps so a caller that pages never loads the whole file.
        end = min(end, offset + max(limit, 1) * 4096)
    records, new_offset = read_appended(path, offset, end)
    if limit is not None and len(records) > limit:
        records = records[:limit]
        new_offset = _offset_after(path, offset, limit)
    return records, _cursor(stream, new_offset)


def _offset_after(path: Path, offset: int, count: int) -> int:
    """The offset after the first ``count`` parseable whole lines from ``offset``."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        seen = 0
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            offset += len(raw)
            if parse_record(raw.strip()) is not None:
                seen += 1
                if seen >= count:
                    break
    return offset


def _tail_since(path: Path, stream: str, size: int, start_at: float,
                limit: int | None) -> tuple[list[dict[str, Any]], str]:
    """Records recorded at or after ``start_at``, read backwards from the end (a long
    history costs only what the window holds); with ``limit``, at most that many (the
    newest)."""
    found: list[dict[str, Any]] = []
    with open(path, "rb") as fh:
        pos, buf, end = size, b"", None
        while pos > 0:
            step = min(CHUNK, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            if end is None:  # only whole lines: a torn tail is read later, once whole
                cut = buf.rfind(b"\n")
                if cut < 0:
                    continue
                end = pos + cut + 1
                buf = buf[:cut + 1]
            parts = buf.split(b"\n")
            buf = parts[0] if pos > 0 else b""
            lines = parts[1:] if pos > 0 else parts
            oldest = float("inf")
            for raw in reversed(lines):
                record = parse_record(raw) if raw.strip() else None
                if record is None:
                    continue
                try:
                    ts = clock.parse_iso(str(record.get("recorded_at")))
                except ValueError:
                    continue
                oldest = min(oldest, ts)
                if ts >= start_at:
                    found.append(record)
            if oldest < start_at - SLACK_S or (limit is not None and len(found) >= limit):
                break
    if limit is not None:
        found = found[:limit]
    found.reverse()
    return found, _cursor(stream, end or 0)
