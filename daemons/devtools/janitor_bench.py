"""Benchmark of one janitor rotation (``harness janitor bench``): wall time and peak RSS.

The rotation runs in a child process, reaped with ``os.wait4`` so its own
``ru_maxrss`` is read (not that of every child this process ever had). A second child that
only imports the janitor gives the baseline RSS of the interpreter and modules.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from coordination.config import init_home
from coordination.errors import HarnessError
from coordination.events import make_event
from coordination.paths import Home
from coordination.store import dumps

_ROTATE = """
import json, sys, time
from coordination.paths import Home
from daemons.janitor.run import run_janitor
if sys.argv[1] != "-":
    t0 = time.monotonic()
    summary = run_janitor(Home.at(sys.argv[1]), time.time())
    summary["child_wall_s"] = time.monotonic() - t0
    with open(sys.argv[2], "w") as fh:
        json.dump(summary, fh)
"""


def _run_child(home: str, out: Path) -> tuple[int, float, int]:
    """Run the rotation child; return (exit status, wall seconds, peak RSS in KiB)."""
    from .rss_bench import run_with_peak_rss  # its probe reads the child's own peak RSS

    started = time.monotonic()
    status, kib = run_with_peak_rss([sys.executable, "-c", _ROTATE, home, str(out)],
                                    dict(os.environ))
    return status, time.monotonic() - started, kib


def _generate(path: Path, size_bytes: int) -> int:
    """Write about ``size_bytes`` of valid event lines by repeating a 1 MiB block; return
    the number of lines written."""
    lines = []
    total = 0
    n = 0
    while total < (1 << 20):
        # Ids and a random token per line, so gzip sees about as much entropy as in real
        # events (a constant payload would compress far better than real files do).
        event = make_event("bench_event", source="janitor_bench",
                           message=f"task t-{secrets.token_hex(5)} finished on worker "
                                   f"w-{n % 16} after {n % 997} ms",
                           task_id=f"t-{secrets.token_hex(5)}",
                           data={"n": n, "token": secrets.token_hex(8)})
        raw = dumps(event) + b"\n"
        lines.append(raw)
        total += len(raw)
        n += 1
    block = b"".join(lines)
    written = 0
    count = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        while written < size_bytes:
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
            written += len(block)
            count += len(lines)
        os.fsync(fd)
    finally:
        os.close(fd)
    return count


def _count_gz_lines(path: Path) -> int:
    d = zlib.decompressobj(31)
    count = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            count += d.decompress(chunk).count(b"\n")
    return count + d.flush().count(b"\n")


def bench_rotation(size_bytes: int, workdir: str | os.PathLike[str] | None = None
                   ) -> dict[str, Any]:
    """Generate an events file of ``size_bytes`` in a scratch home (default config: the
    live file keeps events_keep_lines lines), rotate it in a child process and report
    figures. The scratch home (and so the big file) is deleted afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="harness-janitor-bench-", dir=workdir))
    try:
        home = Home(scratch / "home")
        init_home(home)
        t0 = time.monotonic()
        lines = _generate(home.events_file, size_bytes)
        generate_s = time.monotonic() - t0
        size = home.events_file.stat().st_size
        out = scratch / "summary.json"
        base_status, _, base_rss = _run_child("-", out)
        status, wall, rss = _run_child(str(home.root), out)
        if status != 0 or base_status != 0:
            raise HarnessError(f"rotation child exited with {status} (baseline {base_status})")
        summary = json.loads(out.read_text())
        rotation = summary["rotations"][0]
        archive = home.events_file.with_name(rotation["archive"])
        with open(home.events_file, "rb") as fh:
            live_lines = sum(1 for _ in fh)
        archived = _count_gz_lines(archive)
        return {
            "size_bytes": size, "lines": lines, "generate_s": round(generate_s, 2),
            "rotate_wall_s": round(wall, 2), "rotate_in_child_s":
                round(summary["child_wall_s"], 2),
            "peak_rss_mib": round(rss / 1024, 1),
            "baseline_rss_mib": round(base_rss / 1024, 1),
            "max_lock_hold_s": summary["max_lock_hold_s"],
            "archive_bytes": rotation["archive_bytes"],
            "compression_ratio": round(rotation["bytes_archived"]
                                       / max(1, rotation["archive_bytes"]), 1),
            "lines_archived": rotation["lines_archived"], "kept_lines": rotation["kept_lines"],
            "throughput_mib_s": round(size / (1 << 20) / max(wall, 1e-9), 1),
            "verified": archived + live_lines == lines + 1,  # +1: the janitor_run event
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
