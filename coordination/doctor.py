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
  worker lets the next reclaim pass requeue it. ``stray_task_process``: a process on this
  host still running for a task attempt that is over (it escaped its worker's stop);
  ``--repair`` kills it.
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

import psutil

from . import clock
from .config import load_system, load_worker_types, migrate_worker_types_key
from .errors import ConfigError, CorruptFileError, HarnessError
from .hosts import host_id
from .jsonl import iter_jsonl
from .locks import lock_for
from .paths import LOCK_NAMES, Home
from .specs import WorkerSpec, complete_spec, liveness, orphan_proof, read_specs
from .store import move_aside, open_in_folder, read_json
from .tasks import Task

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
    _check_legacy_worker_types_key(home, report, repair)
    from .queue import open_queue  # local: the queue is the heaviest import

    queue = open_queue(home)
    tasks: dict[str, Task] | None
    try:
        for found in queue.check(repair=repair, now=ts):
            report.findings.append(Finding(found.level, found.code, found.message, found.path,
                                           found.repaired))
        tasks = {t["task_id"]: t for t in queue.live_tasks()}
    except CorruptFileError as exc:
        report.add("error", "corrupt_queue", str(exc), exc.path if isinstance(exc.path, str)
                   else str(exc.path))
        tasks = None
    if tasks is not None:
        _check_specs(home, report, tasks, queue if repair else None, ts,
                     cfg.values["heartbeat_timeout_s"])
        _check_stray_task_processes(home, report, tasks, repair)
    _check_temp_files(home, report, repair, ts)
    _check_web_token(home, report, repair)
    _check_links_and_modes(home, report, repair, ts)
    for path in (home.events_file, home.metrics_file, home.history_file):
        _check_jsonl(home, path, report, repair, ts)
    if home.quarantine.is_dir():
        for name in sorted(os.listdir(home.quarantine)):
            report.add("info", "quarantined", f"quarantined file {name} (inspect, then delete)",
                       home.quarantine / name)
    return report


def _check_legacy_worker_types_key(home: Home, report: Report, repair: bool) -> None:
    """worker-types.json still names its map ``types`` (read, but scripts that edit
    ``.worker_types`` would add an ignored key): a warning; --repair renames it as
    ``harness init`` does."""
    try:
        raw = read_json(home.worker_types_config)
    except (FileNotFoundError, CorruptFileError):
        return
    if not isinstance(raw, dict) or "types" not in raw:
        return
    f = report.add("warning", "legacy_worker_types_key",
                   f"{home.worker_types_config}: the map is under the legacy key 'types'; "
                   "`harness init` or `doctor --repair` renames it 'worker_types'",
                   home.worker_types_config)
    if repair and migrate_worker_types_key(home.worker_types_config):
        f.repaired = True


def _check_specs(home: Home, report: Report, tasks: dict[str, Task],
                 queue: Any, now: float, heartbeat_timeout: float) -> None:
    """Worker specs against the live tasks: corrupt specs, dead workers, orphaned and
    not-held tasks. ``queue`` (a QueueBackend) is given when repairing."""
    repair = queue is not None
    active: dict[str, WorkerSpec] = {}
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
    own_host = host_id()
    for task in list(tasks.values()):
        if task["status"] != "running" or task.get("host_id") not in (None, own_host):
            continue  # another host's task: its lease tells (the queue's lease_expired)
        owner = task.get("worker_id")
        proof = orphan_proof(task, active, dead_workers, completed_ids.__contains__, now,
                             heartbeat_timeout)
        if proof is None:
            continue
        f = report.add("warning", "orphaned_task", f"task {task['task_id']} is running on "
                       f"{owner}, which is dead: {proof}", home.queue_file)
        if queue is not None and isinstance(owner, str):
            from .queue.rules import lease_token  # local: the queue is a heavy import

            queue.reclaim(task["task_id"], reason=proof, worker_id=owner,
                          lease=lease_token(task), now=now)
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


def _not_held(task: Task, active: dict[str, WorkerSpec],
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


def stray_task_processes(home: Home, tasks: dict[str, Task]) \
        -> list[tuple[psutil.Process, str]]:
    """Processes on this host that a worker started for a task of ``home`` (their
    environment carries ``HARNESS_HOME`` and ``HARNESS_TASK_ID``, which every worker sets and
    children inherit) although that attempt is not running any more: the task is not live,
    not running, or running as another attempt or on another worker. A worker waits for
    every descendant of a task before it records the outcome (docs/security.md), so each is
    a process that escaped. Best effort: processes of other users cannot be read, and one
    that cleared its environment is not recognised."""
    root = str(home.root)
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("HARNESS_HOME") != root or not env.get("HARNESS_TASK_ID"):
            continue
        task_id = env["HARNESS_TASK_ID"]
        task = tasks.get(task_id)
        if task is not None and task.get("status") == "running" \
                and task.get("worker_id") == env.get("HARNESS_WORKER_ID") \
                and str(task.get("attempts")) == env.get("HARNESS_ATTEMPT"):
            continue
        state = "not live" if task is None else (
            f"{task.get('status')}, attempt {task.get('attempts')} on {task.get('worker_id')}")
        out.append((proc, f"pid {proc.pid} still runs for task {task_id} (attempt "
                          f"{env.get('HARNESS_ATTEMPT')} on {env.get('HARNESS_WORKER_ID')}), "
                          f"which is {state}"))
    return out


def _check_stray_task_processes(home: Home, report: Report, tasks: dict[str, Task],
                                repair: bool) -> None:
    for proc, message in stray_task_processes(home, tasks):
        f = report.add("warning", "stray_task_process",
                       message + ("; --repair kills it" if not repair else ""))
        if repair:
            try:
                proc.kill()  # psutil checks the start time: never a reused pid
                f.repaired = True
            except psutil.NoSuchProcess:
                f.repaired = True
            except psutil.Error:
                pass


def _check_web_token(home: Home, report: Report, repair: bool) -> None:
    """config/web-token, when present, must be a regular file only its owner may access
    (``harness web`` refuses it otherwise); --repair narrows the mode to 0600."""
    path = home.web_token_file
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        report.add("error", "web_token_not_file", f"{path} is not a regular file; harness web "
                   "refuses it (make it a plain file of mode 0600)", path)
        return
    if st.st_mode & 0o077:
        f = report.add("error", "web_token_mode", f"{path} has mode "
                       f"{stat.S_IMODE(st.st_mode):04o}: others may read the web token, and "
                       "harness web refuses it (chmod 600; consider a new token)", path)
        if repair:
            os.chmod(path, 0o600)
            f.repaired = True


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
