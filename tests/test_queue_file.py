"""The file backend's own behaviour: its files (journal, jq snapshot, inbox layout), hand
edits, compaction, repair, and when events are written. Backend-neutral guarantees are in
tests/test_queue_contract.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import T0, events, final_records, make_home, needs, req
from hypothesis import given, settings
from hypothesis import strategies as st

from coordination.errors import CorruptFileError, UsageError
from coordination.events import Event, append_events, make_event
from coordination.locks import lock_for
from coordination.paths import Home
from coordination.queue import FileQueue
from coordination.queue.file import core as backend_module  # where events are appended
from coordination.queue.file.state import LiveState
from coordination.tasks import stored_task


@pytest.fixture
def make_backend(tmp_path: Path) -> Callable[..., Any]:
    counter = iter(range(1, 1000))

    def make(**system_overrides: Any) -> FileQueue:
        return FileQueue(make_home(tmp_path, f"home{next(counter)}", **system_overrides))

    return make


@pytest.fixture
def backend(make_backend: Callable[..., Any]) -> Any:
    return make_backend()


def live_ids(backend: Any) -> set[str]:
    return {t["task_id"] for t in backend.live_tasks()}


def test_queue_file_written_by_another_process_is_read_exactly(tmp_path: Path) -> None:
    """A reader that parsed the queue before re-uses only the tasks whose lines it
    published itself; changes by another writer, a hand-edited layout and a corrupt task
    line are all read (or refused) exactly as a fresh reader would."""
    home = make_home(tmp_path)
    mine, other = FileQueue(home), FileQueue(home)
    ids = [r.task["task_id"] for r in mine.enqueue_batch([req() for _ in range(5)], now=T0)]
    assert len(mine.live_tasks()) == 5
    claimed = other.claim("w2", now=T0 + 1)
    assert claimed is not None
    other.reprioritize(ids[4], "high", now=T0 + 2)
    fresh = {t["task_id"]: t for t in FileQueue(home).live_tasks()}
    assert {t["task_id"]: t for t in mine.live_tasks()} == fresh
    assert fresh[claimed["task_id"]]["worker_id"] == "w2"
    assert fresh[ids[4]]["priority"] == "high"
    # An operator rewrote the file in another layout (jq pretty-prints): still read.
    mine.sync()  # the jq view is exact (as after 1 s of quiet)
    raw = json.loads(home.queue_file.read_bytes())
    raw["tasks"][1]["priority"] = "critical"
    home.queue_file.write_text(json.dumps(raw, indent=2) + "\n")
    assert {t["task_id"]: t["priority"] for t in mine.live_tasks()}[ids[1]] == "critical"
    # Back in our layout, with one task line damaged by hand: refused, never half-read.
    mine.reprioritize(ids[1], "low", now=T0 + 3)
    mine.sync()
    lines = home.queue_file.read_bytes().split(b"\n")
    # The line of a queued task (which task the claim took depends on the random part of
    # the ids, so find one by content rather than by position).
    target = next(i for i, line in enumerate(lines) if b'"status":"queued"' in line)
    lines[target] = lines[target].replace(b'"status":"queued"', b'"status":"bogus"')
    home.queue_file.write_bytes(b"\n".join(lines))
    with pytest.raises(CorruptFileError):
        mine.live_tasks()




def test_invalid_inbox_file_is_rejected_with_reason(backend: Any) -> None:
    home = backend.home
    (home.inbox / "t-bad.json").write_text('{"command": "not a list"}\n')
    (home.inbox / "t-garbage.json").write_text('{"command": [')
    good = backend.submit(req(), now=T0)
    assert backend.ingest(now=T0) == 1
    assert live_ids(backend) == {good}
    assert sorted(p.name for p in home.inbox_rejected.iterdir()) == [
        "t-bad.json", "t-bad.reason", "t-garbage.json", "t-garbage.reason"]
    assert "command" in (home.inbox_rejected / "t-bad.reason").read_text()
    assert len(events(home, "inbox_rejected")) == 2




def test_every_mutation_emits_its_event_after_the_change_is_durable(
        make_backend: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make_backend(retry_backoff_base_s=0)
    home = backend.home
    real_append = append_events
    seen: list[str] = []

    def on_disk_check(h: Home, batch: list[Event], **kw: Any) -> None:
        # Every file already says what the event claims (the live queue as any other
        # process reads it: the journal is the commit point).
        live = {t["task_id"]: t for t in FileQueue(home).live_tasks()}
        finals = final_records(home)
        dead = {p.stem for p in home.dead_letters.glob("*.json")}
        for event in batch:
            tid, kind = event["task_id"] or "", event["type"]
            seen.append(kind)
            if kind in ("task_enqueued", "task_requeued", "task_released"):
                assert live[tid]["status"] == "queued", kind
            elif kind == "task_claimed":
                assert live[tid]["status"] == "running"
            elif kind == "task_retry_scheduled":
                assert live[tid]["status"] == "queued" and live[tid]["not_before"]
            elif kind == "task_cancel_requested":
                assert live[tid]["cancel_requested"] is True
            elif kind == "task_reprioritized":
                assert live[tid]["priority"] == event["data"]["new"]
            elif kind in ("task_completed", "task_cancelled", "task_failed"):
                assert tid not in live
                assert finals[tid][-1]["status"] == kind.removeprefix("task_")
            elif kind == "task_dead_lettered":
                assert tid in dead and tid not in live
            elif kind == "dlq_purged":
                assert not set(event["data"]["task_ids"]) & dead
            if kind == "task_requeued":
                assert tid not in dead
        real_append(h, batch, **kw)

    monkeypatch.setattr(backend_module, "append_events", on_disk_check)
    a = backend.enqueue(req(max_attempts=2), now=T0).task["task_id"]
    backend.claim("w1", now=T0)
    backend.fail(a, "w1", error="once", now=T0)             # retry scheduled
    backend.claim("w1", now=T0 + 1)
    backend.complete(a, "w1", now=T0 + 1)                   # completed
    b = backend.enqueue(req(max_attempts=1), now=T0 + 2).task["task_id"]
    backend.reprioritize(b, "critical", now=T0 + 2)
    backend.claim("w1", now=T0 + 2)
    backend.release(b, "w1", reason="bye", now=T0 + 2)
    backend.claim("w1", now=T0 + 3)
    backend.fail(b, "w1", error="fatal", now=T0 + 3)        # failed, dead-lettered
    backend.requeue_dead(b, now=T0 + 4)
    backend.claim("w1", now=T0 + 4)
    backend.cancel(b, now=T0 + 4)                           # cancel requested
    backend.fail(b, "w1", error="stopped", now=T0 + 4)      # cancelled
    c = backend.enqueue(req(max_attempts=1), now=T0 + 5).task["task_id"]
    backend.claim("w1", now=T0 + 5)
    backend.fail(c, "w1", error="x", now=T0 + 5)
    backend.purge_dead([c])
    expected = {"task_enqueued", "task_claimed", "task_retry_scheduled", "task_completed",
                "task_reprioritized", "task_released", "task_failed", "task_dead_lettered",
                "task_requeued", "task_cancel_requested", "task_cancelled", "dlq_purged"}
    assert expected <= set(seen)
    assert expected <= {e["type"] for e in events(home)}


def test_events_are_appended_after_the_queue_lock_is_released(
        backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = lock_for(backend.home.lock_path("queue"))
    held_at_emit: list[tuple[str, bool]] = []
    real_append = append_events

    def spy(h: Home, batch: list[Event], **kw: Any) -> None:
        held_at_emit.extend((e["type"], lock.held) for e in batch)
        real_append(h, batch, **kw)

    monkeypatch.setattr(backend_module, "append_events", spy)
    task = backend.enqueue(req(), now=T0).task
    backend.claim("w1", now=T0)
    backend.complete(task["task_id"], "w1", now=T0)
    assert [kind for kind, _ in held_at_emit] == ["task_enqueued", "task_claimed",
                                                  "task_completed"]
    assert [kind for kind, held in held_at_emit if held] == []




def test_dependency_on_a_task_whose_record_was_archived(tmp_path: Path) -> None:
    """The janitor moved the completed task's history record into NAME.1.jsonl.gz: a new
    task may still depend on it (it is known as completed, not as unknown)."""
    from daemons.janitor.run import run_janitor

    home = make_home(tmp_path, history_max_lines=10, history_keep_lines=0,
                     durability="none")
    queue = FileQueue(home)
    done = queue.enqueue(req(task_id="DONE"), now=T0).task
    queue.claim("w1", now=T0 + 1)
    queue.complete(done["task_id"], "w1", now=T0 + 2)
    for i in range(12):  # push the history over its line limit
        queue.enqueue(req(task_id=f"F{i:02d}"), now=T0 + 3)
        queue.claim("w1", now=T0 + 3)
        queue.complete(f"F{i:02d}", "w1", now=T0 + 3)
    run_janitor(home, T0 + 10)
    queue = FileQueue(home)  # another process: it never saw DONE finish
    assert b'"DONE"' not in home.history_file.read_bytes()
    assert list(home.coordination.glob("task-history.*.jsonl.gz"))
    after = queue.enqueue(req(task_id="NEXT", depends_on=["DONE"]), now=T0 + 11).task
    assert after["depends_on"] == ["DONE"]
    with pytest.raises(UsageError, match="unknown or not-completed"):
        queue.enqueue(req(task_id="NEXT2", depends_on=["NEVER"]), now=T0 + 12)
    # An operator finds it too, when asking for the archives.
    assert queue.history_of("DONE") == []
    records = queue.history_of("DONE", archives=True)
    assert [r["outcome"] for r in records] == ["completed"] and records[0]["final"]
    from click.testing import CliRunner

    from daemons.cli import cli
    runner = CliRunner()
    missing = runner.invoke(cli, ["--home", str(home.root), "task", "show", "DONE"])
    assert missing.exit_code == 1 and "--archives" in missing.output
    shown = runner.invoke(cli, ["--home", str(home.root), "task", "show", "DONE",
                                "--archives", "--history", "--json"])
    assert shown.exit_code == 0, shown.output
    out = json.loads(shown.output)
    assert out["status"] == "completed" and len(out["history"]) == 1


# ------------------------------------------------------------------------------ journal
def test_a_commit_is_one_journal_line_and_the_snapshot_follows(backend: Any) -> None:
    home = backend.home
    task = backend.enqueue(req(), now=T0).task
    lines = [json.loads(x) for x in home.queue_journal.read_bytes().split(b"\0", 1)[0]
             .splitlines()]
    assert lines[0]["journal"] == 1 and lines[0]["base"] == 0
    commits = [x for x in lines[1:] if "rev" in x and "snap" not in x]
    assert [c["rev"] for c in commits] == [1]
    assert commits[0]["put"][0]["task_id"] == task["task_id"]
    backend.close()  # a short-lived process publishes what it owes at exit
    view = json.loads(home.queue_file.read_bytes())
    assert view["revision"] == 1 and [t["task_id"] for t in view["tasks"]] == [task["task_id"]]


def test_torn_journal_line_is_cut_never_parsed(backend: Any) -> None:
    home = backend.home
    backend.enqueue(req(task_id="A"), now=T0)
    backend.close()  # no snapshot timer writing meanwhile
    data = home.queue_journal.read_bytes()
    end = data.index(b"\0")
    with open(home.queue_journal, "r+b") as fh:  # a crash in the middle of a write
        fh.seek(end)
        fh.write(b'{"rev":2,"at":"2023-11-14T22:13:21.000Z","put":[{"task_id":"GHOST"')
    fresh = FileQueue(home)
    assert live_ids(fresh) == {"A"}  # a reader stops before it
    fresh.enqueue(req(task_id="B"), now=T0 + 1)  # a writer cuts it, then writes whole
    assert b"GHOST" not in home.queue_journal.read_bytes()
    assert live_ids(FileQueue(home)) == {"A", "B"}
    assert not [f for f in fresh.check() if f.level != "info"]


def test_cost_is_the_change_a_reader_applies_only_new_lines(backend: Any) -> None:
    other = FileQueue(backend.home)
    backend.enqueue_batch([req() for _ in range(50)], now=T0)
    assert len(other.live_tasks()) == 50
    before = other._journal.end
    backend.enqueue(req(task_id="ONE"), now=T0 + 1)
    assert "ONE" in live_ids(other)
    assert other._journal.end > before  # it read on from where it was, not from the start


def test_compaction_starts_a_new_journal_from_a_durable_base(backend: Any) -> None:
    home = backend.home
    ids = [r.task["task_id"] for r in backend.enqueue_batch([req() for _ in range(3)],
                                                            now=T0)]
    claimed = backend.claim("w1", now=T0 + 1)
    assert claimed is not None
    backend.sync(durable=True)  # what a journal past COMPACT_BYTES triggers
    header = json.loads(home.queue_journal.read_bytes().split(b"\n", 1)[0])
    assert header["gen"] == 2 and header["base"] == 2
    assert json.loads(home.queue_base_file.read_bytes())["revision"] == 2
    assert (home.coordination / "task-queue.journal.prev").exists()
    backend.complete(claimed["task_id"], "w1", now=T0 + 2)
    fresh = FileQueue(home)  # loads base snapshot + the new journal
    assert live_ids(fresh) == set(ids) - {claimed["task_id"]}
    assert not [f for f in fresh.check() if f.level != "info"]


def test_journal_deleted_while_running_restarts_from_the_live_state(backend: Any) -> None:
    """An operator removes task-queue.journal while a daemon runs, before the view has
    caught up: the next commit starts a new journal from the daemon's live state (a
    durable view of it first), not from a stale view, so no commit is dropped."""
    home = backend.home
    first = backend.enqueue(req(), now=T0).task["task_id"]
    backend.sync()  # the view has the first task only
    later = [r.task["task_id"] for r in backend.enqueue_batch([req(), req()], now=T0 + 1)]
    assert json.loads(home.queue_file.read_bytes())["revision"] == 1  # a stale view
    home.queue_journal.unlink()
    backend.get(first)  # the backend notices the journal is gone
    last = backend.enqueue(req(), now=T0 + 2).task["task_id"]
    fresh = FileQueue(home)  # another process: view + new journal
    assert live_ids(fresh) == {first, *later, last}
    assert json.loads(home.queue_base_file.read_bytes())["revision"] == 2
    assert not [f for f in fresh.check() if f.level != "info"]


def test_a_view_published_by_another_process_defers_our_timer(backend: Any) -> None:
    """Two processes committing: the one whose timer fires within SNAPSHOT_INTERVAL_S
    of the other's publish waits for the interval instead of rendering the same view
    again; once the interval is over it publishes what it owes."""
    from coordination.queue.file.publisher import SNAPSHOT_INTERVAL_S

    home = backend.home
    other = FileQueue(home)
    try:
        backend.enqueue(req(), now=T0)
        backend.sync()  # "another process" published just now
        view = home.queue_file.stat().st_ino
        mine = other.enqueue(req(), now=T0 + 1).task["task_id"]
        started = time.monotonic()
        later = other._sync_timed()
        if time.monotonic() - started < SNAPSHOT_INTERVAL_S / 2:  # not stalled meanwhile
            assert 0 < later <= SNAPSHOT_INTERVAL_S
            assert home.queue_file.stat().st_ino == view  # nothing rendered
        # Within the interval of our commit the view has it: published by the other
        # process (its own timer) or by ours once the interval since that publish is over.
        deadline = time.monotonic() + 2 * SNAPSHOT_INTERVAL_S + 1

        def in_view() -> bool:
            tasks = json.loads(home.queue_file.read_bytes())["tasks"]
            return mine in {t["task_id"] for t in tasks}
        while not in_view() and time.monotonic() < deadline:
            time.sleep(later)
            later = other._sync_timed()
        assert in_view()
    finally:
        other.close()


# ------------------------------------------------------------------------------ hand edits
def _edit(home: Home, change: Callable[[dict[str, Any]], None]) -> None:
    """What an operator does: under the queue lock, jq the file into a temp, mv it back."""
    with lock_for(home.lock_path("queue")).held_for(5):
        raw = json.loads(home.queue_file.read_bytes())
        change(raw)
        tmp = home.coordination / ".task-queue.json.tmp-manual"
        tmp.write_text(json.dumps(raw, indent=2))
        tmp.replace(home.queue_file)


def test_hand_edit_of_an_exact_snapshot_is_honoured(backend: Any) -> None:
    home = backend.home
    ids = [r.task["task_id"] for r in backend.enqueue_batch([req(), req(), req()], now=T0)]
    backend.sync()

    def change(raw: dict[str, Any]) -> None:
        raw["tasks"][2]["priority"] = "critical"
        del raw["tasks"][0]
    _edit(home, change)
    assert live_ids(backend) == set(ids[1:])  # readers see it at once
    claimed = FileQueue(home).claim("w1", now=T0 + 1)  # so does a writer elsewhere
    assert claimed is not None and claimed["task_id"] == ids[2]
    assert events(home, "queue_edited")
    assert live_ids(FileQueue(home)) == set(ids[1:])  # recorded in the journal
    backend.sync()
    view = {t["task_id"]: t for t in json.loads(home.queue_file.read_bytes())["tasks"]}
    assert set(view) == set(ids[1:]) and view[ids[2]]["status"] == "running"


def test_hand_edit_of_a_stale_snapshot_keeps_later_changes(backend: Any) -> None:
    """The operator edited a snapshot that did not show the newest revision yet: edits of
    tasks unchanged since hold; a task changed after the snapshot keeps its change."""
    home = backend.home
    ids = [r.task["task_id"] for r in backend.enqueue_batch([req(), req()], now=T0)]
    backend.sync()
    backend.reprioritize(ids[0], "low", now=T0 + 1)  # not in the snapshot yet
    backend.enqueue(req(task_id="LATE"), now=T0 + 2)  # nor this

    def change(raw: dict[str, Any]) -> None:
        for task in raw["tasks"]:
            task["description"] = "edited"
    _edit(home, change)
    live = {t["task_id"]: t for t in FileQueue(home).live_tasks()}
    assert set(live) == {*ids, "LATE"}
    assert live[ids[1]]["description"] == "edited"
    assert live[ids[0]]["priority"] == "low"  # the change after the snapshot holds


def test_view_of_a_publisher_killed_before_its_journal_line_is_replaced(backend: Any) -> None:
    """A publisher killed between renaming its view into place and journaling its
    signature leaves a faithful but unknown task-queue.json: it "merges" as a hand edit
    that changes nothing, is recorded once, and the next sync publishes the whole queue
    (it used to merge it again on every try and publish nothing: a stale view)."""
    home = backend.home
    first = backend.enqueue(req(), now=T0).task["task_id"]
    backend.sync()
    old_view = home.queue_file.read_bytes()  # revision 1, as the killed publisher wrote it
    later = backend.enqueue(req(), now=T0 + 1).task["task_id"]
    tmp = home.queue_file.with_name(".killed-publisher.tmp")
    tmp.write_bytes(old_view)
    os.replace(tmp, home.queue_file)  # renamed into place; its journal line never came
    fresh = FileQueue(home)
    fresh.sync()
    view = {t["task_id"] for t in json.loads(home.queue_file.read_bytes())["tasks"]}
    assert view == {first, later}
    assert not events(home, "queue_edited")  # nothing was edited
    assert live_ids(FileQueue(home)) == {first, later}
    fresh.close()


def test_change_feed_sees_commits_through_compaction_and_ignores_the_event_log(
        backend: Any) -> None:
    """QueueBackend.changes(): readable after a commit by any process, including after a
    compaction renamed a new journal into place (the watch moves to it); appends to the
    event log beside it are not changes."""
    home = backend.home
    feed = backend.changes()
    try:
        assert not feed.drain()
        backend.enqueue(req(), now=T0)
        assert feed.drain()
        assert not feed.drain()  # consumed
        backend.sync(durable=True)  # compaction: a new task-queue.journal
        feed.drain()
        other = FileQueue(home)
        other.enqueue(req(), now=T0 + 1)
        assert feed.drain()
        other.enqueue(req(), now=T0 + 2)
        assert feed.drain()  # still watching the new journal's inode
        append_events(home, [make_event("x", source="test")])
        assert not feed.drain()
        other.close()
    finally:
        feed.close()


def test_corrupt_hand_edit_is_refused_and_repair_rebuilds_everything(backend: Any) -> None:
    home = backend.home
    ids = {r.task["task_id"] for r in backend.enqueue_batch([req() for _ in range(5)],
                                                            now=T0)}
    backend.claim("w1", now=T0 + 1)
    backend.close()
    home.queue_file.write_text('{"tasks": [')
    fresh = FileQueue(home)
    with pytest.raises(CorruptFileError):
        fresh.live_tasks()
    findings = {f.code: f for f in fresh.check(repair=True)}
    assert findings["corrupt_queue"].repaired
    assert live_ids(FileQueue(home)) == ids  # nothing lost: the journal had it all
    assert list(home.quarantine.iterdir())


def test_emptied_queue_files_are_rebuilt_from_base_and_journal(backend: Any) -> None:
    home = backend.home
    ids = {r.task["task_id"] for r in backend.enqueue_batch([req() for _ in range(5)],
                                                            now=T0)}
    backend.sync(durable=True)  # a compaction: base + new journal
    backend.enqueue(req(task_id="AFTER"), now=T0 + 1)
    backend.close()
    home.queue_file.write_bytes(b"")  # both "queue files" emptied, as in the review
    fresh = FileQueue(home)
    findings = {f.code: f for f in fresh.check(repair=True)}
    assert findings["corrupt_queue"].repaired
    assert live_ids(FileQueue(home)) == ids | {"AFTER"}


def test_history_lost_in_a_power_failure_is_restored_from_the_journal(backend: Any) -> None:
    home = backend.home
    task = backend.enqueue(req(), now=T0).task
    backend.claim("w1", now=T0)
    backend.complete(task["task_id"], "w1", now=T0 + 1)
    size = home.history_file.stat().st_size
    with open(home.history_file, "r+b") as fh:  # the page cache never reached the disk
        fh.truncate(0)
    assert size > 0
    findings = {f.code: f for f in backend.check(repair=True)}
    assert findings["history_missing"].repaired
    assert final_records(home)[task["task_id"]][-1]["status"] == "completed"


def test_snapshot_is_bounded_and_written_outside_the_lock(backend: Any) -> None:
    """Under a stream of commits the jq view is republished at most every
    SNAPSHOT_INTERVAL_S, by a timer thread, without holding the queue lock while writing."""
    home = backend.home
    backend.enqueue(req(), now=T0)
    backend.sync()
    revision = json.loads(home.queue_file.read_bytes())["revision"]
    for i in range(5):
        backend.enqueue(req(), now=T0 + i)
    # Nobody calls sync(): the timer thread publishes the newest revision by itself,
    # however its runs interleave with the commits (none is left out).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        view = json.loads(home.queue_file.read_bytes())
        if view["revision"] == revision + 5:
            break
        time.sleep(0.05)
    assert view["revision"] == revision + 5 and len(view["tasks"]) == 6


def test_unknown_queue_backend_is_a_config_error(tmp_path: Path) -> None:
    from coordination.errors import ConfigError
    from coordination.queue import open_queue
    home = make_home(tmp_path)
    raw = json.loads(home.system_config.read_bytes())
    raw["queue_backend"] = "redis"
    home.system_config.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="queue_backend"):
        open_queue(home)


def test_usage_error_in_a_batch_leaves_the_view_intact(backend: Any) -> None:
    backend.enqueue(req(task_id="A"), now=T0)
    with pytest.raises(UsageError):
        backend.enqueue_batch([req(task_id="B"), req(task_id="C", depends_on=["NOPE"])],
                              now=T0 + 1)
    assert live_ids(backend) == {"A"}
    assert live_ids(FileQueue(backend.home)) == {"A"}


def test_ensure_published_makes_an_empty_jq_view_once(backend: Any) -> None:
    home = backend.home
    assert not home.queue_file.exists()
    assert backend.ensure_published() is True
    assert json.loads(home.queue_file.read_bytes())["tasks"] == []
    assert backend.ensure_published() is False  # never replaces
    backend.enqueue(req(task_id="A"), now=T0)
    assert backend.ensure_published() is False


@needs("flock")
def test_ingest_with_zero_timeout_does_not_wait_for_a_busy_lock(backend: Any) -> None:
    """What `harness task list` uses: ingest only when the queue lock is free at once."""
    from coordination.errors import LockTimeout

    tid = backend.submit(req(), now=T0)
    lock = str(backend.home.lock_path("queue"))
    holder = subprocess.Popen(["flock", lock, "sh", "-c", "echo held; exec sleep 30"],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            backend.ingest(timeout=0)
        assert time.monotonic() - started < 1.0
        assert tid not in live_ids(backend)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # flock and the command share the lock
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert backend.ingest(timeout=5) == 1  # the killed holder's lock goes with its last fd
    assert tid in live_ids(backend)


def test_a_failed_publish_leaves_no_temp_file(backend: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk during a snapshot write: the old view stays, no temp file or link is
    left behind (the review found 48 `.task-queue.prev.json.tmp-*` after a full-disk loop),
    and the next publish succeeds."""
    import errno

    from coordination.errors import DiskFull

    home = backend.home
    backend.enqueue(req(task_id="A"), now=T0)
    backend.sync()
    before = home.queue_file.read_bytes()
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        backend.enqueue(req(task_id="B"), now=T0 + 1)  # committed: the journal has room
        for _ in range(5):
            with pytest.raises(DiskFull, match="previous version is intact"):
                backend.sync()
    assert os.write is real_write
    assert home.queue_file.read_bytes() == before
    assert [p.name for p in home.coordination.iterdir() if ".tmp" in p.name] == []
    backend.sync()
    assert {t["task_id"] for t in json.loads(home.queue_file.read_bytes())["tasks"]} == \
        {"A", "B"}


# ------------------------------------------------------------------ runnable counts
def _brute_runnable(state: LiveState, now_iso: str, paused: set[str]) -> dict[str, int]:
    """The definition: queued, type not paused, due, no live dependency."""
    out: dict[str, int] = {}
    for m in state.meta.values():
        if m.status != "queued" or m.wtype in paused:
            continue
        if (m.not_before is not None and m.not_before > now_iso) \
                or any(d in state.meta for d in m.deps):
            continue
        out[m.wtype] = out.get(m.wtype, 0) + 1
    return out


_STEPS = st.lists(st.tuples(
    st.sampled_from(["put", "put", "put", "run", "remove", "requeue"]),
    st.integers(0, 11),  # task number
    st.sampled_from(["default", "a", "b"]),
    st.sampled_from([None, "2026-01-01T00:00:00.000Z", "2026-06-01T00:00:00.000Z"]),
    st.lists(st.integers(0, 11), max_size=2)), max_size=60)


@given(steps=_STEPS, paused=st.sets(st.sampled_from(["default", "a", "b"]), max_size=2))
@settings(max_examples=150, deadline=None)
def test_runnable_counts_match_a_full_scan(steps: list[tuple[str, int, str, str | None,
                                                            list[int]]],
                                           paused: set[str]) -> None:
    """LiveState keeps the runnable count per type from counters and the held-back tasks
    (dependencies, not_before) only; it must equal a scan of every live task after any mix
    of puts, claims, requeues and removals, whatever is paused and whenever it is asked, and
    the held set must be exactly the queued tasks with dependencies or a not_before (what
    next_due looks at), the running set the running tasks (expired_leases)."""
    state = LiveState()
    for op, n, wtype, not_before, deps in steps:
        task_id = f"t-{n}"
        current = state.task(task_id)
        if op == "put":
            state.put(stored_task({"task_id": task_id, "status": "queued",
                                   "priority": "medium", "worker_type": wtype,
                                   "created_at": f"2026-01-01T00:00:{n:02d}.000Z",
                                   "not_before": not_before,
                                   "depends_on": [f"t-{d}" for d in deps if d != n]}))
        elif current is not None and op in ("run", "requeue"):
            current["status"] = "running" if op == "run" else "queued"
            state.put(current)
        elif current is not None:
            state.remove(task_id, "completed")
        assert state.held == {tid for tid, m in state.meta.items() if m.status == "queued"
                              and (m.deps or m.not_before is not None)}
        assert state.running == set(state.ids_with_status("running"))
        for now_iso in ("2025-12-31T00:00:00.000Z", "2026-03-01T00:00:00.000Z",
                        "2027-01-01T00:00:00.000Z"):
            assert state.runnable_by_type(now_iso, paused) == \
                _brute_runnable(state, now_iso, paused)


def test_publish_interval_grows_with_the_write_time_within_the_bound(backend: Any) -> None:
    """A view that is quick to write is republished every SNAPSHOT_INTERVAL_S; one that
    takes long (a big queue) less often, but the interval plus two writes always stays
    under the 1 s bound (less a tenth for scheduling) while writes take under 0.25 s."""
    from coordination.queue.file.publisher import SNAPSHOT_INTERVAL_S, VIEW_BOUND_S

    for render_s, expected in ((0.0, SNAPSHOT_INTERVAL_S), (0.002, SNAPSHOT_INTERVAL_S),
                               (0.08, 0.56), (0.11, 0.68), (0.2, 0.5)):
        backend._render_s = render_s
        interval = backend._interval()
        assert interval == pytest.approx(expected)
        assert interval + 2 * render_s <= VIEW_BOUND_S - 0.1 + 1e-9
