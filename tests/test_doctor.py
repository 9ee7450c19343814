"""``doctor.check``: every invariant it reports, and what ``repair=True`` does about it.

Crash states are produced two ways: by hand (writing exactly the files a crash would leave)
and by a simulated crash inside a queue commit (a BaseException raised from one of the
commit's steps, after the earlier steps already hit the disk).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    dead_pid,
    final_records,
    make_home,
    needs,
    present,
    queue_on_disk,
    req,
    temp_files,
)

from coordination import clock, doctor
from coordination.errors import CorruptFileError
from coordination.jsonl import read_jsonl
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.queue.file import core as file_backend  # where the commit writes
from coordination.queue.file.journal import Journal
from coordination.specs import new_spec, write_spec
from coordination.store import append_line, read_json, replace_json


class SimulatedCrash(BaseException):
    """Raised from inside a commit to stop it dead, like SIGKILL at that instruction."""


def codes(report: doctor.Report, level: str | None = None) -> list[str]:
    return sorted(f.code for f in report.findings if level is None or f.level == level)


def open_codes(report: doctor.Report) -> list[str]:
    return sorted(f.code for f in report.findings if not f.repaired and f.level != "info")


def crash_during(monkeypatch: pytest.MonkeyPatch, target: Any, name: str,
                 action: Callable[[], Any]) -> None:
    """Run ``action`` with ``target.name`` raising SimulatedCrash in this thread; restore
    it afterwards. Other threads (the queue's view timer, which also appends to the
    journal) call the original: the crash under test is the action's, and a background
    thread dying of it would only be a pytest thread-exception warning."""
    original = getattr(target, name)
    crashing = threading.get_ident()

    def boom(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != crashing:
            return original(*args, **kwargs)
        raise SimulatedCrash(name)

    with monkeypatch.context() as m:
        m.setattr(target, name, boom)
        with pytest.raises(SimulatedCrash):
            action()


@pytest.fixture
def queue(home: Home) -> TaskQueue:
    return TaskQueue(home)


def test_fresh_and_busy_homes_are_clean(home: Home, queue: TaskQueue) -> None:
    assert doctor.check(home).clean
    a = queue.enqueue(req()).task["task_id"]
    queue.enqueue(req(dedup_key="k"))
    queue.claim("w1")
    queue.complete(a, "w1")
    queue.submit(req())
    report = doctor.check(home)
    assert report.clean, report.as_dict()
    assert codes(report) == ["inbox_pending"]
    assert codes(report, "info") == ["inbox_pending"]


def test_uninitialised_home_is_an_error(tmp_path: Path) -> None:
    report = doctor.check(Home(tmp_path / "nothing"))
    assert not report.ok and codes(report) == ["not_initialised"]


def test_legacy_worker_types_key_is_a_warning_repair_renames_it(home: Home) -> None:
    raw = read_json(home.worker_types_config)
    raw["types"] = raw.pop("worker_types")
    replace_json(home.worker_types_config, raw, pretty=True)
    report = doctor.check(home)
    assert report.ok and codes(report, "warning") == ["legacy_worker_types_key"]
    repaired = doctor.check(home, repair=True)
    assert [f.repaired for f in repaired.findings if f.code == "legacy_worker_types_key"] \
        == [True]
    assert "worker_types" in read_json(home.worker_types_config)
    assert codes(doctor.check(home), "warning") == []
    # An unknown top-level key is a config error, naming the file and the key.
    replace_json(home.worker_types_config, dict(raw, extra=1), pretty=True)
    report = doctor.check(home)
    assert not report.ok and codes(report, "error") == ["bad_config"]
    assert "unknown top-level key 'extra'" in report.findings[-1].message


# ------------------------------------------------------------------------------ corrupt queue
def corrupt_queue(home: Home) -> bytes:
    """Truncate task-queue.json in the middle (as a bad hand edit or bit rot would)."""
    queue_on_disk(home)  # the jq view is up to date first
    data = home.queue_file.read_bytes()
    with open(home.queue_file, "r+b") as fh:
        fh.truncate(len(data) // 2)
    return home.queue_file.read_bytes()


def test_corrupt_queue_makes_operations_raise_and_leaves_bytes(home: Home,
                                                               queue: TaskQueue) -> None:
    queue.enqueue(req(description="a"))
    queue.enqueue(req(description="b"))
    broken = corrupt_queue(home)
    operations: list[Callable[[TaskQueue], object]] = [
        lambda q: q.claim("w1"), lambda q: q.enqueue(req()), lambda q: q.live_tasks(),
        lambda q: q.stats()]
    for operation in operations:
        with pytest.raises(CorruptFileError) as info:
            operation(TaskQueue(home))  # a fresh instance: nothing cached
        message = str(info.value)
        assert str(home.queue_file) in message
        assert "line" in message and "column" in message
        assert info.value.path == home.queue_file
        assert home.queue_file.read_bytes() == broken
    # The instance that had it cached notices the change too.
    with pytest.raises(CorruptFileError):
        queue.claim("w1")
    assert home.queue_file.read_bytes() == broken
    assert list(home.inbox.glob("*.json")) == []


def test_doctor_reports_corrupt_queue_without_touching_it(home: Home,
                                                          queue: TaskQueue) -> None:
    queue.enqueue(req())
    queue.enqueue(req())
    broken = corrupt_queue(home)
    report = doctor.check(home)
    assert not report.ok
    assert codes(report, "error") == ["corrupt_queue"]
    finding = report.open("error")[0]
    assert finding.path == str(home.queue_file)
    assert "line" in finding.message
    assert home.queue_file.read_bytes() == broken
    assert not any(home.quarantine.iterdir())


def test_repair_quarantines_rebuilds_from_the_journal_and_reingests_inbox(
        home: Home, queue: TaskQueue) -> None:
    first = queue.enqueue(req(description="first")).task["task_id"]
    second = queue.enqueue(req(description="second")).task["task_id"]
    broken = corrupt_queue(home)
    pending = queue.submit(req(description="waiting in the inbox"))
    report = doctor.check(home, repair=True)
    assert report.ok, report.as_dict()
    (finding,) = [f for f in report.findings if f.code == "corrupt_queue"]
    assert finding.repaired
    quarantined = list(home.quarantine.iterdir())
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == broken
    live = queue_on_disk(home)
    assert {first, second} <= set(live)  # from the journal: nothing acknowledged is lost
    assert pending in live  # re-ingested from the inbox
    assert list(home.inbox.glob("*.json")) == []
    after = doctor.check(home)
    assert after.clean, after.as_dict()
    assert codes(after) == ["quarantined"]
    assert TaskQueue(home).claim("w1") is not None


def test_repair_replays_inbox_requests_of_the_lost_revision(
        home: Home, queue: TaskQueue) -> None:
    first = queue.enqueue(req(description="first")).task["task_id"]
    # Through the inbox (as a contended producer does): the lost revision drains it.
    second = queue.submit(req(description="second"))
    queue.ingest()
    corrupt_queue(home)
    assert doctor.check(home, repair=True).ok
    assert {first, second} <= set(queue_on_disk(home))


def test_repair_keeps_directly_enqueued_task_of_the_lost_revision(
        home: Home, queue: TaskQueue) -> None:
    queue.enqueue(req(description="first"))
    second = queue.enqueue(req(description="second")).task["task_id"]
    corrupt_queue(home)
    assert doctor.check(home, repair=True).ok
    assert second in queue_on_disk(home), "an acknowledged task was lost by the repair"


def test_repair_of_a_garbled_view_rebuilds_it_and_keeps_history(home: Home,
                                                                queue: TaskQueue) -> None:
    done = queue.enqueue(req()).task["task_id"]
    queue.claim("w1")
    queue.complete(done, "w1")
    kept = queue.enqueue(req()).task["task_id"]
    home.queue_file.write_bytes(b'{"version": 1, "tasks": [')
    report = doctor.check(home, repair=True)
    assert report.ok and "corrupt_queue" in codes(report)
    assert set(queue_on_disk(home)) == {kept}
    assert present(TaskQueue(home).get(done))["status"] == "completed"


# ------------------------------------------------------------------------------ hand edits
@needs("jq", "flock")
def test_hand_edit_under_flock_is_respected_by_next_claim(home: Home, queue: TaskQueue) -> None:
    queue.enqueue(req(task_id="A", priority="medium"))
    queue.enqueue(req(task_id="B", priority="medium"))
    assert [t["task_id"] for t in queue.live_tasks()] == ["A", "B"]  # cache is warm
    queue.sync()  # what `harness queue sync` does (or 1 s of quiet)
    script = ("umask 077 && jq '(.tasks[] | select(.task_id == \"B\") | .priority) = \"critical\"' "
              "coordination/task-queue.json > coordination/task-queue.json.edit "
              "&& mv coordination/task-queue.json.edit coordination/task-queue.json")
    subprocess.run(["flock", "coordination/locks/queue.lock", "sh", "-c", script],
                   cwd=home.root, check=True, timeout=30, stdin=subprocess.DEVNULL)
    claimed = queue.claim("w1")
    assert claimed is not None and claimed["task_id"] == "B"
    assert claimed["priority"] == "critical"
    assert doctor.check(home).clean


def test_duplicate_dedup_key_in_hand_edited_queue_is_an_error(home: Home,
                                                               queue: TaskQueue) -> None:
    queue.enqueue(req(task_id="A", dedup_key="k"))
    queue.enqueue(req(task_id="B"))
    queue.sync()
    doc = json.loads(home.queue_file.read_bytes())
    for task in doc["tasks"]:
        task["dedup_key"] = "k"
    home.queue_file.write_text(json.dumps(doc))
    report = doctor.check(home)
    assert codes(report, "error") == ["duplicate_dedup_key"]


def test_self_dependency_in_hand_edited_queue_is_an_error(home: Home, queue: TaskQueue) -> None:
    queue.enqueue(req(task_id="A"))
    queue.sync()
    doc = json.loads(home.queue_file.read_bytes())
    doc["tasks"][0]["depends_on"] = ["A"]
    home.queue_file.write_text(json.dumps(doc))
    assert codes(doctor.check(home), "error") == ["self_dependency"]


# ------------------------------------------------------------------------------ interrupted moves
def test_interrupted_finish_by_hand_is_a_warning_and_repaired(home: Home,
                                                              queue: TaskQueue) -> None:
    tid = queue.enqueue(req()).task["task_id"]
    running = present(queue.claim("w1"))
    # What a crash between the history append and the queue publish leaves behind:
    append_line(home.history_file, dict(running, status="completed", final=True,
                                        outcome="completed", completed_at=clock.iso(time.time()),
                                        recorded_at=clock.iso(time.time()), result=None))
    report = doctor.check(home)
    assert report.ok and not report.clean
    assert open_codes(report) == ["interrupted_finish"]
    repaired = doctor.check(home, repair=True)
    assert [f.code for f in repaired.findings if f.repaired] == ["interrupted_finish"]
    assert tid not in queue_on_disk(home)
    assert present(TaskQueue(home).get(tid))["status"] == "completed"
    assert len(final_records(home)[tid]) == 1
    assert doctor.check(home).clean


def test_crash_between_history_and_queue_publish_on_complete(
        home: Home, queue: TaskQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    tid = queue.enqueue(req()).task["task_id"]
    queue.claim("w1")
    crash_during(monkeypatch, Journal, "append", lambda: queue.complete(tid, "w1"))
    assert queue_on_disk(home)[tid]["status"] == "running"  # the commit never happened
    assert [r["status"] for r in final_records(home)[tid]] == ["completed"]
    report = doctor.check(home)
    assert report.ok and open_codes(report) == ["interrupted_finish"]
    assert doctor.check(home, repair=True).ok
    assert doctor.check(home).clean
    assert tid not in queue_on_disk(home)


def test_crash_after_dead_letter_before_queue_publish_is_only_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home(tmp_path, name="h2")
    queue = TaskQueue(home)
    tid = queue.enqueue(req(max_attempts=1)).task["task_id"]
    queue.claim("w1")
    crash_during(monkeypatch, Journal, "append",
                 lambda: queue.fail(tid, "w1", error="boom"))
    assert home.dead_letter(tid).exists() and tid in queue_on_disk(home)
    report = doctor.check(home)
    assert report.ok, report.as_dict()


def test_crash_after_dead_letter_before_queue_publish_is_repaired(
        home: Home, queue: TaskQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    tid = queue.enqueue(req(max_attempts=1)).task["task_id"]
    queue.claim("w1")
    crash_during(monkeypatch, Journal, "append",
                 lambda: queue.fail(tid, "w1", error="boom"))
    repaired = doctor.check(home, repair=True)
    assert repaired.ok, repaired.as_dict()
    assert doctor.check(home).clean
    assert tid not in queue_on_disk(home)
    assert [d["task_id"] for d in TaskQueue(home).dead_letters()] == [tid]


def test_crash_before_dead_letter_write_keeps_the_dead_letter(
        home: Home, queue: TaskQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    tid = queue.enqueue(req(max_attempts=1)).task["task_id"]
    queue.claim("w1")
    crash_during(monkeypatch, file_backend, "replace_json",
                 lambda: queue.fail(tid, "w1", error="boom"))
    assert not home.dead_letter(tid).exists() and tid in queue_on_disk(home)
    assert doctor.check(home, repair=True).ok
    assert tid not in queue_on_disk(home)
    assert [d["task_id"] for d in TaskQueue(home).dead_letters()] == [tid]


def test_requeued_dead_letter_is_not_mistaken_for_interrupted_finish(
        tmp_path: Path) -> None:
    home = make_home(tmp_path, name="h3", retry_backoff_base_s=0)
    queue = TaskQueue(home)
    tid = queue.enqueue(req(max_attempts=1)).task["task_id"]
    queue.claim("w1")
    queue.fail(tid, "w1", error="boom")
    queue.requeue_dead(tid)
    # The same attempt number as the old final record:
    assert present(queue.claim("w2"))["attempts"] == 1
    report = doctor.check(home)
    assert report.clean, report.as_dict()
    doctor.check(home, repair=True)
    assert tid in queue_on_disk(home), "repair dropped a live running task"


# ------------------------------------------------------------------------------ workers
def register(home: Home, worker_id: str, **overrides: Any) -> dict[str, Any]:
    # Tests write arbitrary fields here: a plain dict, not the typed spec.
    spec: dict[str, Any] = dict(new_spec(worker_id, "test", time.time(),
                                         pid=overrides.pop("pid", None)))
    spec.update(overrides)
    write_spec(home, spec, create=True)
    return spec


def test_dead_worker_orphans_are_reclaimed_and_spec_completed(home: Home,
                                                               queue: TaskQueue) -> None:
    pid = dead_pid()
    register(home, "worker-dead", pid=pid, state="busy")
    register(home, "worker-alive")  # this process: alive
    tid = queue.enqueue(req(max_attempts=3)).task["task_id"]
    other = queue.enqueue(req()).task["task_id"]
    assert present(queue.claim("worker-dead"))["task_id"] == tid
    assert present(queue.claim("worker-alive"))["task_id"] == other
    report = doctor.check(home)
    assert report.ok and not report.clean
    assert open_codes(report) == ["dead_worker", "orphaned_task"]
    assert any(str(pid) in f.message for f in report.findings if f.code == "dead_worker")

    repaired = doctor.check(home, repair=True)
    assert all(f.repaired for f in repaired.findings if f.level != "info")
    task = present(TaskQueue(home).get(tid))
    assert task["status"] == "queued"
    assert task["attempts"] == 1  # the attempt counts: kept, not reset
    assert task["worker_id"] is None
    assert queue.history_of(tid)[-1]["outcome"] == "reclaimed"
    # The live worker keeps its task.
    assert present(TaskQueue(home).get(other))["status"] == "running"
    assert not (home.specs_active / "worker-dead.json").exists()
    spec = json.loads((home.specs_completed / "worker-dead.json").read_bytes())
    assert spec["exit_reason"] == "crashed" and spec["completed_at"]
    assert (home.specs_active / "worker-alive.json").exists()
    assert doctor.check(home).clean


def test_pid_reuse_is_detected_as_dead(home: Home, queue: TaskQueue) -> None:
    spec = new_spec("worker-reused", "test", time.time())  # our own, living pid
    assert spec["pid"] == os.getpid() and spec["process_start_time"] is not None
    spec["process_start_time"] -= 100  # ...but the recorded process started 100 s earlier
    write_spec(home, spec, create=True)
    tid = queue.enqueue(req()).task["task_id"]
    queue.claim("worker-reused")
    report = doctor.check(home)
    assert open_codes(report) == ["dead_worker", "orphaned_task"]
    (dead,) = [f for f in report.findings if f.code == "dead_worker"]
    assert "reused" in dead.message
    doctor.check(home, repair=True)
    assert present(TaskQueue(home).get(tid))["status"] == "queued"
    assert doctor.check(home).clean


def test_live_worker_with_matching_start_time_is_alive(home: Home, queue: TaskQueue) -> None:
    register(home, "worker-me")
    queue.enqueue(req())
    queue.claim("worker-me")
    assert doctor.check(home).clean


def test_task_not_held_by_its_live_worker(home: Home, queue: TaskQueue) -> None:
    """A live worker whose spec, written after the claim, names another task (or none):
    nothing will finish the running task, so doctor warns; --repair leaves both alone (the
    worker is alive: the operator restarts it, then the reclaim pass requeues the task)."""
    now = time.time()
    tid = queue.enqueue(req(max_attempts=3)).task["task_id"]
    other = queue.enqueue(req()).task["task_id"]
    assert present(queue.claim("worker-me", now=now - 10))["task_id"] == tid
    register(home, "worker-me", state="busy", current_task_id=other,
             task_started_at=clock.iso(now - 5), heartbeat_at=clock.iso(now - 5))
    report = doctor.check(home, now=now)
    assert report.ok and not report.clean
    assert open_codes(report) == ["task_not_held"]
    (finding,) = [f for f in report.findings if f.code == "task_not_held"]
    assert tid in finding.message and f"runs {other}" in finding.message
    assert finding.path == str(home.specs_active / "worker-me.json")
    repaired = doctor.check(home, repair=True, now=now)
    assert open_codes(repaired) == ["task_not_held"]
    task = present(TaskQueue(home).get(tid))
    assert task["status"] == "running" and task["worker_id"] == "worker-me"
    assert (home.specs_active / "worker-me.json").exists()
    # The operator restarts the worker: its spec is completed, and the reclaim pass (the
    # supervisor's, or doctor's orphaned_task) takes the task back.
    from coordination.specs import complete_spec

    complete_spec(home, "worker-me", "signal", now)
    assert open_codes(doctor.check(home, now=now)) == ["orphaned_task"]


def test_task_not_held_idle_worker(home: Home, queue: TaskQueue) -> None:
    now = time.time()
    tid = queue.enqueue(req()).task["task_id"]
    queue.claim("worker-me", now=now - 10)
    register(home, "worker-me", state="idle", heartbeat_at=clock.iso(now - 1))
    report = doctor.check(home, now=now)
    assert open_codes(report) == ["task_not_held"]
    assert "is idle with no task" in report.findings[-1].message
    assert tid in report.findings[-1].message


@pytest.mark.parametrize("lag_s", [0.0, 3.0])
def test_task_not_held_spares_a_worker_between_claim_and_spec_update(
        home: Home, queue: TaskQueue, lag_s: float) -> None:
    """The worker claims, then writes its spec with heartbeat_at = the claim instant: a
    spec not newer than the claim (the previous task, or idle) is no proof."""
    now = time.time()
    queue.enqueue(req())
    claimed = present(queue.claim("worker-me", now=now - 10))["task_id"]
    register(home, "worker-me", state="busy", current_task_id="t-previous",
             heartbeat_at=clock.iso(now - 10 - lag_s))
    assert doctor.check(home, now=now).clean
    register(home, "worker-me", state="busy", current_task_id=claimed,
             task_started_at=clock.iso(now - 10), heartbeat_at=clock.iso(now - 1))
    assert doctor.check(home, now=now).clean


def test_task_not_held_leaves_dead_workers_to_orphaned_task(home: Home,
                                                            queue: TaskQueue) -> None:
    now = time.time()
    queue.enqueue(req())
    queue.claim("worker-dead", now=now - 10)
    register(home, "worker-dead", pid=dead_pid(), state="idle",
             heartbeat_at=clock.iso(now - 1))
    assert open_codes(doctor.check(home, now=now)) == ["dead_worker", "orphaned_task"]


def test_running_task_without_any_spec_is_orphaned_after_heartbeat_timeout(
        home: Home, queue: TaskQueue) -> None:
    tid = queue.enqueue(req()).task["task_id"]
    queue.claim("worker-ghost", now=time.time() - 3600)
    report = doctor.check(home)
    # Its lease (claim + heartbeat_timeout_s) ended long ago too: the queue says so.
    assert open_codes(report) == ["lease_expired", "orphaned_task"]
    doctor.check(home, repair=True)
    assert present(TaskQueue(home).get(tid))["status"] == "queued"
    # Both findings name one state: the task is reclaimed once.
    assert [r["outcome"] for r in TaskQueue(home).history_of(tid)] == ["reclaimed"]


def test_spec_in_both_active_and_completed(home: Home) -> None:
    spec = register(home, "worker-both")
    completed = dict(spec, state="stopped", exit_reason="idle", completed_at=spec["started_at"])
    (home.specs_completed / "worker-both.json").write_text(json.dumps(completed))
    report = doctor.check(home)
    assert open_codes(report) == ["spec_in_both"]
    doctor.check(home, repair=True)
    assert not (home.specs_active / "worker-both.json").exists()
    assert doctor.check(home).clean


def test_corrupt_spec_is_an_error_and_quarantined(home: Home) -> None:
    (home.specs_active / "worker-bad.json").write_text('{"worker_id": ')
    report = doctor.check(home)
    assert codes(report, "error") == ["corrupt_spec"]
    assert doctor.check(home, repair=True).ok
    assert not (home.specs_active / "worker-bad.json").exists()
    assert doctor.check(home).ok


# ------------------------------------------------------------------------------ files
def test_stale_temp_files_are_reported_and_removed(home: Home, queue: TaskQueue) -> None:
    queue.enqueue(req())
    old = home.coordination / ".task-queue.json.tmp-99999-abcdef"
    old_inbox = home.inbox / ".t-x.json.tmp-99999-123456"
    fresh = home.coordination / ".task-queue.json.tmp-99998-fedcba"
    for path in (old, old_inbox, fresh):
        path.write_text("partial")
    two_hours_ago = time.time() - 7200
    for path in (old, old_inbox):
        os.utime(path, (two_hours_ago, two_hours_ago))
    report = doctor.check(home)
    stale = [f for f in report.findings if f.code == "stale_temp"]
    assert sorted(Path(str(f.path)).name for f in stale) == sorted([old.name, old_inbox.name])
    assert all(f.level == "warning" for f in stale)
    doctor.check(home, repair=True)
    assert not old.exists() and not old_inbox.exists()
    assert fresh.exists()  # a writer may still be publishing it
    assert temp_files(home.coordination) == [fresh.name]
    assert doctor.check(home).clean


def test_torn_tail_of_events_is_moved_to_corrupt_on_repair(home: Home,
                                                           queue: TaskQueue) -> None:
    queue.enqueue(req())
    good = home.events_file.read_bytes()
    with open(home.events_file, "ab") as fh:
        fh.write(b'{"event_id": "ev-torn", "type": "task_cl')
    report = doctor.check(home)
    assert report.ok and open_codes(report) == ["torn_tail"]
    doctor.check(home, repair=True)
    assert home.events_file.read_bytes() == good
    corrupt = home.events_file.with_name(home.events_file.name + ".corrupt")
    assert corrupt.read_bytes() == b'{"event_id": "ev-torn", "type": "task_cl\n'
    assert read_jsonl(home.events_file).bad_lines == 0
    assert doctor.check(home).clean
    queue.enqueue(req())  # appends continue on a whole line
    assert read_jsonl(home.events_file).bad_lines == 0


def test_torn_tail_of_history_is_repaired_too(home: Home, queue: TaskQueue) -> None:
    tid = queue.enqueue(req()).task["task_id"]
    queue.claim("w1")
    queue.complete(tid, "w1")
    with open(home.history_file, "ab") as fh:
        fh.write(b'{"task_id": "t-cut')
    assert open_codes(doctor.check(home)) == ["torn_tail"]
    doctor.check(home, repair=True)
    assert doctor.check(home).clean
    assert present(queue.get(tid))["status"] == "completed"


def test_garbage_inside_jsonl_is_reported(home: Home, queue: TaskQueue) -> None:
    queue.enqueue(req())
    with open(home.events_file, "ab") as fh:
        fh.write(b"not json at all\n")
    queue.enqueue(req())
    report = doctor.check(home)
    assert report.ok and open_codes(report) == ["bad_jsonl_lines"]


def test_missing_lock_file_is_recreated(home: Home) -> None:
    home.lock_path("metrics").unlink()
    report = doctor.check(home)
    assert open_codes(report) == ["missing_lock"]
    doctor.check(home, repair=True)
    assert home.lock_path("metrics").exists()
    assert doctor.check(home).clean


def test_corrupt_dead_letter_is_an_error_and_quarantined(home: Home) -> None:
    (home.dead_letters / "t-broken.json").write_text("{")
    assert codes(doctor.check(home), "error") == ["corrupt_dead_letter"]
    assert doctor.check(home, repair=True).ok
    assert doctor.check(home).ok
    assert not (home.dead_letters / "t-broken.json").exists()


def test_inbox_pending_is_info_and_repair_ingests(home: Home, queue: TaskQueue) -> None:
    tid = queue.submit(req())
    report = doctor.check(home)
    assert report.clean and codes(report) == ["inbox_pending"]
    doctor.check(home, repair=True)
    assert tid in queue_on_disk(home)


def test_stray_task_process_is_reported_and_killed_by_repair(home: Home,
                                                             queue: TaskQueue) -> None:
    """A process left running for a task attempt that is over (it escaped its worker's
    stop) is a warning; --repair kills it. The process of a running attempt is not."""
    task = queue.enqueue(req()).task
    claimed = queue.claim("w1")
    assert claimed is not None and claimed["task_id"] == task["task_id"]

    def task_env(attempt: str) -> dict[str, str]:
        return dict(os.environ, HARNESS_HOME=str(home.root), HARNESS_TASK_ID=task["task_id"],
                    HARNESS_WORKER_ID="w1", HARNESS_ATTEMPT=attempt)

    running = subprocess.Popen(["sleep", "300"], env=task_env("1"))
    stray = subprocess.Popen(["sleep", "300"], env=task_env("0"))  # an older attempt's
    try:
        time.sleep(0.2)  # both have exec'd: /proc/PID/environ is sleep's
        report = doctor.check(home)
        strays = [f for f in report.findings if f.code == "stray_task_process"]
        assert len(strays) == 1 and f"pid {stray.pid} " in strays[0].message, report.as_dict()
        assert strays[0].level == "warning"
        repaired = doctor.check(home, repair=True)
        assert [f.repaired for f in repaired.findings if f.code == "stray_task_process"] \
            == [True]
        assert stray.wait(10) == -9 and running.poll() is None
        queue.complete(task["task_id"], "w1")
        # The attempt is over: its process is a stray now.
        after = doctor.check(home)
        assert [f for f in after.findings if f.code == "stray_task_process"
                and f"pid {running.pid} " in f.message]
    finally:
        for proc in (running, stray):
            proc.kill()
            proc.wait(10)
