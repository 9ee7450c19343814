"""Reader child: parse task-queue.json in a tight loop and count parse failures.

    reader.py HOME --stop-file F

Alternates orjson and the stdlib json module. Prints ``ready`` and, after the stop file
appears, one JSON line ``{"reads", "failures", "missing", "samples"}``. ``missing`` counts
reads that found no file after it had once existed (publish by rename never unlinks it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import orjson


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("home")
    parser.add_argument("--stop-file", required=True)
    args = parser.parse_args()
    home, stop = Path(args.home), Path(args.stop_file)
    path = home / "coordination" / "task-queue.json"
    reads = failures = missing = 0
    seen_file = False
    samples: list[str] = []
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while not stop.exists():
        for _ in range(20):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                missing += seen_file
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
    sys.stdout.write(json.dumps({"reads": reads, "failures": failures, "missing": missing,
                                 "samples": samples}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
