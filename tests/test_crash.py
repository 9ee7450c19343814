"""SIGKILL producers and claimers at random moments, round after round, then prove that
nothing acknowledged was lost and that doctor can bring the home back to clean.

Crash tests use durability "fsync" (the only mode that promises crash durability).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import ProcGroup, final_records, make_home, queue_on_disk, req

from coordination import doctor
from coordination.jsonl import read_jsonl
from coordination.paths import Home
from coordination.queue import TaskQueue

ROUNDS = 15
PRODUCERS = 3
CLAIMERS = 2


def assert_every_file_parses(home: Home) -> None:
    """Every coordination file parses; JSONL files may only have a torn last line."""
    for snapshot in (home.queue_file, home.queue_base_file):
        if snapshot.exists():
            json.loads(snapshot.read_bytes())
    if home.queue_journal.exists():
        # Every whole line parses; at most the last one is torn (bytes with no newline
        # before the zeros), which the next writer cuts.
        whole = home.queue_journal.read_bytes().split(b"\0", 1)[0]
        lines = whole.split(b"\n")
        for line in lines[:-1]:
            json.loads(line)
        assert b"\n" not in lines[-1]
    for folder in (home.inbox, home.dead_letters, home.specs_active, home.specs_completed,
                   home.config_dir):
        for path in folder.glob("*.json"):
            if not path.name.startswith("."):
                json.loads(path.read_bytes())
    if home.control_file.exists():
        json.loads(home.control_file.read_bytes())
    for path in (home.history_file, home.events_file, home.metrics_file):
        result = read_jsonl(path)
        if result.bad_lines:
            last_line = len(path.read_bytes().split(b"\n"))
            assert result.bad_lines == 1 and result.torn_tail, (path, result.bad_line_numbers)
            assert result.bad_line_numbers == [last_line], (path, result.bad_line_numbers)


def acknowledged(children: list[Any]) -> list[str]:
    return [line.split()[1] for c in children for line in c.lines() if line.startswith("ack ")]


def assert_acked_are_accounted_for(home: Home, acked: list[str], *, exactly_one: bool) -> None:
    queue = TaskQueue(home)
    live = set(queue_on_disk(home))
    finals = final_records(home)
    pending = {p.stem for p in home.inbox.glob("*.json")}  # submitted, not yet admitted
    for task_id in acked:
        assert queue.get(task_id) is not None or task_id in pending, \
            f"acknowledged task {task_id} was lost"
        places = (task_id in live) + (task_id in finals) + (task_id in pending)
        assert places >= 1, f"acknowledged task {task_id} is neither live nor finished"
        if exactly_one:
            assert places == 1, f"task {task_id} is both live and finished"
            assert len(finals.get(task_id, [])) <= 1


@pytest.mark.slow
def test_sigkill_rounds_lose_nothing_acknowledged(tmp_path: Path, procs: ProcGroup) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    print(f"crash test seed {seed}")
    # Reclaimed tasks must stay claimable at once and never run out of attempts here.
    home = make_home(tmp_path, durability="fsync", retry_backoff_base_s=0,
                     default_max_attempts=1000, max_queue_depth=100_000)
    acked: list[str] = []
    killed_claims = 0
    for rnd in range(ROUNDS):
        producers = [procs.python(f"r{rnd}-producer{i}", "producer.py", home.root,
                                  "--prefix", f"r{rnd}p{i}", "--seed", str(rng.randrange(1 << 30)),
                                  *(["--via-inbox"] if (rnd + i) % 2 else []))
                     for i in range(PRODUCERS)]
        claimers = [procs.python(f"r{rnd}-claimer{i}", "claimer.py", home.root,
                                 "--worker-id", f"worker-crash-r{rnd}-c{i}", "--spec")
                    for i in range(CLAIMERS)]
        children = producers + claimers
        for child in children:
            child.wait_for_line("ready", timeout=30)
        time.sleep(rng.uniform(0.05, 0.3))
        for child in children:
            child.kill()
        procs.reap(children, timeout=30)
        for child in children:
            assert child.popen.returncode == -9, (child.name, child.stderr())
        acked += acknowledged(producers)
        killed_claims += sum(1 for c in claimers for line in c.lines()
                             if line.startswith("claimed "))
        assert_every_file_parses(home)
        assert_acked_are_accounted_for(home, acked, exactly_one=False)
        report = doctor.check(home)
        assert report.ok, (rnd, report.as_dict())

    assert len(acked) > ROUNDS, "producers acknowledged too little work to test anything"
    assert len(set(acked)) == len(acked)
    assert killed_claims > 0

    repaired = doctor.check(home, repair=True)
    assert repaired.ok, repaired.as_dict()
    print(f"acked {len(acked)}, claims cut short {killed_claims}, repaired:",
          dict(Counter(f.code for f in repaired.findings if f.repaired)))
    after = doctor.check(home)
    assert after.clean, after.as_dict()
    assert not list(home.specs_active.glob("*.json")), "dead claimers' specs are still active"
    crashed = [json.loads(p.read_bytes()) for p in home.specs_completed.glob("*.json")]
    assert {s["exit_reason"] for s in crashed} <= {"crashed"}
    assert_acked_are_accounted_for(home, acked, exactly_one=True)
    queue = TaskQueue(home)
    assert all(t["status"] == "queued" for t in queue.live_tasks()), "orphans not reclaimed"

    # Run claimers to completion, without kills.
    finishers = [procs.python(f"finisher{i}", "claimer.py", home.root, "--worker-id",
                              f"worker-finish-{i}", "--spec", "--drain")
                 for i in range(CLAIMERS)]
    for child in finishers:
        assert child.wait(90) == 0, child.stderr()
    assert queue.live_tasks() == []
    assert queue.stats()["inbox_pending"] == 0
    assert queue.dead_letters() == []
    finals = final_records(home)
    for task_id in acked:
        records = finals.get(task_id, [])
        assert [r["status"] for r in records] == ["completed"], (task_id, records)
    assert [t for t, recs in finals.items() if len(recs) != 1] == []
    final_report = doctor.check(home)
    assert final_report.clean, final_report.as_dict()
    assert_every_file_parses(home)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["append-mid", "append-unsynced", "compact-before-journal",
                                   "compact-mid-journal"])
def test_sigkill_mid_journal_append_and_mid_compaction(tmp_path: Path, procs: ProcGroup,
                                                        point: str) -> None:
    """A SIGKILL at an exact point of a commit or of a compaction: every file stays valid,
    every acknowledged task is there, a torn journal line is never read as data, and the
    next writer and doctor bring the home back to clean."""
    home = make_home(tmp_path, durability="fsync")
    child = procs.python(f"crash-{point}", "crash_at.py", home.root, point)
    child.wait_for_line("go", timeout=30)
    procs.reap([child], timeout=30)
    assert child.popen.returncode == -9, child.stderr()
    acked = acknowledged([child])
    assert len(acked) == 5
    assert_every_file_parses(home)
    queue = TaskQueue(home)  # another process, after the crash
    live = {t["task_id"]: t for t in queue.live_tasks()}
    assert set(acked) <= set(live), "an acknowledged task was lost"
    if point == "append-mid":
        assert len(live) == 5  # the torn commit never happened
    queue.enqueue(req(description="after the crash"))  # a writer cuts any torn tail
    assert_every_file_parses(home)
    report = doctor.check(home, repair=True)
    assert report.ok, report.as_dict()
    after = doctor.check(home)
    assert after.clean, after.as_dict()
    fresh = {t["task_id"] for t in TaskQueue(home).live_tasks()}
    assert set(acked) <= fresh
    assert json.loads(home.queue_file.read_bytes())["revision"] == TaskQueue(home).stats()[
        "revision"]
