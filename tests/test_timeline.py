"""``harness timeline``: one ordered story of a task or a correlation id."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from helpers import make_home, req

from coordination import clock
from coordination.errors import NotFound
from coordination.events import emit
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import complete_spec, new_spec, write_spec
from coordination.store import replace_bytes
from daemons.cli import cli
from daemons.reporting.timeline import build_timeline

T = 1_700_000_000.0


def _story(tmp_path: Path) -> tuple[Home, str, str, str]:
    """Task A: created T, attempt 1 on worker-1 (T+10..T+20, fails, worker-1 crashes at
    T+25), attempt 2 on worker-2 (T+30..T+50, completes). Task B shares A's correlation id;
    task C is unrelated. A's log has 30 lines."""
    home = make_home(tmp_path, retry_backoff_base_s=0, durability="none")
    q = TaskQueue(home)
    a = q.enqueue(req(description="task A", correlation_id="deploy-42"), now=T).task["task_id"]
    b = q.enqueue(req(description="task B", correlation_id="deploy-42", priority="low"),
                  now=T + 1).task["task_id"]
    c = q.enqueue(req(description="task C", priority="low"), now=T + 2).task["task_id"]
    for worker_id, start in (("worker-1", T + 5), ("worker-2", T + 28)):
        spec = new_spec(worker_id, worker_id[-1], start)
        write_spec(home, spec, create=True)
    assert q.claim("worker-1", now=T + 10)["task_id"] == a  # type: ignore[index]
    emit(home, "task_progress", task_id=a, worker_id="worker-1", message="half way",
         now=T + 15)
    q.fail(a, "worker-1", error="exit 1: password=hunter2", now=T + 20)
    complete_spec(home, "worker-1", "crashed", T + 25)
    assert q.claim("worker-2", now=T + 30)["task_id"] == a  # type: ignore[index]
    q.complete(a, "worker-2", result={"tokens_used": 42, "api_key": "sk-abcdefghijklmnopqrstuv"},
               now=T + 50)
    assert q.claim("worker-2", now=T + 60)["task_id"] == b  # type: ignore[index]
    home.task_logs.mkdir(parents=True, exist_ok=True)
    log = home.task_log(a)
    log.write_text("".join(f"line {i}\n" for i in range(30)) + "token ghp_"
                   + "a" * 36 + "\n")
    os.utime(log, (T + 49, T + 49))
    return home, a, b, c


def _kinds(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["kind"], e["summary"]) for e in entries]


def test_timeline_of_a_task_is_ordered(tmp_path: Path) -> None:
    home, a, b, _ = _story(tmp_path)
    t = build_timeline(home, a)
    entries = t["entries"]
    stamps = [e["timestamp"] for e in entries]
    assert stamps == sorted(stamps)
    assert t["task_ids"] == [a] and t["workers"] == ["worker-1", "worker-2"]
    expected = [
        ("task", "task created: medium default task A"),
        ("event", "task_enqueued: "),
        ("worker", "worker started (instance 1"),
        ("event", "task_claimed: attempt 1/3"),
        ("event", "task_progress: half way"),
        ("history", "attempt 1/3 ended failed -> failed: exit 1"),
        ("event", "task_retry_scheduled: "),
        ("worker", "worker exited: crashed"),
        ("worker", "worker started (instance 2"),
        ("worker", "last heartbeat (starting"),
        ("event", "task_claimed: attempt 2/3"),
        ("log", "last 20 line(s) of "),
        # At one instant, the history record comes before the event it caused.
        ("history", "task completed (completed; attempt 2/3, exit 0)"),
        ("event", "task_completed: "),
    ]
    assert len(entries) == len(expected), _kinds(entries)
    for entry, (kind, prefix) in zip(entries, expected, strict=True):
        assert entry["kind"] == kind and entry["summary"].startswith(prefix), _kinds(entries)
    assert entries[0]["timestamp"] == clock.iso(T)
    assert entries[-1]["timestamp"] == entries[-2]["timestamp"] == clock.iso(T + 50)
    log = entries[-3]
    assert log["data"]["lines"][0] == "line 11" and len(log["data"]["lines"]) == 20
    assert not any(e.get("task_id") == b for e in entries)


def test_timeline_is_redacted(tmp_path: Path) -> None:
    home, a, _, _ = _story(tmp_path)
    text = orjson.dumps(build_timeline(home, a)).decode()
    assert "hunter2" not in text and "sk-abcdefghijklmnopqrstuv" not in text
    assert "ghp_" + "a" * 36 not in text
    assert "password=[redacted]" in text and '"tokens_used":42' in text


def test_timeline_by_correlation_merges_its_tasks(tmp_path: Path) -> None:
    home, a, b, c = _story(tmp_path)
    t = build_timeline(home, correlation_id="deploy-42")
    assert t["task_ids"] == sorted([a, b])
    ids = {e["task_id"] for e in t["entries"] if e["task_id"]}
    assert ids == {a, b} and c not in ids
    stamps = [e["timestamp"] for e in t["entries"]]
    assert stamps == sorted(stamps)
    assert any(e["summary"].startswith("now running") and e["task_id"] == b
               for e in t["entries"])


def test_timeline_cli_text_and_json(tmp_path: Path) -> None:
    home, a, _, _ = _story(tmp_path)
    runner = CliRunner()
    text = runner.invoke(cli, ["--home", str(home.root), "timeline", a],
                         catch_exceptions=False)
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0].startswith(f"timeline of task {a}: 1 task(s), 2 worker(s)")
    assert lines[1].startswith(clock.iso(T)) and "task created" in lines[1]
    assert "    | line 29" in text.output
    js = runner.invoke(cli, ["timeline", "--home", str(home.root), "--correlation",
                             "deploy-42", "--json"], catch_exceptions=False)
    assert js.exit_code == 0 and len(orjson.loads(js.output)["task_ids"]) == 2


def test_timeline_usage_and_not_found(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    runner = CliRunner()
    both = runner.invoke(cli, ["--home", str(home.root), "timeline", "t-x", "--correlation",
                               "c"])
    assert both.exit_code == 2
    missing = runner.invoke(cli, ["--home", str(home.root), "timeline", "t-missing"])
    assert missing.exit_code == 1 and "nothing in the home mentions" in missing.output
    with pytest.raises(NotFound):
        build_timeline(home, "t-missing")


def test_timeline_reads_rotated_archives_on_request(tmp_path: Path) -> None:
    home, a, _, _ = _story(tmp_path)
    # Move the oldest events into an archive, as the janitor's rotation does.
    lines = home.events_file.read_bytes().splitlines(keepends=True)
    with gzip.open(home.coordination / "dashboard-events.1.jsonl.gz", "wb") as fh:
        fh.write(b"".join(lines[:3]))
    replace_bytes(home.events_file, b"".join(lines[3:]), "none")
    recent = build_timeline(home, a)
    full = build_timeline(home, a, archives=True)
    assert len(full["entries"]) > len(recent["entries"])
    assert any("task_enqueued" in e["summary"] for e in full["entries"])


def test_timeline_of_a_large_history_prefilters(tmp_path: Path) -> None:
    home, a, _, _ = _story(tmp_path)
    noise = b"".join(orjson.dumps({"task_id": f"t-noise-{i}", "recorded_at": clock.iso(T),
                                   "final": True}) + b"\n" for i in range(50_000))
    with open(home.history_file, "ab") as fh:
        fh.write(noise)
    start = time.monotonic()
    t = build_timeline(home, a)
    assert time.monotonic() - start < 5
    assert len([e for e in t["entries"] if e["kind"] == "history"]) == 2
