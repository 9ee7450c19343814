"""``FileQueue.check``: the file backend's part of ``harness doctor`` (after diskcache's
``Cache.check(fix=)``). Findings use doctor's levels; repairs never delete data (a corrupt
file is moved to ``coordination/quarantine/``).

What it checks
- the journal: every whole line parses (``corrupt_journal``), no torn tail (``torn_journal``);
- task-queue.json parses (``corrupt_queue``) and agrees with the journal: replaying the
  compaction base (``task-queue.base.json``) and the journal up to the snapshot's revision
  gives exactly its tasks (``snapshot_mismatch``); a snapshot nobody published is a hand
  edit waiting for the next writer (``queue_hand_edit``, info);
- history holds every record the journal says was appended (``history_missing``: a power
  loss between the journal's fdatasync and the history file's writeback);
- a live task whose final history record exists (``interrupted_finish``), a task both live
  and dead-lettered (``dead_and_live``), a dedup key held twice, corrupt dead letters;
- inbox requests waiting (``inbox_pending``, info);
- a running task past its lease (``lease_expired``, :mod:`..leases`, shared with postgres).

``--repair`` rebuilds a corrupt or disagreeing snapshot from the base, the journal (also the
previous generation, ``task-queue.journal.prev``) and the inbox, and says what it could not
recover.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ... import clock
from ...config import load_system
from ...errors import CorruptFileError
from ...jsonl import iter_jsonl
from ...locks import lock_for
from ...store import dumps, move_aside, read_json, replace_json
from ...tasks import Task
from ..contract import Findings, QueueFinding
from ..leases import check_leases
from .journal import read_all
from .rebuild import base_state, replay
from .snapshot import parse

if TYPE_CHECKING:
    from .backend import FileQueue


def _quarantine(queue: FileQueue, path: Any, now: float) -> str:
    return move_aside(Path(path), queue.home.quarantine, clock.compact(now)).name


def check_queue(queue: FileQueue, *, repair: bool, now: float) -> list[QueueFinding]:
    home = queue.home
    out = Findings()
    add = out.add

    cfg = load_system(home)
    try:
        queue._view()  # read the journal's snapshot notes first
    except CorruptFileError:
        pass  # reported below
    header, lines, bad = read_all(home.queue_journal)
    if bad:
        add("error", "corrupt_journal", f"{home.queue_journal.name}: {bad} whole line(s) do not "
            "parse; they are skipped when the queue is rebuilt", home.queue_journal)
    if _torn_tail(home.queue_journal):
        f = add("warning", "torn_journal", f"{home.queue_journal.name}: its last line is torn (a "
                "crash mid-write); the next writer cuts it", home.queue_journal)
        if repair:
            queue.ingest(now=now)  # any transaction cuts it under the lock
            queue._transaction(now, lambda txn: None, drain=False)
            f.repaired = not _torn_tail(home.queue_journal)
    # The snapshot, and whether it agrees with the journal.
    try:
        snap = parse(home.queue_file)
        corrupt = None
    except CorruptFileError as exc:
        snap, corrupt = None, exc
    if corrupt is not None:
        f = add("error", "corrupt_queue", str(corrupt), home.queue_file)
        if repair:
            f.message += " -> " + _rebuild(queue, now, lines, header)
            f.repaired = True
    elif snap is not None:
        expected = replay(base_state(home), lines, upto=snap.revision)
        have = {task["task_id"]: blob for task, blob in snap.tasks()}
        want = expected.blobs
        differs = [t for t in set(have) | set(want)
                   if t not in have or t not in want
                   or orjson.loads(have[t]) != orjson.loads(want[t])]
        published = snap.sig == queue._snap_sig and queue._snap_rev >= 0
        if header is not None and isinstance(header.get("base"), int) \
                and header["base"] > snap.revision:
            add("info", "queue_hand_edit", f"task-queue.json shows revision {snap.revision}, "
                "older than the journal's start: it was restored or written by hand; the next "
                "queue operation applies the journal on top of it", home.queue_file)
        elif differs and published and expected.rev == snap.revision:
            f = add("error", "snapshot_mismatch",
                    f"task-queue.json (revision {snap.revision}) and the journal disagree on "
                    f"{len(differs)} task(s), e.g. {sorted(differs)[0]}", home.queue_file)
            if repair:
                f.message += " -> " + _rebuild(queue, now, lines, header)
                f.repaired = True
        elif differs:
            merged = snap.sig == queue._snap_sig
            add("info", "queue_hand_edit", f"task-queue.json was edited by hand ({len(differs)} "
                "task(s) differ from the journal at its revision); "
                + ("the edit is recorded in the journal and the file is republished within 1 s"
                   if merged else "the next queue operation records the edit"),
                home.queue_file)
    _check_history(queue, lines, add, repair)
    tasks = {t["task_id"]: t for t in queue.live_tasks()}
    _check_cross(queue, tasks, add, repair, now, cfg.durability)
    names = queue._inbox_names()
    if names:
        f = add("info", "inbox_pending", f"{len(names)} task request(s) wait in the inbox for "
                "the next queue operation", home.inbox)
        if repair:
            queue.ingest(now=now)
            f.repaired = True
    check_leases(queue, out, repair=repair, now=now)
    if repair:
        queue.sync()
    return out


def _torn_tail(path: Any) -> bool:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    zero = data.find(b"\0")
    data = data if zero < 0 else data[:zero]
    return bool(data) and not data.endswith(b"\n")


def _rebuild(queue: FileQueue, now: float, lines: list[dict[str, Any]],
             header: dict[str, Any] | None) -> str:
    """Quarantine task-queue.json and rebuild it from what survives: the compaction base
    (or the previous journal generation), the journal, the inbox. Returns what was done and
    what could not be recovered."""
    home = queue.home
    notes = []
    if home.queue_file.exists():
        notes.append(f"quarantined as {_quarantine(queue, home.queue_file, now)}")
    base = base_state(home)
    source = "the compaction base" if home.queue_base_file.exists() else \
        "the journal from its start"
    jbase = header.get("base") if header else 0
    lost = False
    if base.rev < (jbase or 0):
        _, prev_lines, _ = read_all(home.queue_journal.with_name(
            home.queue_journal.name + ".prev"))
        base = replay(base, prev_lines)
        source += " and the previous journal"
        lost = base.rev < (jbase or 0)
    state = replay(base, lines)
    if lost:
        notes.append(f"tasks unchanged since revision {jbase} (the last compaction) could "
                     "not be recovered: the compaction base is missing")
    data = {"version": 1, "revision": state.rev, "updated_at": clock.iso(now),
            "tasks": [orjson.loads(b) for b in state.blobs.values()]}
    with lock_for(home.lock_path("queue")).held_for(load_system(home).lock_timeout):
        replace_json(home.queue_file, data, load_system(home).durability)
        queue._state = None
    queue.ingest(now=now)
    notes.append(f"rebuilt {len(state.blobs)} live task(s) from {source} and "
                 f"{len(lines)} journal line(s), re-ingested the inbox")
    return "; ".join(notes)


def _check_history(queue: FileQueue, lines: list[dict[str, Any]], add: Any,
                   repair: bool) -> None:
    """Every journal line's history records are in task-history.jsonl where it put them."""
    home = queue.home
    try:
        st = os.stat(home.history_file)
    except FileNotFoundError:
        st = None
    missing: list[dict[str, Any]] = []
    with open(home.history_file, "rb") if st else _Null() as fh:
        for line in lines:
            hist, hpos = line.get("hist"), line.get("hpos")
            if not hist or not isinstance(hpos, list) or len(hpos) != 2:
                continue
            if st is None or hpos[0] != st.st_ino:
                continue  # rotated since: those lines were on disk to be rotated
            data = b"".join(dumps(r) + b"\n" for r in hist)
            fh.seek(hpos[1])
            if fh.read(len(data)) != data:
                missing.extend(hist)
    if missing:
        f = add("warning", "history_missing", f"{len(missing)} history record(s) the journal "
                "committed are not in task-history.jsonl (a power loss before the file was "
                "written back)", home.history_file)
        if repair:
            from ...store import append_bytes
            with lock_for(home.lock_path("history")).held_for(
                    load_system(home).lock_timeout):
                append_bytes(home.history_file,
                             b"".join(dumps(r) + b"\n" for r in missing),
                             load_system(home).durability)
            f.repaired = True


class _Null:
    def __enter__(self) -> Any:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _final_records(queue: FileQueue, wanted: set[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if not wanted:
        return found
    for _, record in iter_jsonl(queue.home.history_file):
        if record and record.get("final") and record.get("task_id") in wanted:
            found[record["task_id"]] = record
    return found


def _check_cross(queue: FileQueue, tasks: dict[str, Task], add: Any, repair: bool,
                 now: float, durability: Any) -> None:
    home = queue.home
    dead_ids = set()
    if home.dead_letters.is_dir():
        for name in sorted(os.listdir(home.dead_letters)):
            if not name.endswith(".json") or name.startswith("."):
                continue
            p = home.dead_letters / name
            try:
                letter = read_json(p)
                if not isinstance(letter, dict) or letter.get("task_id") != name[:-5]:
                    raise CorruptFileError(p, "task_id does not match the file name")
                dead_ids.add(name[:-5])
            except CorruptFileError as exc:
                f = add("error", "corrupt_dead_letter", str(exc), p)
                if repair:
                    _quarantine(queue, p, now)
                    f.repaired = True
    finals = _final_records(queue, set(tasks))
    interrupted: set[str] = set()
    for task_id, record in finals.items():
        task = tasks[task_id]
        if record.get("attempts") != task.get("attempts") \
                or record.get("started_at") != task.get("started_at"):
            continue  # requeued from dead letters since: the record is of an older run
        interrupted.add(task_id)
        f = add("warning", "interrupted_finish",
                f"task {task_id} is {task['status']} in the queue but history has its final "
                f"record ({record.get('status')}): a crash interrupted the move",
                home.queue_file)
        if repair:
            if record.get("status") == "failed" and not home.dead_letter(task_id).exists():
                letter = {k: v for k, v in record.items()
                          if k not in ("final", "outcome", "recorded_at", "result")}
                replace_json(home.dead_letter(task_id), letter, durability, pretty=True)
            status = str(record.get("status"))

            def drop(txn: Any, task_id: str = task_id, status: str = status) -> None:
                if txn.get(task_id) is not None:
                    txn.remove(task_id, status)
            queue._transaction(now, drop, drain=False)
            f.repaired = True
            tasks.pop(task_id, None)
    for task_id in sorted(dead_ids & set(tasks) - interrupted):
        add("error", "dead_and_live", f"task {task_id} is both live and a dead letter",
            home.dead_letter(task_id))
    seen: dict[str, str] = {}
    for task in tasks.values():
        key = task.get("dedup_key")
        if key:
            if key in seen:
                add("error", "duplicate_dedup_key", f"dedup_key {key!r} is held by "
                    f"{seen[key]} and {task['task_id']}", home.queue_file)
            seen[key] = task["task_id"]
        for dep in task.get("depends_on") or ():
            if dep == task["task_id"]:
                add("error", "self_dependency", f"task {dep} depends on itself")
