"""Reader child: read task-queue.json in a tight loop the way people and scripts do, count
torn reads, and measure how far the view is behind the queue.

    reader.py HOME --stop-file F

Alternates orjson and the stdlib json module, and every 25th read runs ``jq`` on the file
(when jq is installed). Staleness: the reader also tails the queue's journal (whole lines
only), so it knows when each revision was committed; a view that shows revision R while
R+1 exists has been behind since R+1's commit. Prints ``ready`` and, after the stop file
appears, one JSON line ``{"reads", "failures", "missing", "jq_reads", "max_behind_s",
"samples"}``. ``missing`` counts reads that found no file after it had once existed
(publish by rename never unlinks it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

from coordination import clock


class JournalTail:
    """Commit times by revision, from the whole lines of task-queue.journal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.ino: int | None = None
        self.at: dict[int, float] = {}

    def refresh(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                ino = __import__("os").fstat(fh.fileno()).st_ino
                if ino != self.ino:
                    self.ino, self.offset = ino, 0
                fh.seek(self.offset)
                data = fh.read(1 << 20)
        except FileNotFoundError:
            return
        data = data.split(b"\0", 1)[0]
        whole = data[:data.rfind(b"\n") + 1]
        for raw in whole.splitlines():
            if raw.startswith(b'{"rev":'):
                line = orjson.loads(raw)
                self.at[line["rev"]] = clock.parse_iso(line["at"])
        self.offset += len(whole)

    def behind(self, revision: int, now: float) -> float:
        """How long the newest commit after ``revision`` has existed (0 when none)."""
        newest = max(self.at, default=0)
        if newest <= revision:
            return 0.0
        first = min((r for r in self.at if r > revision), default=None)
        return max(0.0, now - self.at[first]) if first is not None else 0.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("home")
    parser.add_argument("--stop-file", required=True)
    args = parser.parse_args()
    home, stop = Path(args.home), Path(args.stop_file)
    path = home / "coordination" / "task-queue.json"
    tail = JournalTail(home / "coordination" / "task-queue.journal")
    jq = shutil.which("jq")
    reads = failures = missing = jq_reads = 0
    max_behind = 0.0
    seen_file = False
    samples: list[str] = []
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while not stop.exists():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            missing += seen_file
            time.sleep(0.001)
            continue
        seen_file = True
        reads += 1
        try:
            doc = orjson.loads(data) if reads % 2 else json.loads(data)
            if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
                raise ValueError("no tasks list")
        except ValueError as exc:
            failures += 1
            if len(samples) < 5:
                samples.append(f"{exc}: {data[:60]!r}...{data[-60:]!r}")
            continue
        now = time.time()
        tail.refresh()
        max_behind = max(max_behind, tail.behind(int(doc.get("revision", 0)), now))
        if jq is not None and reads % 25 == 0:
            proc = subprocess.run([jq, "-e", ".tasks | length >= 0", str(path)],
                                  capture_output=True, check=False)
            jq_reads += 1
            if proc.returncode != 0:
                failures += 1
                if len(samples) < 5:
                    samples.append(f"jq: {proc.stderr[:200]!r}")
        time.sleep(0.002)
    sys.stdout.write(json.dumps({"reads": reads, "failures": failures, "missing": missing,
                                 "jq_reads": jq_reads, "max_behind_s": round(max_behind, 3),
                                 "samples": samples}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
