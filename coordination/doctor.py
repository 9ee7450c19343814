"""``harness doctor``: check every invariant of a home, and optionally repair.

Modelled on diskcache's ``Cache.check(fix=False)``: :func:`check` returns findings; with
``repair=True`` it also fixes what it safely can and marks those findings ``repaired``.

Levels
- ``error``: an invariant is broken (a file does not parse, a task is in two places that
  cannot both be true, a duplicate id). Commands refuse to write over a corrupt queue.
- ``warning``: a state a crash legitimately leaves behind, which the next operation, the
  supervisor or ``--repair`` resolves (stale temp files, a running task whose worker is
  proven dead, a task whose move to history was interrupted, a torn last JSONL line).
  One warning is the operator's to resolve: ``task_not_held``, a running task whose live
  worker provably runs something else (e.g. after a restored queue revision). Its worker
  is alive, so neither the supervisor nor ``--repair`` takes the task; restarting the
  worker lets the next reclaim pass requeue it.
- ``info``: facts worth knowing (pending inbox files, quarantined files).

A report is *ok* when it has no errors and *clean* when it has no errors and no warnings.
Repairs never delete data: corrupt files are moved to ``coordination/quarantine/``.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import clock
from .config import load_system, load_worker_types
from .errors import ConfigError, CorruptFileError, HarnessError
from .locks import lock_for
from .paths import LOCK_NAMES, Home
from .specs import complete_spec, liveness, orphan_proof, read_specs
from .store import iter_jsonl, move_aside, open_in_folder, read_json, replace_bytes, replace_json
from .tasks import check_stored_task

STALE_TEMP_S = 3600.0


@dataclass
class Finding:
    level: str  # error | warning | info
    code: str
    message: str
    path: str | None = None
    repaired: bool = False


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, code: str, message: str, path: Path | str | None = None) -> Finding:
        finding = Finding(level, code, message, str(path) if path else None)
        self.findings.append(finding)
        return finding

    def open(self, level: str) -> list[Finding]:
        return [f for f in self.findings if f.level == level and not f.repaired]

    @property
    def ok(self) -> bool:
        return not self.open("error")

    @property
    def clean(self) -> bool:
        return self.ok and not self.open("warning")

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "clean": self.clean,
                "errors": len(self.open("error")), "warnings": len(self.open("warning")),
                "findings": [asdict(f) for f in self.findings]}


def _quarantine(home: Home, path: Path, now: float) -> Path:
    return move_aside(path, home.quarantine, clock.compact(now))


def _parse_queue_bytes(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and validate a queue file; raises CorruptFileError."""
    raw = read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list):
        raise CorruptFileError(path, "top level must be an object with a 'tasks' list")
    tasks: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for index, task in enumerate(raw["tasks"]):
        problems += check_stored_task(task, f"tasks[{index}]")
        if isinstance(task, dict) and task.get("task_id") in tasks:
            problems.append(f"tasks[{index}]: duplicate task_id {task['task_id']}")
        elif isinstance(task, dict) and isinstance(task.get("task_id"), str):
            tasks[task["task_id"]] = task
    if problems:
        raise CorruptFileError(path, "; ".join(problems[:5]))
    return tasks


def check(home: Home, *, repair: bool = False, now: float | None = None) -> Report:
    """Check the home's invariants (see module docstring); repair when asked.

    Holds the queue lock for the cross-checks so they see one consistent state.
    """
    ts = clock.now() if now is None else now
    report = Report()
    if not home.coordination.is_dir():
        report.add("error", "not_initialised", f"{home.root} has no coordination/ directory; "
                   "run `harness init`", home.coordination)
        return report
    for directory in home.directories():
        if not directory.is_dir():
            f = report.add("error" if not repair else "warning", "missing_dir",
                           f"missing directory {directory}", directory)
            if repair:
                directory.mkdir(parents=True, exist_ok=True)
                f.repaired = True
    for name in LOCK_NAMES:
        lock = home.lock_path(name)
        if not lock.exists():
            f = report.add("warning", "missing_lock", f"missing lock file {lock}", lock)
            if repair and home.locks.is_dir():
                os.close(os.open(lock, os.O_RDWR | os.O_CREAT, 0o600))
                f.repaired = True
    try:
        cfg = load_system(home)
        load_worker_types(home)
    except ConfigError as exc:
        report.add("error", "bad_config", str(exc))
        return report
    with lock_for(home.lock_path("queue")).held_for(cfg.lock_timeout):
        tasks = _check_queue(home, report, repair, ts)
        if tasks is not None:
            _check_cross(home, report, tasks, repair, ts, cfg.values["heartbeat_timeout_s"])
    _check_temp_files(home, report, repair, ts)
    _check_links_and_modes(home, report, repair, ts)
    for path in (home.events_file, home.metrics_file, home.history_file):
        _check_jsonl(home, path, report, repair, ts)
    if home.quarantine.is_dir():
        for name in sorted(os.listdir(home.quarantine)):
            report.add("info", "quarantined", f"quarantined file {name} (inspect, then delete)",
                       home.quarantine / name)
    return report


def _check_queue(home: Home, report: Report, repair: bool,
                 now: float) -> dict[str, dict[str, Any]] | None:
    path = home.queue_file
    if not path.exists():
        return {}
    try:
        return _parse_queue_bytes(path)
    except CorruptFileError as exc:
        finding = report.add("error", "corrupt_queue", str(exc), path)
    if not repair:
        return None
    prev_tasks: dict[str, dict[str, Any]] = {}
    try:
        prev_tasks = _parse_queue_bytes(home.queue_prev_file)
        source = "the previous revision"
    except (CorruptFileError, FileNotFoundError):
        source = "an empty queue (no good previous revision)"
    moved = _quarantine(home, path, now)
    from .queue import TaskQueue  # local: queue imports doctor-free modules only

    q = TaskQueue(home)
    data = {"version": 1, "revision": 0, "updated_at": clock.iso(now),
            "tasks": list(prev_tasks.values())}
    from .store import dumps

    replace_bytes(path, dumps(data) + b"\n", load_system(home).durability)
    # The tasks the lost revision admitted wait in inbox/.ingested/rev-N.jsonl: add them
    # again, except those that already finished (their final history record exists).
    replayed: list[dict[str, Any]] = []
    if home.inbox_ingested.is_dir():
        kept = [r for n in sorted(os.listdir(home.inbox_ingested)) if n.endswith(".jsonl")
                for _, r in iter_jsonl(home.inbox_ingested / n) if r and r.get("task_id")]
        finished = _final_records(home, {t["task_id"] for t in kept})
        replayed = [t for t in kept
                    if t["task_id"] not in finished and t["task_id"] not in prev_tasks]
    if replayed:
        def body(txn: Any) -> None:
            for task in replayed:
                task.update(status="queued", worker_id=None)
                txn.state.tasks[task["task_id"]] = task
                txn.touch(task)
        q._transaction(now, body, drain=False)
    q.ingest(now=now)
    finding.repaired = True
    finding.message += f" -> quarantined as {moved.name}, restored {source}, re-ingested inbox"
    if replayed:
        finding.message += f" (replayed {len(replayed)} request(s) of the lost revision)"
    return _parse_queue_bytes(path)


def _final_records(home: Home, wanted: set[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if not wanted:
        return found
    for _, record in iter_jsonl(home.history_file):
        if record and record.get("final") and record.get("task_id") in wanted:
            found[record["task_id"]] = record
    return found


def _check_cross(home: Home, report: Report, tasks: dict[str, dict[str, Any]], repair: bool,
                 now: float, heartbeat_timeout: float) -> None:
    from .queue import TaskQueue

    queue = TaskQueue(home) if repair else None
    # Dead letters: parse, and never also live.
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
                f = report.add("error", "corrupt_dead_letter", str(exc), p)
                if repair:
                    _quarantine(home, p, now)
                    f.repaired = True
    # Interrupted terminal moves: a live task with a final record of the same attempt.
    finals = _final_records(home, set(tasks))
    interrupted: set[str] = set()
    for task_id, record in finals.items():
        task = tasks[task_id]
        if record.get("attempts") != task.get("attempts") \
                or record.get("started_at") != task.get("started_at"):
            continue  # requeued from dead letters since: the record is of an older run
        interrupted.add(task_id)
        f = report.add("warning", "interrupted_finish",
                       f"task {task_id} is {task['status']} in the queue but history has its "
                       f"final record ({record.get('status')}): a crash interrupted the move",
                       home.queue_file)
        if repair and queue is not None:
            if record.get("status") == "failed" and not home.dead_letter(task_id).exists():
                # The crash came before the dead letter was written: write it now.
                letter = {k: v for k, v in record.items()
                          if k not in ("final", "outcome", "recorded_at", "result")}
                replace_json(home.dead_letter(task_id), letter,
                             load_system(home).durability, pretty=True)
            _drop_live(queue, task_id, now)
            f.repaired = True
            tasks.pop(task_id, None)
    for task_id in sorted(dead_ids & set(tasks) - interrupted):
        report.add("error", "dead_and_live", f"task {task_id} is both live and a dead letter",
                   home.dead_letter(task_id))
    # dedup keys unique among live tasks
    seen: dict[str, str] = {}
    for task in tasks.values():
        key = task.get("dedup_key")
        if key:
            if key in seen:
                report.add("error", "duplicate_dedup_key", f"dedup_key {key!r} is held by "
                           f"{seen[key]} and {task['task_id']}", home.queue_file)
            seen[key] = task["task_id"]
    # Specs: parse; prove dead workers; running tasks must belong to a live worker.
    active: dict[str, dict[str, Any]] = {}
    for item in read_specs(home):
        if item.spec is None:
            f = report.add("error", "corrupt_spec", item.error or "bad spec", item.path)
            if repair:
                _quarantine(home, item.path, now)
                f.repaired = True
            continue
        active[item.spec["worker_id"]] = item.spec
    completed_ids = {s.spec["worker_id"] for s in read_specs(home, completed=True) if s.spec}
    for worker_id in sorted(set(active) & completed_ids):
        f = report.add("warning", "spec_in_both", f"worker {worker_id} is both active and "
                       "completed (a crash interrupted the move)", home.specs_active)
        if repair:
            try:
                os.unlink(home.specs_active / f"{worker_id}.json")
            except FileNotFoundError:
                pass
            active.pop(worker_id, None)
            f.repaired = True
    dead_workers: dict[str, str] = {}
    for worker_id, spec in active.items():
        proof = liveness(spec, now, heartbeat_timeout)
        if proof:
            dead_workers[worker_id] = proof
    for task in list(tasks.values()):
        if task["status"] != "running":
            continue
        owner = task.get("worker_id")
        proof = orphan_proof(task, active, dead_workers, completed_ids.__contains__, now,
                             heartbeat_timeout)
        if proof is None:
            continue
        f = report.add("warning", "orphaned_task", f"task {task['task_id']} is running on "
                       f"{owner}, which is dead: {proof}", home.queue_file)
        if repair and queue is not None:
            queue.reclaim(task["task_id"], reason=proof, worker_id=owner, now=now)
            f.repaired = True
    for task in list(tasks.values()):
        reason = _not_held(task, active, dead_workers)
        if reason is None:
            continue
        # Reported, not repaired: the worker is alive, and the operator decides (restart
        # it; the next reclaim pass then requeues the task, "exited without finishing it").
        report.add("warning", "task_not_held", f"task {task['task_id']} is running on "
                   f"{task['worker_id']}, which is alive but {reason}: nothing will finish "
                   "it until that worker exits (restart it; the next reclaim pass requeues "
                   "the task)", home.specs_active / f"{task['worker_id']}.json")
    for worker_id, proof in sorted(dead_workers.items()):
        f = report.add("warning", "dead_worker", f"worker {worker_id} is dead ({proof}) but "
                       "its spec is still active", home.specs_active / f"{worker_id}.json")
        if repair:
            try:
                complete_spec(home, worker_id, "crashed", now)
                f.repaired = True
            except HarnessError:
                pass
    for task in tasks.values():
        for dep in task.get("depends_on") or ():
            if dep == task["task_id"]:
                report.add("error", "self_dependency", f"task {dep} depends on itself")
    # Inbox leftovers
    if home.inbox.is_dir():
        pending = [n for n in os.listdir(home.inbox) if n.endswith(".json")
                   and not n.startswith(".")]
        if pending:
            f = report.add("info", "inbox_pending", f"{len(pending)} task request(s) wait in "
                           "the inbox for the next queue operation", home.inbox)
            if repair and queue is not None:
                queue.ingest(now=now)
                f.repaired = True


def _not_held(task: dict[str, Any], active: dict[str, dict[str, Any]],
              dead_workers: dict[str, str]) -> str | None:
    """Why a running task is provably not held by its owner, a live active worker; None
    when it is held, or when that cannot be proven.

    A worker claims (the queue's ``started_at`` = the claim instant) and only then writes
    its spec naming the task, with ``heartbeat_at`` = that same instant; until then the spec
    names nothing or its previous task. So the spec proves the worker has let go only when
    it was written strictly after the claim (``heartbeat_at`` > ``started_at``) and names
    another task or none. An unparseable timestamp proves nothing (fail closed).
    """
    if task.get("status") != "running":
        return None
    owner = task.get("worker_id")
    spec = active.get(owner) if isinstance(owner, str) else None
    if spec is None or owner in dead_workers:
        return None  # no spec or dead: orphaned_task's business
    current = spec.get("current_task_id")
    if current == task["task_id"]:
        return None
    beat, started = spec.get("heartbeat_at"), task.get("started_at")
    try:
        after_claim = clock.parse_iso(str(beat)) > clock.parse_iso(str(started))
    except ValueError:
        return None
    if not after_claim:
        return None  # the spec may predate the claim: a worker between claim and update
    doing = f"runs {current}" if current else f"is {spec.get('state')} with no task"
    return f"its spec (heartbeat {beat}, after the claim at {started}) says it {doing}"


def _drop_live(queue: Any, task_id: str, now: float) -> None:
    """Finish an interrupted move: remove a live task whose final record is written."""
    def body(txn: Any) -> None:
        if task_id in txn.state.tasks:
            txn.state.remove(task_id)
            txn.changed = True
    queue._transaction(now, body, drain=False)


def _check_temp_files(home: Home, report: Report, repair: bool, now: float) -> None:
    folders = [home.coordination, home.inbox, home.dead_letters, home.specs_active,
               home.specs_completed, home.config_dir]
    wall = time.time()
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if not entry.name.startswith(".") or ".tmp" not in entry.name:
                continue
            age = wall - entry.stat().st_mtime
            if age < STALE_TEMP_S:
                continue
            f = report.add("warning", "stale_temp", f"leftover temp file {entry.name} "
                           f"({age / 3600:.1f} h old): a writer died mid-publish", entry.path)
            if repair:
                os.unlink(entry.path)
                f.repaired = True


def _check_links_and_modes(home: Home, report: Report, repair: bool, now: float) -> None:
    """Symbolic links anywhere in the home (harness never follows them: a write through
    one is refused), and modes wider than the contract: folders 0700 (2750 in a home
    shared with a group), files 0600 (0640 shared); never anything for others, never
    group write. ``--repair`` quarantines a link (the link itself, not its target) and
    sets the expected mode (and the home's group, when shared)."""
    shared = home.shared()
    dir_mode = home.expected_dir_mode()
    file_mode = 0o640 if shared else 0o600
    group = home.root.stat().st_gid if shared else None
    too_wide = 0o027 if shared else 0o077
    for folder, dirs, files in os.walk(home.root):
        base = Path(folder)
        for name in [*dirs, *files]:
            path = base / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode) and base != home.quarantine:
                f = report.add("error", "symlink", f"{path} is a symbolic link (to "
                               f"{os.readlink(path)!r}): harness refuses to write through "
                               "it; replace it with a real file or folder", path)
                if repair:
                    _quarantine(home, path, now)
                    f.repaired = True
                continue
            if stat.S_ISLNK(st.st_mode):
                continue  # a quarantined link (listed as quarantined)
            is_dir = stat.S_ISDIR(st.st_mode)
            if (st.st_mode & too_wide) == 0 and (not shared or st.st_gid == group):
                continue
            want = dir_mode if is_dir else file_mode
            f = report.add("warning", "bad_mode", f"{path} has mode "
                           f"{stat.S_IMODE(st.st_mode):04o}; expected {want:04o}"
                           + (" and the home's group" if shared else ""), path)
            if repair and st.st_uid == os.geteuid():
                if group is not None:
                    os.chown(path, -1, group)
                os.chmod(path, want)
                f.repaired = True
    try:
        st = home.root.stat()
    except FileNotFoundError:
        return
    if st.st_mode & too_wide:
        f = report.add("warning", "bad_mode", f"{home.root} has mode "
                       f"{stat.S_IMODE(st.st_mode):04o}; expected {dir_mode:04o}", home.root)
        if repair:
            os.chmod(home.root, dir_mode)
            f.repaired = True


def _check_jsonl(home: Home, path: Path, report: Report, repair: bool, now: float) -> None:
    bad: list[int] = []
    last = 0
    for number, obj in iter_jsonl(path):
        last = number
        if obj is None:
            bad.append(number)
    if not bad:
        return
    torn_tail = bad[-1] == last and _ends_without_newline(path)
    inner = [n for n in bad if not (torn_tail and n == last)]
    if inner:
        report.add("warning", "bad_jsonl_lines", f"{path.name}: {len(inner)} unparseable "
                   f"line(s), first at line {inner[0]}; readers skip them", path)
    if torn_tail:
        f = report.add("warning", "torn_tail", f"{path.name}: line {last} is torn (no "
                       "newline): a writer died mid-append", path)
        if repair:
            _cut_torn_tail(home, path, now)
            f.repaired = True


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def _cut_torn_tail(home: Home, path: Path, now: float) -> None:
    """Move a torn last line to ``NAME.corrupt`` (under the file's lock)."""
    lock = {"dashboard-events.jsonl": "events", "metrics-snapshots.jsonl": "metrics",
            "task-history.jsonl": "history"}[path.name]
    with lock_for(home.lock_path(lock)).held_for(load_system(home).lock_timeout), \
            os.fdopen(open_in_folder(path, os.O_RDWR), "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            block = min(size, 1 << 20)
            fh.seek(size - block)
            tail = fh.read(block)
            cut = tail.rfind(b"\n") + 1
            fragment = tail[cut:]
            if not fragment:  # the line was whole by the time we held the lock
                return
            corrupt = open_in_folder(path.with_name(path.name + ".corrupt"),
                                     os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(corrupt, fragment + b"\n")
            finally:
                os.close(corrupt)
            fh.truncate(size - block + cut)
