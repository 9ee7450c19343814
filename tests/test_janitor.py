"""The janitor: rotation under concurrent appends, generations, retention, torn lines,
dry run, crash recovery, disk full, and the logrotate / systemd files that go with it."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers
import orjson
import pytest
from click.testing import CliRunner
from helpers import skip_reason

from coordination import rotation
from coordination.errors import DiskFull, LockTimeout
from coordination.events import Event, append_events, emit, make_event
from coordination.jsonl import read_jsonl
from coordination.locks import lock_for
from coordination.paths import Home
from coordination.store import append_bytes, dumps, read_json, replace_json
from daemons.cli import cli
from daemons.janitor import run as janitor
from daemons.janitor.run import (
    TMP_TAG,
    JanitorDiskFull,
    JanitorError,
    Rotated,
    rotated_files,
    run_janitor,
)
from daemons.systemd_units import render_unit

REPO = Path(__file__).resolve().parents[1]
PROCS = Path(__file__).resolve().parent / "procs"
EMIT_SCRIPT = REPO / "scripts" / "emit-event.sh"
DAY = 86400.0


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def make_home(home_factory: Callable[..., Home]) -> Callable[..., Home]:
    """``make_home(root=None, **system_overrides)``: conftest's ``home_factory``, or the
    shared ``helpers.make_home`` at ``root`` when given."""

    def make(root: Path | None = None, **overrides: Any) -> Home:
        if root is None:
            return home_factory(**overrides)
        return helpers.make_home(root.parent, root.name, **overrides)

    return make


class Spawner:
    """Children in their own sessions, killed and reaped at teardown whatever happened."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.workdir / f"{name}.out", "wb") as out, \
                open(self.workdir / f"{name}.err", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=env, start_new_session=True)
        self.children.append((name, proc))
        return proc

    def python(self, name: str, script: str, *args: object) -> subprocess.Popen[bytes]:
        return self.start(name, [sys.executable, str(PROCS / script), *map(str, args)])

    def stdout(self, name: str) -> str:
        return (self.workdir / f"{name}.out").read_text()

    def stderr(self, name: str) -> str:
        return (self.workdir / f"{name}.err").read_text()

    def close(self) -> None:
        for _, proc in self.children:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for _, proc in self.children:
            proc.wait(30)


@pytest.fixture
def spawner(tmp_path: Path) -> Iterator[Spawner]:
    group = Spawner(tmp_path / "procs")
    try:
        yield group
    finally:
        group.close()


# ---------------------------------------------------------------------------- helpers
def rotated(home: Home, key: str) -> Rotated:
    return next(r for r in rotated_files(home) if r.key == key)


def append_records(home: Home, key: str, records: list[dict[str, Any]]) -> None:
    """Append like the writers do: one write of whole lines under the file's lock."""
    if key == "events":
        append_events(home, [make_event("t", message=orjson.dumps(r).decode(), data=r)
                             for r in records])
        return
    r = rotated(home, key)
    with lock_for(home.lock_path(key)).held_for(10):
        append_bytes(r.path, b"".join(dumps(x) + b"\n" for x in records), "none")


def payload(obj: dict[str, Any]) -> dict[str, Any]:
    """The record a test appended: the event's data for events, the object itself else."""
    return obj["data"] if "event_id" in obj else obj


def file_lines(path: Path) -> list[bytes]:
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else \
        path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path} does not end with a newline"
    return data.splitlines()


def all_records(r: Rotated) -> list[dict[str, Any]]:
    """Every line of every archive (oldest first) then of the live file, each parsed; fails
    on any line that is not a JSON object."""
    out = []
    paths = [p for _, p in sorted(r.generations().items(), reverse=True)]
    if r.path.exists():
        paths.append(r.path)
    for path in paths:
        for number, raw in enumerate(file_lines(path), start=1):
            obj = orjson.loads(raw)
            assert isinstance(obj, dict), f"{path}:{number}: {raw!r}"
            out.append(obj)
    return out


def leftovers(home: Home) -> list[str]:
    """Temp files and journals a janitor could leave behind."""
    return sorted(n for n in os.listdir(home.coordination)
                  if TMP_TAG in n or n.endswith(".rotation") or ".tmp" in n)


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int, int]]:
    """Every file and directory under ``root``: content (files), mtime_ns, mode."""
    out: dict[str, tuple[bytes | None, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(path, root)] = (content, st.st_mtime_ns, st.st_mode)
    st = os.lstat(root)
    out["."] = (None, st.st_mtime_ns, st.st_mode)
    return out


def make_old(path: Path, now: float, days: float) -> None:
    """Set the mtime of ``path`` and everything under it to ``days`` before ``now``."""
    when = now - days * DAY
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in [*dirnames, *filenames]:
                os.utime(os.path.join(dirpath, name), (when, when))
    os.utime(path, (when, when))


def janitor_events(home: Home) -> list[dict[str, Any]]:
    return [e for e in all_records(rotated(home, "events")) if e.get("type") == "janitor_run"]


# ---------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_concurrent_appends_survive_repeated_rotation(make_home: Callable[..., Home],
                                                      spawner: Spawner,
                                                      tmp_path: Path) -> None:
    """Python, CLI and (if present) emit-event.sh writers append while two janitors rotate
    over and over: afterwards archives + live file hold every emitted event exactly once."""
    home = make_home(events_max_lines=100, events_keep_lines=20, archive_generations=1000,
                     durability="none", lock_timeout_s=60)
    emitters = [("py1", "python", 400, 0.003), ("py2", "python", 400, 0.003),
                ("cli", "cli", 12, 0.0)]
    if EMIT_SCRIPT.exists() and shutil.which("flock"):
        emitters += [("sh1", "script", 150, 0.0), ("sh2", "script", 150, 0.0)]
    procs = [spawner.python(name, "janitor_emitter.py", home.root, mode, count, name, pause)
             for name, mode, count, pause in emitters]
    stop = tmp_path / "stop"
    other_janitor = spawner.python("janitor-loop", "janitor_loop.py", home.root, stop)
    runs = 0
    deadline = time.monotonic() + 90
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "emitters did not finish"
        run_janitor(home, time.time())
        runs += 1
        time.sleep(0.01)
    stop.touch()
    assert other_janitor.wait(60) == 0, spawner.stderr("janitor-loop")
    for (name, _, count, _), proc in zip(emitters, procs, strict=True):
        assert proc.returncode == 0, spawner.stderr(name)
        assert len(spawner.stdout(name).split()) == count, spawner.stderr(name)
    run_janitor(home, time.time())

    emitted = [line for name, *_ in emitters for line in spawner.stdout(name).split()]
    assert len(emitted) > 1000
    r = rotated(home, "events")
    assert len(r.generations()) >= 5, "the janitor should have rotated many times"
    ids = Counter(e["event_id"] for e in all_records(r) if e["type"] == "t")
    assert [i for i, n in ids.items() if n > 1] == []
    assert set(ids) == set(emitted)
    assert sum(ids.values()) == len(emitted)
    assert not r.corrupt.exists()
    assert leftovers(home) == []
    assert runs > 3 and "runs " in spawner.stdout("janitor-loop")


def test_append_during_unlocked_copy_lands_in_new_live_file(
        make_home: Callable[..., Home], spawner: Spawner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While the janitor streams the archive, it does not hold events.lock: another process
    appends then, and that line ends up once, in the new live file."""
    home = make_home(events_max_lines=50, events_keep_lines=10, lock_timeout_s=10)
    emitted = [emit(home, "t", message=str(i))["event_id"] for i in range(80)]
    r = rotated(home, "events")
    seen = []

    def hook(step: str, path: Path) -> None:
        if step == "archive_written" and path == r.path:
            assert not lock_for(home.lock_path("events")).held
            child = spawner.python("meanwhile", "janitor_emitter.py", home.root, "python", 3,
                                   "meanwhile")
            assert child.wait(30) == 0, spawner.stderr("meanwhile")
            seen.extend(spawner.stdout("meanwhile").split())

    monkeypatch.setattr(rotation, "_checkpoint", hook)
    summary = run_janitor(home, time.time())
    assert len(seen) == 3
    (rot,) = summary["rotations"]
    assert rot["lines_archived"] == 70 and rot["kept_lines"] == 10
    assert rot["appended_meanwhile_bytes"] > 0
    live_ids = [e["event_id"] for e in read_jsonl(r.path).records if e["type"] == "t"]
    assert live_ids == emitted[-10:] + seen
    ids = Counter(e["event_id"] for e in all_records(r) if e["type"] == "t")
    assert set(ids) == set(emitted + seen) and max(ids.values()) == 1


# ---------------------------------------------------------------------------- rotation
@pytest.mark.parametrize("key", ["events", "metrics", "history"])
def test_generations_shift_and_drop_the_oldest(make_home: Callable[..., Home],
                                               key: str) -> None:
    home = make_home(**{f"{key}_max_lines": 10, f"{key}_keep_lines": 0,
                        "archive_generations": 3})
    r = rotated(home, key)
    for round_ in range(1, 6):
        append_records(home, key, [{"round": round_, "i": i} for i in range(12)])
        summary = run_janitor(home, time.time())
        assert [rot["file"] for rot in summary["rotations"]] == [r.path.name]
        assert summary["archives_deleted"] == (1 if round_ > 3 else 0)
    assert sorted(r.generations()) == [1, 2, 3]
    for gen, round_ in ((1, 5), (2, 4), (3, 3)):
        records = [payload(orjson.loads(raw)) for raw in file_lines(r.archive(gen))]
        got = [(x["round"], x["i"]) for x in records if "round" in x]
        assert got == [(round_, i) for i in range(12)], f"generation {gen}"
    # Lowering archive_generations drops the excess at the next run, rotation due or not.
    cfg = read_json(home.system_config)
    cfg["archive_generations"] = 1
    replace_json(home.system_config, cfg, pretty=True)
    summary = run_janitor(home, time.time())
    assert summary["rotations"] == [] and summary["archives_deleted"] == 2
    assert sorted(r.generations()) == [1]


def test_line_and_byte_limits(make_home: Callable[..., Home]) -> None:
    home = make_home(metrics_max_lines=100, metrics_keep_lines=30)
    r = rotated(home, "metrics")
    append_records(home, "metrics", [{"n": i} for i in range(100)])
    assert run_janitor(home, time.time())["rotations"] == []  # 100 lines: not over
    append_records(home, "metrics", [{"n": i} for i in range(100, 150)])
    summary = run_janitor(home, time.time())
    assert summary["lines_archived"] == 120 and summary["bytes_freed"] > 0
    assert [x["n"] for x in read_jsonl(r.path).records] == list(range(120, 150))
    assert [orjson.loads(x)["n"] for x in file_lines(r.archive(1))] == list(range(120))

    # By size: the kept tail is capped at max_bytes/2, whatever keep_lines says.
    home = make_home(history_max_bytes=2048, history_max_lines=10**6,
                     history_keep_lines=10**6)
    r = rotated(home, "history")
    append_records(home, "history", [{"n": i, "pad": "x" * 80} for i in range(30)])
    size = r.path.stat().st_size
    assert size > 2048
    (rot,) = run_janitor(home, time.time())["rotations"]
    assert "history_max_bytes" in rot["reason"]
    assert 0 < r.path.stat().st_size <= 1024
    assert [x["n"] for x in all_records(r)] == list(range(30))


def test_torn_last_line_moves_to_corrupt(make_home: Callable[..., Home]) -> None:
    home = make_home(history_max_lines=10, history_keep_lines=5)
    r = rotated(home, "metrics")
    append_records(home, "metrics", [{"n": i} for i in range(5)])
    good = r.path.read_bytes()
    with open(r.path, "ab") as fh:
        fh.write(b'{"torn": tr')
    summary = run_janitor(home, time.time())
    assert summary["torn_lines_repaired"] == 1
    assert summary["torn"] == [{"file": r.path.name, "offset": len(good), "bytes": 11,
                                "moved_to": r.corrupt.name}]
    assert r.path.read_bytes() == good
    assert r.corrupt.read_bytes() == b'{"torn": tr\n'
    assert run_janitor(home, time.time())["torn_lines_repaired"] == 0
    (event,) = [e for e in janitor_events(home) if e["data"]["torn_lines_repaired"]]
    assert event["severity"] == "warning"

    # A torn line together with a due rotation: repaired first, then rotated.
    h = rotated(home, "history")
    append_records(home, "history", [{"n": i} for i in range(30)])
    with open(h.path, "ab") as fh:
        fh.write(b'{"n": 30, "half')
    summary = run_janitor(home, time.time())
    assert summary["torn_lines_repaired"] == 1 and summary["lines_archived"] == 25
    assert [x["n"] for x in all_records(h)] == list(range(30))
    assert h.corrupt.read_bytes() == b'{"n": 30, "half\n'


def _busy_home(make_home: Callable[..., Home], now: float) -> Home:
    """A home where a run has everything to do: rotations, a torn line, old files, an
    excess archive generation, a stale temp file."""
    home = make_home(events_max_lines=20, events_keep_lines=5, metrics_max_lines=20,
                     metrics_keep_lines=0, history_max_lines=10, history_keep_lines=3,
                     archive_generations=2)
    append_records(home, "events", [{"n": i} for i in range(40)])
    append_records(home, "metrics", [{"n": i} for i in range(25)])
    append_records(home, "history", [{"n": i} for i in range(15)])
    with open(home.history_file, "ab") as fh:
        fh.write(b'{"torn')
    r = rotated(home, "events")
    for gen in (1, 2, 3):
        r.archive(gen).write_bytes(gzip.compress(b'{"old": %d}\n' % gen))
    (home.coordination / f".{r.path.name}{TMP_TAG}1-dead").write_bytes(b"stale")
    for name in ("t-old-1", "t-old-2"):
        (home.results / name).mkdir()
        (home.results / name / "out.txt").write_text("result")
        make_old(home.results / name, now, 40)
        home.task_log(name).write_text("log\n")
        make_old(home.task_log(name), now, 20)
    spec = home.specs_completed / "worker-1-old.json"
    spec.write_text("{}\n")
    make_old(spec, now, 8)
    return home


def test_dry_run_changes_nothing_and_predicts_the_real_run(
        make_home: Callable[..., Home]) -> None:
    now = time.time()
    home = _busy_home(make_home, now)
    before = snapshot(home.root)
    dry = run_janitor(home, now, dry_run=True)
    assert snapshot(home.root) == before
    assert dry["dry_run"] is True
    assert dry["files_pruned"] == 5 and dry["torn_lines_repaired"] == 1
    assert dry["lines_archived"] == 35 + 25 + 12 and dry["archives_deleted"] == 2  # .3, .2
    assert dry["temp_files_removed"] == 1
    assert not any(e["type"] == "janitor_run" for e in read_jsonl(home.events_file).records)

    real = run_janitor(home, now)
    keys = ("bytes_freed", "lines_archived", "files_pruned", "torn_lines_repaired",
            "archives_deleted", "temp_files_removed", "pruned")
    assert {k: real[k] for k in keys} == {k: dry[k] for k in keys}
    assert [(x["file"], x["lines_archived"], x["archive_bytes"]) for x in real["rotations"]] \
        == [(x["file"], x["lines_archived"], x["archive_bytes"]) for x in dry["rotations"]]
    (event,) = janitor_events(home)
    assert event["source"] == "janitor"
    assert event["data"]["files_pruned"] == 5 and event["data"]["dry_run"] is False
    assert leftovers(home) == []


def test_pruning_keeps_live_tasks_and_dead_letters(make_home: Callable[..., Home]) -> None:
    from coordination.queue import TaskQueue

    now = time.time()
    home = make_home(retention_results_days=30, retention_task_logs_days=14,
                     retention_completed_specs_days=7)
    live_id = TaskQueue(home).enqueue({"command": ["true"]}).task["task_id"]
    dead_id = "t-dead-letter"
    replace_json(home.dead_letter(dead_id), {"task_id": dead_id})
    for task_id in (live_id, dead_id, "t-finished", "t-recent"):
        (home.results / task_id).mkdir()
        (home.results / task_id / "result.json").write_text("{}\n")
        home.task_log(task_id).write_text("output\n")
        if task_id != "t-recent":
            make_old(home.results / task_id, now, 31)
            make_old(home.task_log(task_id), now, 15)
        else:
            make_old(home.results / task_id, now, 29)
            make_old(home.task_log(task_id), now, 13)
    # A result directory with one fresh file inside is not old, whatever its own mtime.
    (home.results / "t-fresh-inside").mkdir()
    (home.results / "t-fresh-inside" / "late.txt").write_text("x")
    make_old(home.results / "t-fresh-inside", now, 60)
    os.utime(home.results / "t-fresh-inside" / "late.txt", (now, now))
    for name, days in (("w-old.json", 8), ("w-new.json", 6)):
        (home.specs_completed / name).write_text("{}\n")
        make_old(home.specs_completed / name, now, days)

    summary = run_janitor(home, now)
    assert summary["pruned"] == {"completed_specs": 1, "results": 1, "task_logs": 1}
    assert sorted(os.listdir(home.results)) == sorted([live_id, dead_id, "t-recent",
                                                       "t-fresh-inside"])
    assert sorted(os.listdir(home.task_logs)) == sorted(
        f"{t}.log" for t in (live_id, dead_id, "t-recent"))
    assert os.listdir(home.specs_completed) == ["w-new.json"]
    assert summary["bytes_freed"] == len("{}\n") + len("output\n") + len("{}\n")


def test_pruning_refuses_when_the_queue_is_unreadable(make_home: Callable[..., Home]) -> None:
    now = time.time()
    home = make_home()
    (home.results / "t-x").mkdir()
    make_old(home.results / "t-x", now, 100)
    home.queue_file.write_text("{not json")
    with pytest.raises(janitor.JanitorError, match="nothing was pruned"):
        run_janitor(home, now)
    assert (home.results / "t-x").exists()


# ---------------------------------------------------------------------------- crashes
@pytest.mark.parametrize("step", ["archive_written", "journal_written", "archive_published",
                                  "live_published"])
def test_crash_at_any_step_loses_and_duplicates_nothing(make_home: Callable[..., Home],
                                                        spawner: Spawner, step: str) -> None:
    home = make_home(events_max_lines=30, events_keep_lines=10)
    emitted = [e["event_id"] for e in append_many(home, 50)]
    r = rotated(home, "events")
    child = spawner.python("crash", "janitor_crash.py", home.root, step)
    assert child.wait(60) == 9, spawner.stderr("crash")
    # Nothing lost at any instant (duplicates only while a journal says so).
    ids = Counter(e["event_id"] for e in all_records(r) if e["type"] == "t")
    assert set(ids) == set(emitted)
    if max(ids.values()) > 1:
        assert step == "archive_published" and r.journal.exists()
    before = snapshot(home.root)
    dry = run_janitor(home, time.time(), dry_run=True)
    assert snapshot(home.root) == before
    summary = run_janitor(home, time.time())
    assert dry["recovered"] == summary["recovered"]
    assert leftovers(home) == []
    ids = Counter(e["event_id"] for e in all_records(r) if e["type"] == "t")
    assert set(ids) == set(emitted) and max(ids.values()) == 1
    if step in ("archive_published", "live_published"):
        assert [x["file"] for x in summary["recovered"]] == [r.path.name]
    if step == "archive_published":
        assert summary["recovered"][0]["action"].startswith("rolled forward")
    if step == "journal_written":
        assert summary["recovered"][0]["action"].startswith("rolled back")


def append_many(home: Home, n: int) -> list[Event]:
    events = [make_event("t", message=str(i)) for i in range(n)]
    append_events(home, events)
    return events


# ---------------------------------------------------------------------------- disk full
class FailingWrites:
    """An ``os.write`` that lets ``budget`` bytes through to files under ``root`` (a short
    write at the edge, like a filling disk), then raises ENOSPC for them."""

    def __init__(self, root: Path, budget: int) -> None:
        self.root = str(root) + os.sep
        self.budget = budget
        self.real = os.write
        self.failures = 0

    def __call__(self, fd: int, data: Any) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(self.root):
            return self.real(fd, data)
        if self.budget <= 0:
            self.failures += 1
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        view = memoryview(data)[: self.budget]
        written = self.real(fd, view)
        self.budget -= written
        return written


def _all_jsonl_valid(home: Home) -> None:
    for r in rotated_files(home):
        if r.path.exists():
            got = read_jsonl(r.path)
            assert got.bad_lines == 0 and not got.torn_tail, r.path
        all_records(r)
    read_json(home.system_config)


@pytest.mark.parametrize("where", ["archive_start", "archive_middle", "tail_copy", "journal",
                                   "event"])
def test_disk_full_keeps_files_intact_and_still_frees_space(
        make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    now = time.time()
    home = make_home(events_max_lines=500, events_keep_lines=200, archive_generations=2)
    append_many(home, 1500)
    r = rotated(home, "events")
    r.archive(1).write_bytes(gzip.compress(b'{"older": 1}\n'))
    r.archive(2).write_bytes(gzip.compress(b'{"older": 2}\n'))
    (home.results / "t-old").mkdir()
    (home.results / "t-old" / "big").write_bytes(b"x" * 100_000)
    make_old(home.results / "t-old", now, 100)
    plan = run_janitor(home, now, dry_run=True)["rotations"][0]
    archive, kept = plan["archive_bytes"], plan["kept_bytes"]
    budget = {"archive_start": 0, "archive_middle": archive // 2,
              "tail_copy": archive + kept // 2, "journal": archive + kept + 10,
              "event": 10**9}[where]
    live_before = r.path.read_bytes()
    fake = FailingWrites(home.root, budget)
    if where == "event":  # the rotation succeeds; the final append of the event fails
        def fail_events(step: str, path: Path) -> None:
            if step == "live_published":
                fake.budget = 0
        monkeypatch.setattr(rotation, "_checkpoint", fail_events)
    monkeypatch.setattr(os, "write", fake)
    with pytest.raises(DiskFull, match="no space left") as info:
        run_janitor(home, now)
    monkeypatch.undo()
    assert isinstance(info.value, JanitorDiskFull) and info.value.exit_code == 1
    summary = info.value.summary
    # Deletions happened first and need no space: the old results are gone, and so is the
    # generation this rotation would have pushed out (.2).
    assert summary["files_pruned"] == 1 and not (home.results / "t-old").exists()
    assert summary["archives_deleted"] == 1
    assert fake.failures >= 1
    assert leftovers(home) == []
    _all_jsonl_valid(home)
    if where == "event":
        assert summary["lines_archived"] == 1300
        assert not any(e.get("type") == "janitor_run" for e in all_records(r))
    else:
        assert r.path.read_bytes() == live_before  # untouched, byte for byte
        assert sorted(r.generations()) == [1]
        assert file_lines(r.archive(1)) == [b'{"older": 1}']
        assert summary["rotations"] == []
        # With space again, the next run rotates.
        assert run_janitor(home, now)["lines_archived"] == 1300
        assert file_lines(r.archive(2)) == [b'{"older": 1}']
    assert len([e for e in all_records(r) if e.get("type") == "t"]) == 1500


def test_disk_full_cli_exit_code_and_appends(make_home: Callable[..., Home],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home(metrics_max_lines=10, metrics_keep_lines=2)
    append_records(home, "metrics", [{"n": i} for i in range(20)])
    before = home.metrics_file.read_bytes()
    monkeypatch.setattr(os, "write", FailingWrites(home.root, 0))
    with pytest.raises(DiskFull):  # an append: nothing of the line stays
        emit(home, "t", message="x" * 100)
    result = CliRunner().invoke(cli, ["janitor", "run", "--home", str(home.root)])
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    assert "no space left" in result.stderr and "janitor:" in result.stdout
    assert home.metrics_file.read_bytes() == before
    assert not home.events_file.exists() or home.events_file.read_bytes() == b""


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted under tmp_path (root only; skipped when mount fails)."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip(skip_reason("mount"))
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs",
                           str(mnt)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True,
                          check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def test_disk_full_on_a_real_small_filesystem(make_home: Callable[..., Home],
                                              small_fs: Path) -> None:
    now = time.time()
    home = make_home(small_fs / "home", events_max_lines=1000, events_keep_lines=100,
                     retention_results_days=1)
    (home.results / "t-big").mkdir()
    (home.results / "t-big" / "blob").write_bytes(os.urandom(600_000))
    emitted: list[str] = []
    while True:  # fill the file system with events, in batches then one by one
        batch = [make_event("t", message="m" * 100) for _ in range(50)]
        try:
            append_events(home, batch)
        except DiskFull:
            break
        emitted += [e["event_id"] for e in batch]
    with pytest.raises(DiskFull):
        while True:
            emitted.append(emit(home, "t", message="m" * 100)["event_id"])
    r = rotated(home, "events")
    _all_jsonl_valid(home)
    assert [e["event_id"] for e in read_jsonl(r.path).records] == emitted
    before = r.path.read_bytes()

    # Nothing to delete: the rotation cannot write its archive; everything stays intact.
    with pytest.raises(DiskFull):
        run_janitor(home, now)
    done = subprocess.run([sys.executable, "-m", "daemons", "--home", str(home.root),
                           "janitor", "run"], capture_output=True, check=False,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr
    assert b"no space left" in done.stderr
    assert r.path.read_bytes() == before and r.generations() == {}
    assert leftovers(home) == []
    _all_jsonl_valid(home)

    # Old results to prune: deletions come first, then the rotation fits.
    make_old(home.results / "t-big", now, 2)
    free_before = shutil.disk_usage(small_fs).free
    summary = run_janitor(home, now)
    assert summary["files_pruned"] == 1 and len(summary["rotations"]) == 1
    assert shutil.disk_usage(small_fs).free > free_before
    ids = Counter(e["event_id"] for e in all_records(r) if e["type"] == "t")
    assert set(ids) == set(emitted) and max(ids.values()) == 1
    emit(home, "t", message="room again")
    _all_jsonl_valid(home)


# ---------------------------------------------------------------------------- CLI, locks
def test_cli_json_text_and_dry_run(make_home: Callable[..., Home]) -> None:
    home = make_home(metrics_max_lines=10, metrics_keep_lines=2)
    append_records(home, "metrics", [{"n": i} for i in range(20)])
    base = [sys.executable, "-m", "daemons", "janitor", "run", "--home", str(home.root)]
    done = subprocess.run([*base, "--dry-run"], capture_output=True, check=True,
                          stdin=subprocess.DEVNULL)
    assert b"dry run (nothing changed)" in done.stdout
    assert b"metrics-snapshots.jsonl: would rotate" in done.stdout
    done = subprocess.run([*base, "--json"], capture_output=True, check=True,
                          stdin=subprocess.DEVNULL)
    summary = orjson.loads(done.stdout)
    assert summary["lines_archived"] == 18 and summary["dry_run"] is False
    done = subprocess.run([sys.executable, "-m", "daemons", "--home", str(home.root),
                           "janitor", "run"], capture_output=True, check=True,
                          stdin=subprocess.DEVNULL)
    assert done.stdout.decode().splitlines()[-1].startswith("janitor: ")
    missing = subprocess.run([*base[:-1], str(home.root / "nope"), "--json"],
                             capture_output=True, check=False, stdin=subprocess.DEVNULL)
    assert missing.returncode == 2 and b"not an initialised harness home" in missing.stderr


def test_a_second_janitor_waits_for_the_first(make_home: Callable[..., Home],
                                              spawner: Spawner) -> None:
    if shutil.which("flock") is None:
        pytest.skip(skip_reason("flock"))
    home = make_home(lock_timeout_s=0.3)
    lock = home.lock_path("janitor")
    holder = spawner.start("holder", ["flock", str(lock), "sleep", "60"])
    deadline = time.monotonic() + 10
    while subprocess.run(["flock", "-n", str(lock), "true"], check=False).returncode == 0:
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.01)
    with pytest.raises(LockTimeout):
        run_janitor(home, time.time())
    done = subprocess.run([sys.executable, "-m", "daemons", "--home", str(home.root),
                           "janitor", "run"], capture_output=True, check=False,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 75, done.stderr


# ---------------------------------------------------------------------------- files
def test_logrotate_config_is_valid(make_home: Callable[..., Home], tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate") or next(
        (p for p in ("/usr/sbin/logrotate", "/sbin/logrotate") if os.access(p, os.X_OK)), None)
    if logrotate is None:
        pytest.skip(skip_reason("logrotate"))
    home = make_home()
    (home.logs / "supervisor.log").write_text("line\n" * 10)
    conf = tmp_path / "logrotate.conf"
    text = (REPO / "etc" / "logrotate.d" / "harness").read_text()
    assert "@HARNESS_HOME@/logs/*.log" in text
    conf.write_text(text.replace("@HARNESS_HOME@", str(home.root)))
    conf.chmod(0o644)
    state = tmp_path / "logrotate.state"
    done = subprocess.run([logrotate, "-d", "-s", str(state), str(conf)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "error" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
    # A forced real run: copytruncate keeps the inode (a daemon's O_APPEND fd stays valid).
    inode = (home.logs / "supervisor.log").stat().st_ino
    done = subprocess.run([logrotate, "-f", "-s", str(state), str(conf)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (home.logs / "supervisor.log").stat().st_ino == inode
    assert (home.logs / "supervisor.log").stat().st_size == 0
    assert (home.logs / "supervisor.log.1").read_text() == "line\n" * 10
    assert not (home.task_logs / "supervisor.log").exists()


def test_logrotate_rotates_worker_logs_under_a_live_writer(make_home: Callable[..., Home],
                                                           tmp_path: Path) -> None:
    """logs/workers/*.log as the process actuator writes it: one O_APPEND descriptor held by
    a long-lived child. copytruncate keeps the inode, so the child's next line lands at the
    start of the emptied file (no hole) and the rotated copy holds the old lines."""
    logrotate = shutil.which("logrotate") or next(
        (p for p in ("/usr/sbin/logrotate", "/sbin/logrotate") if os.access(p, os.X_OK)), None)
    if logrotate is None:
        pytest.skip(skip_reason("logrotate"))
    home = make_home()
    text = (REPO / "etc" / "logrotate.d" / "harness").read_text()
    assert "@HARNESS_HOME@/logs/workers/*.log {" in text
    stanza = text.split("@HARNESS_HOME@/logs/workers/*.log {", 1)[1].split("}", 1)[0]
    directives = {line.split()[0] for line in stanza.splitlines()
                  if line.strip() and not line.strip().startswith("#")}
    assert {"copytruncate", "missingok", "notifempty", "rotate", "compress"} <= directives
    assert not {"create", "postrotate"} & directives  # the writer never reopens the file
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text.replace("@HARNESS_HOME@", str(home.root)))
    conf.chmod(0o644)
    state = tmp_path / "logrotate.state"
    # No logs/workers/ yet (created by the first process-actuator start): not an error.
    assert not home.worker_logs.exists()
    done = subprocess.run([logrotate, "-d", "-s", str(state), str(conf)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "error" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
    home.worker_logs.mkdir(parents=True)
    log = home.worker_logs / "worker-1.log"
    script = ("import sys\n"
              "print('before', flush=True)\n"
              "sys.stdin.readline()\n"
              "print('after', flush=True)\n")
    with open(log, "ab") as out:  # as ProcessActuator.start opens it
        child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while log.stat().st_size == 0:
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.01)
        inode = log.stat().st_ino
        done = subprocess.run([logrotate, "-f", "-s", str(state), str(conf)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert log.stat().st_ino == inode and log.stat().st_size == 0
        assert (home.worker_logs / "worker-1.log.1").read_text() == "before\n"
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.close()
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert log.read_bytes() == b"after\n"  # appended at the new end: no hole of NULs


def _directives(path: Path) -> list[tuple[str, bool]]:
    """(directive line, preceded by a comment line) for each key=value line of a unit."""
    out = []
    previous = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            out.append((line, previous.startswith("#")))
        previous = line
    return out


def test_systemd_units() -> None:
    service = REPO / "systemd" / "harness-janitor.service"
    timer = REPO / "systemd" / "harness-janitor.timer"
    directives = dict(_directives(service))
    assert "Type=oneshot" in directives
    assert "ExecStart=@HARNESS_BIN@ janitor run --home @HARNESS_HOME@" in directives
    tdirectives = dict(_directives(timer))
    assert "OnCalendar=hourly" in tdirectives and "Persistent=true" in tdirectives
    for path in (service, timer):
        uncommented = [d for d, commented in _directives(path)
                       if not commented and not d.startswith("Description=")]
        assert uncommented == [], f"{path.name}: say why for {uncommented}"


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip(skip_reason("systemd-analyze"))
    (tmp_path / "home").mkdir()
    rendered = []
    for name in ("harness-janitor.service", "harness-janitor.timer"):
        text = render_unit((REPO / "systemd" / name).read_text(), name=name,
                           harness_argv=[sys.executable, "-m", "daemons"],
                           home=tmp_path / "home")
        (tmp_path / name).write_text(text)
        rendered.append(str(tmp_path / name))
    done = subprocess.run([analyze, "verify", *rendered], capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL)
    ours = [line for line in (done.stdout + done.stderr).splitlines()
            if "harness-janitor" in line]
    if done.returncode != 0 and not ours:
        pytest.skip(f"systemd-analyze verify cannot run here: {done.stderr.strip()[:200]}")
    assert ours == [] and done.returncode == 0, done.stdout + done.stderr


def test_a_failed_torn_line_repair_is_an_error_not_repaired(
        make_home: Callable[..., Home]) -> None:
    """Issue 14: the janitor said "repaired" when moving the torn line had failed."""
    home = make_home()
    r = rotated(home, "metrics")
    append_records(home, "metrics", [{"n": i} for i in range(3)])
    with open(r.path, "ab") as fh:
        fh.write(b'{"torn": tr')
    r.corrupt.mkdir()  # NAME.corrupt cannot be opened as a file: the move fails
    with pytest.raises(JanitorError) as failed:
        run_janitor(home, time.time())
    summary = failed.value.summary
    assert summary["torn_lines_repaired"] == 0
    assert summary["torn"] == []
    assert summary["errors"], summary
    assert r.path.read_bytes().endswith(b'{"torn": tr')  # left for the next run


def test_spare_folders_of_gone_workers_are_removed(home: Home) -> None:
    """``results/.spare-<worker_id>/`` of a worker with a spec in worker-specs/active/ is
    kept (it is that worker's next task folder); a killed worker's is removed."""
    now = time.time()
    (home.specs_active / "worker-a-1.json").write_text("{}\n")
    (home.results / ".spare-worker-a-1").mkdir()
    (home.results / ".spare-worker-b-2").mkdir()
    (home.results / ".hidden").mkdir()
    summary = run_janitor(home, now)
    assert sorted(os.listdir(home.results)) == [".hidden", ".spare-worker-a-1"]
    assert summary["pruned"]["results"] == 1
