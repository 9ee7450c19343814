"""Metrics snapshots, counters, health and the Prometheus exposition (coordination/metrics/,
daemons/reporting/prometheus.py, ``harness metrics``).

``build_known_home`` (also used by the other observability tests) drives the real queue so
that every figure of a snapshot is known in advance.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from helpers import Known, ProcGroup, build_known_home, make_home, set_system, temp_files
from prometheus_client.parser import text_string_to_metric_families

from coordination import clock
from coordination.errors import LockTimeout
from coordination.jsonl import read_jsonl
from coordination.metrics import (
    build_snapshot,
    compute_health,
    health_document,
    history_window,
    percentile,
    stall_reason,
    take_snapshot,
)
from coordination.queue import TaskQueue
from coordination.specs import complete_spec, new_spec, write_spec
from coordination.store import append_bytes, replace_bytes, replace_json
from daemons.cli import cli
from daemons.reporting.prometheus import render


@pytest.fixture
def known(tmp_path: Path) -> Known:
    return build_known_home(tmp_path)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ---------------------------------------------------------------------------- snapshot
def test_snapshot_contents_match_the_known_home(known: Known) -> None:
    snap = build_snapshot(known.home, known.now)
    q = snap["queue"]
    assert (q["queued"], q["running"], q["dead_letters"]) == (2, 1, 1)
    assert q["by_priority"]["medium"] == {"queued": 1, "running": 1}
    assert q["by_priority"]["low"] == {"queued": 1, "running": 0}
    assert q["by_priority"]["critical"] == {"queued": 0, "running": 0}
    assert q["oldest_queued_age_s"] == pytest.approx(120, abs=0.01)
    w = snap["workers"]
    # worker-stalled's heartbeat is 200 s old (limit 60 s): proven dead, not busy.
    assert (w["active"], w["idle"], w["busy"], w["stalled"], w["dead"]) == (3, 1, 1, 1, 1)
    assert w["stalled_ids"] == [known.stalled_worker]
    tp = snap["throughput"]
    assert (tp["completed_1m"], tp["failed_1m"]) == (1, 1)
    assert (tp["completed_window"], tp["failed_window"]) == (2, 2)
    assert tp["completed_per_min_window"] == pytest.approx(2 / 15, abs=1e-3)
    assert snap["success_rate"] == 0.5 and snap["error_rate"] == 0.5
    d = snap["durations"]
    assert (d["task_p50_s"], d["task_p95_s"], d["task_samples"]) == (45.0, 85.5, 4)
    assert (d["wait_p50_s"], d["wait_p95_s"], d["wait_samples"]) == (11.5, 12.85, 4)
    assert snap["tokens"] == {"window": 357.0, "total": 357.0}
    assert snap["backpressure"] is True
    assert snap["health"]["state"] == "degraded" and snap["health"]["source"] == "computed"
    assert snap["disk"]["free_bytes"] > 0
    for name in ("task-queue.json", "task-history.jsonl", "dashboard-events.jsonl"):
        assert snap["files"][name] == (known.home.coordination / name).stat().st_size
    c = snap["counters"]
    assert c["tasks_total"] == {"completed": 2, "failed": 1}
    assert c["attempts_total"] == {"completed": 2, "failed": 2}
    assert c["duration"] == {"sum_s": 186.0, "count": 4}
    assert c["worker_exits"]["counts"] == {"idle": 1, "crashed": 1}
    assert snap["history_window_complete"] is True


def test_take_snapshot_appends_one_line_and_counters_do_not_double_count(
        known: Known) -> None:
    first = take_snapshot(known.home, known.now)
    second = take_snapshot(known.home, known.now + 1)
    lines = read_jsonl(known.home.metrics_file).records
    assert len(lines) == 2 and lines[0]["timestamp"] == first["timestamp"]
    assert second["counters"]["tasks_total"] == {"completed": 2, "failed": 1}
    assert second["counters"]["worker_exits"]["counts"] == {"idle": 1, "crashed": 1}
    # One more finished task and one more worker exit: each counted once.
    q = TaskQueue(known.home)
    q.complete(known.running, "worker-w5", result={"tokens_used": 3}, now=known.now + 2)
    write_spec(known.home, new_spec("worker-old-3", "old", known.now), create=True)
    complete_spec(known.home, "worker-old-3", "max_tasks", known.now + 2)
    third = take_snapshot(known.home, known.now + 3)
    assert third["counters"]["tasks_total"] == {"completed": 3, "failed": 1}
    assert third["counters"]["worker_exits"]["counts"] == {"idle": 1, "crashed": 1,
                                                          "max_tasks": 1}
    assert third["tokens"]["total"] == 360.0


def test_counters_stay_monotonic_across_a_history_rotation(known: Known) -> None:
    take_snapshot(known.home, known.now)
    path = known.home.history_file
    keep = path.read_bytes().splitlines(keepends=True)[-2:]
    replace_bytes(path, b"".join(keep), "none")  # what a rotation leaves: a new inode
    TaskQueue(known.home).complete(known.running, "worker-w5", now=known.now + 5)
    snap = take_snapshot(known.home, known.now + 6)
    assert snap["counters"]["tasks_total"] == {"completed": 3, "failed": 1}


def test_torn_history_tail_is_read_next_time(known: Known) -> None:
    take_snapshot(known.home, known.now)
    record = {"task_id": "t-x", "final": True, "outcome": "completed", "status": "completed",
              "recorded_at": clock.iso(known.now + 1)}
    data = orjson.dumps(record) + b"\n"
    with open(known.home.history_file, "ab") as fh:
        fh.write(data[:10])
    snap = take_snapshot(known.home, known.now + 2)
    assert snap["counters"]["tasks_total"]["completed"] == 2
    with open(known.home.history_file, "ab") as fh:
        fh.write(data[10:])
    snap = take_snapshot(known.home, known.now + 3)
    assert snap["counters"]["tasks_total"]["completed"] == 3


def test_snapshot_waits_for_the_metrics_lock(tmp_path: Path, procs: ProcGroup) -> None:
    home = make_home(tmp_path, lock_timeout_s=0.3)
    lock = home.lock_path("metrics")
    holder = procs.spawn("flock", ["flock", str(lock), "sleep", "30"])
    deadline = time.monotonic() + 20
    with open(lock, "rb") as fh:
        while True:  # wait until the child holds the lock
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            except BlockingIOError:
                break
            assert holder.popen.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    with pytest.raises(LockTimeout):
        take_snapshot(home)
    assert not home.metrics_file.exists()


def test_empty_home_snapshot(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    snap = build_snapshot(home)
    assert snap["queue"]["queued"] == 0 and snap["workers"]["active"] == 0
    assert snap["success_rate"] is None and snap["durations"]["task_p95_s"] is None
    assert snap["health"]["state"] == "healthy"
    assert snap["counters"]["tasks_total"] == {}


# ---------------------------------------------------------------------------- health
@pytest.mark.parametrize(("rate", "stalled", "state"), [
    (None, 0, "healthy"), (1.0, 0, "healthy"), (0.8, 0, "healthy"),
    (0.79, 0, "degraded"), (0.5, 0, "degraded"), (0.49, 0, "unhealthy"),
    (1.0, 1, "degraded"), (1.0, 2, "degraded"), (1.0, 3, "unhealthy"),
    (0.9, 3, "unhealthy"), (0.3, 1, "unhealthy"),
])
def test_health_rule(rate: float | None, stalled: int, state: str) -> None:
    got, reasons = compute_health(rate, [f"w{i}" for i in range(stalled)], 900)
    assert got == state
    assert bool(reasons) == (state != "healthy")


def test_health_needs_enough_attempts_to_judge_the_rate() -> None:
    """One failure among two attempts is not an outage; stalled workers always count."""
    assert compute_health(0.5, [], 900, attempts=2, min_attempts=5) == ("healthy", [])
    state, reasons = compute_health(0.5, [], 900, attempts=5, min_attempts=5)
    assert state == "degraded" and "success rate 50%" in reasons[0]
    assert compute_health(0.0, ["w1"], 900, attempts=1, min_attempts=5)[0] == "degraded"
    assert compute_health(0.4, [], 900)[0] == "unhealthy"  # no count given: judged


def test_health_document_has_the_supervisor_format() -> None:
    doc = health_document(0.4, ["w1"], backpressure=True, now=1_700_000_000.0)
    assert doc["version"] == 1 and doc["health"] == "unhealthy"
    assert set(doc) == {"version", "updated_at", "health", "success_rate", "stalled_workers",
                        "reasons", "backpressure", "circuits"}


def test_fresh_health_file_wins_and_a_stale_one_is_ignored(known: Known) -> None:
    doc = {"version": 1, "updated_at": clock.iso(known.now - 5), "health": "unhealthy",
           "success_rate": 0.1, "stalled_workers": ["worker-idle"], "reasons": ["from sup"],
           "backpressure": False, "circuits": {"shell": {"state": "open",
                                                         "until": clock.iso(known.now)}}}
    replace_json(known.home.health_file, doc)
    snap = build_snapshot(known.home, known.now, counters=False)
    assert snap["health"]["state"] == "unhealthy"
    assert snap["health"]["source"] == "supervisor"
    assert snap["circuits"]["shell"]["state"] == "open"
    assert set(snap["workers"]["stalled_ids"]) == {"worker-idle", known.stalled_worker}
    stale = build_snapshot(known.home, known.now + 3600, counters=False)
    assert stale["health"]["source"] == "computed"
    assert any("stale" in r for r in stale["health"]["reasons"])


def test_stall_rule() -> None:
    now = 10_000.0
    spec = {"state": "busy", "heartbeat_at": clock.iso(now - 5),
            "task_started_at": clock.iso(now - 1000), "progress": 0}
    assert stall_reason(spec, now, 60, 900) is not None          # no progress for too long
    assert stall_reason(dict(spec, progress=5), now, 60, 900) is None
    assert stall_reason(dict(spec, progress=5, progress_at=clock.iso(now - 901)), now, 60,
                        900) is not None
    assert stall_reason(dict(spec, heartbeat_at=clock.iso(now - 61), progress=5), now, 60,
                        900) is not None
    assert stall_reason(dict(spec, state="idle"), now, 60, 900) is None
    # One rule for status and the supervisor: a draining worker still runs its task.
    assert stall_reason(dict(spec, state="draining"), now, 60, 900) is not None
    # The supervisor's watermark (when it first saw this progress) decides when given, at
    # the limit itself included; without a heartbeat limit the heartbeat is not judged.
    recent = dict(spec, progress=5, progress_at=clock.iso(now - 1),
                  heartbeat_at=clock.iso(now - 61))
    assert stall_reason(recent, now, None, 900, unchanged_since=now - 900) == \
        "no progress for 900s (limit 900s)"
    assert stall_reason(recent, now, None, 900, unchanged_since=now - 899) is None


def test_percentile() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    # Linear interpolation between closest ranks, the definition every p95 uses (the load
    # test's included): position (n - 1) * q.
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 0.95) == pytest.approx(95.05)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile(list(reversed(values)), 0.5) == pytest.approx(50.5)


def test_history_window_is_a_bounded_backwards_read(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    now = time.time()
    old = [{"task_id": f"t-old-{i}", "recorded_at": clock.iso(now - 86400), "pad": "x" * 500}
           for i in range(2000)]
    new = [{"task_id": f"t-new-{i}", "recorded_at": clock.iso(now - 10)} for i in range(5)]
    append_bytes(home.history_file, b"".join(orjson.dumps(r) + b"\n" for r in old + new),
                 "none")
    full = history_window(home, now - 900)
    assert [r["task_id"] for r in full.records] == [f"t-new-{i}" for i in range(5)]
    assert full.complete
    cut = history_window(home, now - 2 * 86400, max_records=100)
    assert not cut.complete and len(cut.records) == 100
    assert cut.records[-1]["task_id"] == "t-new-4"  # the newest are kept


# ---------------------------------------------------------------------------- prometheus
def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(families: dict[str, Any], family: str, name: str | None = None,
            **labels: str) -> float:
    for s in families[family].samples:
        if s.name == (name or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {family}{labels}")


def test_prometheus_exposition_parses_with_the_real_parser(known: Known) -> None:
    text = render(build_snapshot(known.home, known.now))
    fams = _families(text)
    for name in ("harness_queue_tasks", "harness_workers", "harness_tasks",
                 "harness_task_duration_seconds", "harness_worker_exits",
                 "harness_backpressure_active", "harness_health",
                 "harness_oldest_queued_age_seconds", "harness_dead_letters"):
        assert name in fams, name
        assert fams[name].documentation, name
    assert fams["harness_tasks"].type == "counter"
    assert fams["harness_worker_exits"].type == "counter"
    assert fams["harness_task_duration_seconds"].type == "summary"
    assert _sample(fams, "harness_queue_tasks", status="queued", priority="medium") == 1
    assert _sample(fams, "harness_queue_tasks", status="running", priority="medium") == 1
    assert _sample(fams, "harness_workers", state="busy") == 1  # the stalled one is dead
    assert _sample(fams, "harness_workers", state="dead") == 1
    assert _sample(fams, "harness_tasks", "harness_tasks_total", outcome="completed") == 2
    assert _sample(fams, "harness_tasks", "harness_tasks_total", outcome="failed") == 1
    assert _sample(fams, "harness_worker_exits", "harness_worker_exits_total",
                   reason="crashed") == 1
    assert _sample(fams, "harness_task_duration_seconds", quantile="0.95") == 85.5
    assert _sample(fams, "harness_task_duration_seconds",
                   "harness_task_duration_seconds_count") == 4
    assert _sample(fams, "harness_backpressure_active") == 1
    assert _sample(fams, "harness_health") == 1
    assert _sample(fams, "harness_dead_letters") == 1
    assert _sample(fams, "harness_oldest_queued_age_seconds") == pytest.approx(120, abs=0.01)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert line.startswith("harness_"), line


def test_metrics_show_cli_formats(known: Known) -> None:
    home = str(known.home.root)
    prom = invoke("--home", home, "metrics", "show", "--format", "prometheus")
    assert prom.exit_code == 0, prom.output
    assert "harness_queue_tasks" in _families(prom.output)
    js = invoke("metrics", "show", "--home", home, "--format", "json")
    assert js.exit_code == 0
    assert orjson.loads(js.output)["queue"]["queued"] == 2
    assert not known.home.metrics_file.exists()  # show never appends


def test_snapshot_cli_writes_the_textfile_atomically(tmp_path: Path) -> None:
    known = build_known_home(tmp_path)
    textfile = tmp_path / "collector" / "harness.prom"
    textfile.parent.mkdir()
    set_system(known.home, metrics_textfile=str(textfile))
    result = invoke("metrics", "snapshot", "--home", str(known.home.root))
    assert result.exit_code == 0, result.output
    assert "health=degraded" in result.output and "queued=2" in result.output
    assert len(read_jsonl(known.home.metrics_file).records) == 1
    fams = _families(textfile.read_text())
    assert _sample(fams, "harness_tasks", "harness_tasks_total", outcome="completed") == 2
    assert temp_files(textfile.parent) == []
    # A relative metrics_textfile is relative to the home.
    set_system(known.home, metrics_textfile="node.prom")
    assert invoke("metrics", "snapshot", "--home", str(known.home.root), "-q").output == ""
    assert (known.home.root / "node.prom").is_file()


def test_snapshot_cli_on_an_uninitialised_home_fails(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["metrics", "snapshot", "--home",
                                      str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "not an initialised harness home" in result.output


def test_counters_continue_past_a_garbage_last_snapshot_line(known: Known) -> None:
    take_snapshot(known.home, known.now)
    with open(known.home.metrics_file, "ab") as fh:
        fh.write(b"\x00garbage\n{torn")
    TaskQueue(known.home).complete(known.running, "worker-w5", now=known.now + 5)
    snap = take_snapshot(known.home, known.now + 6)
    assert snap["counters"]["tasks_total"] == {"completed": 3, "failed": 1}


def test_fast_timestamp_parser_agrees_with_the_clock() -> None:
    from coordination.metrics import ts_of

    for ts in (0.0, 951_782_400.5, 1_700_000_000.123, 4_102_444_799.999, time.time()):
        text = clock.iso(ts)
        assert ts_of(text) == pytest.approx(clock.parse_iso(text), abs=1e-6)
    assert ts_of("2023-11-14T22:13:20Z") == clock.parse_iso("2023-11-14T22:13:20Z")
    for bad in ("2023-13-14T22:13:20.000Z", "yesterday", None, 5, "2023-11-14T2x:13:20.000Z"):
        assert ts_of(bad) is None


def test_snapshot_and_publish_for_daemons(tmp_path: Path) -> None:
    from daemons.reporting.prometheus import snapshot_and_publish

    known = build_known_home(tmp_path, metrics_textfile="metrics/harness.prom")
    (known.home.root / "metrics").mkdir()
    snap = snapshot_and_publish(known.home, known.now)
    assert read_jsonl(known.home.metrics_file).records[-1]["timestamp"] == snap["timestamp"]
    fams = _families((known.home.root / "metrics" / "harness.prom").read_text())
    assert _sample(fams, "harness_dead_letters") == 1
