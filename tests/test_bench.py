"""`harness bench`: benches run and report well-formed rows. Nothing here asserts a
speed: figures vary by machine, only their shape and internal consistency are checked.

The whole ``--quick`` set is not run here: .ci/run runs ``harness bench --quick`` after
the tests (it prints the figures, and exits 1 when any bench fails, which fails CI), so
running it here too cost CI the same ~60 s twice. This module runs one cheap subset once
(module fixture, about 10 s: a latency distribution, the idle windows, the one-shot RSS
rows) and checks the row relations (throughput against the spawn ceiling) on computed
rows."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ProcGroup

from daemons.devtools import bench as bench_mod
from daemons.devtools import queue_bench
from daemons.devtools.bench_support import Figure


def bench_env(tmp: Path) -> dict[str, str]:
    """The throwaway homes go under ``tmp``; no inherited home or systemd variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HARNESS_HOME", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                        "INVOCATION_ID", "HARNESS_INSTANCE")}
    env["TMPDIR"] = str(tmp)
    return env


def run_bench(procs: ProcGroup, tmp: Path, *args: str, timeout: float = 60) -> str:
    child = procs.spawn("bench", [sys.executable, "-m", "daemons", "bench", *args],
                        env=bench_env(tmp))
    code = child.wait(timeout)
    assert code == 0, child.stderr()
    return child.out.read_text()


def rows_by_name(text: str) -> dict[str, dict[str, Any]]:
    rows = json.loads(text)
    assert isinstance(rows, list)
    return {r["name"]: r for r in rows}


#: The subset the module fixture runs: cheap benches covering each kind of row (per-run
#: figures, latency samples with percentiles, idle windows, peak RSS of one-shots).
SUBSET = ("dispatch_nofsync", "emit_event_sh_latency", "idle", "rss_oneshot")


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """``harness bench --quick --json`` of :data:`SUBSET`, run once for this module."""
    tmp = tmp_path_factory.mktemp("bench-quick")
    group = ProcGroup(tmp / "procs")
    only = [arg for name in SUBSET for arg in ("--only", name)]
    try:
        yield rows_by_name(run_bench(group, tmp, "--quick", *only, "--json", timeout=120))
    finally:
        group.close()


# ---------------------------------------------------------------------------- cheap ones
def test_list_names_every_row(procs: ProcGroup, tmp_path: Path) -> None:
    out = run_bench(procs, tmp_path, "--list")
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert listed == bench_mod.metric_names()
    assert len(set(listed)) == len(listed)
    groups = {g for b in bench_mod.BENCHES for g in b.groups}
    for wanted in ("enqueue", "calls", "claim", "events", "dispatch", "throughput", "idle",
                   "rss", "reclaim", "web"):
        assert wanted in groups


def test_only_cheap_bench_json(procs: ProcGroup, tmp_path: Path) -> None:
    rows = rows_by_name(run_bench(procs, tmp_path, "--quick", "--only", "enqueue_batch",
                                  "--only", "enqueue_batch_backlog_10000", "--only",
                                  "claim_complete_100", "--json", "--repeat", "1"))
    assert set(rows) == {"enqueue_batch", "enqueue_batch_backlog_10000", "claim_complete_100"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["runs"] == 1
        assert row["min"] <= row["median"] <= row["max"]
        assert row["median"] > 0
    assert rows["enqueue_batch"]["unit"] == "tasks/s"
    assert rows["claim_complete_100"]["unit"] == "ms/op"
    slowdown = rows["enqueue_batch_backlog_10000"]["slowdown_vs_empty"]
    assert slowdown == pytest.approx(rows["enqueue_batch"]["median"]
                                     / rows["enqueue_batch_backlog_10000"]["median"])
    assert not list(tmp_path.glob("harness-bench-*")), "throwaway homes are deleted"


def test_only_selects_groups_names_and_substrings() -> None:
    def names(*only: str) -> set[str]:
        return {b.name for b in bench_mod.select(only)}

    assert names() == {b.name for b in bench_mod.BENCHES if not b.peer and not b.postgres}
    assert {b.name for b in bench_mod.select((), peers=True)} == \
        {b.name for b in bench_mod.BENCHES if not b.postgres}
    assert {b.name for b in bench_mod.select((), peers=True, database=True)} == \
        {b.name for b in bench_mod.BENCHES}
    quick = {b.name for b in bench_mod.select((), quick=True)}
    assert "claim_complete_100000" not in quick and "claim_complete_10000" in quick
    assert names("claim_complete_100") == {"claim_complete_100"}  # exact, not _1000
    assert names("claim") == {"claim_complete_100", "claim_complete_1000",
                              "claim_complete_10000", "claim_complete_100000"}
    assert names("dispatch") == {"dispatch", "dispatch_nofsync", "dispatch_floor"}
    assert names("floors") == {"dispatch_floor", "throughput_floor"}
    assert "throughput_floor" in names("peers")  # beside the peer, in the same run
    assert names("throughput_2w") == {"throughput"}  # a row selects its bench
    assert names("idle") == {"idle"}
    assert names("batch_") == {"enqueue_batch_backlog_10000", "enqueue_batch_cli"}
    assert "idle" in names("rss") and "rss_oneshot" in names("rss")
    assert names("no-such-bench") == set()


def test_table_output(procs: ProcGroup, tmp_path: Path) -> None:
    out = run_bench(procs, tmp_path, "--quick", "--only", "events_python", "--repeat", "2")
    lines = out.splitlines()
    assert lines[0].split() == ["benchmark", "median", "min", "max", "unit", "notes"]
    assert lines[1] == "[events]"
    assert lines[2].split()[0] == "events_python" and lines[2].split()[4] == "events/s"


def test_failing_bench_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """A missing script (as a missing jq would) fails its rows only."""
    monkeypatch.setattr(queue_bench, "REPO", tmp_path / "no-repo")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    rows = bench_mod.run_benches(True, ("emit_event_sh", "events_python"), 1)
    by_name = {r["name"]: r for r in rows}
    failing = {"events_emit_event_sh", "events_emit_event_sh_x4", "emit_event_sh_latency"}
    assert set(by_name) == {*failing, "events_python"}
    for name in failing:
        assert "FileNotFoundError" in by_name[name]["error"]
        assert "median" not in by_name[name] and by_name[name]["runs"] == 0
    assert "error" not in by_name["events_python"] and by_name["events_python"]["median"] > 0
    table = "\n".join(bench_mod.format_table(rows))
    assert "error: FileNotFoundError" in table


def test_a_failing_bench_makes_the_exit_status_1(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    from click.testing import CliRunner

    from daemons.cli import cli

    monkeypatch.setattr(queue_bench, "REPO", tmp_path / "no-repo")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    failed = CliRunner().invoke(cli, ["bench", "--quick", "--only", "events_emit_event_sh",
                                      "--repeat", "1", "--json"])
    assert failed.exit_code == 1
    assert "FileNotFoundError" in failed.output
    fine = CliRunner().invoke(cli, ["bench", "--quick", "--only", "events_python",
                                    "--repeat", "1"])
    assert fine.exit_code == 0, fine.output


def test_distribution_rows_and_relations() -> None:
    metric = bench_mod.Metric("lat", "ms", "a latency")
    other = bench_mod.Metric("rate", "tasks/s", "a rate")
    b = bench_mod.Bench("b", ("g",), (metric, other), lambda r, q: {})
    rows = [bench_mod._row(b, metric, [{"lat": [float(i) for i in range(1, 101)]},
                                       {"lat": [1000.0]}], None),
            bench_mod._row(b, other, [{"rate": 10.0}, {"rate": 30.0}, {"rate": 20.0}], None)]
    lat, rate = rows
    assert lat["n"] == 101 and lat["runs"] == 2
    assert lat["p50"] == lat["median"] == 51.0
    assert lat["min"] == 1.0 and lat["max"] == 1000.0
    assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert (rate["median"], rate["min"], rate["max"]) == (20.0, 10.0, 30.0)
    assert "p95" not in rate
    text = "\n".join(bench_mod.format_table(rows))
    assert "p95" in text and "p99" in text


# ---------------------------------------------------------------------------- a quick subset
@pytest.mark.timeout(180)
def test_quick_subset_rows(quick_rows: dict[str, dict[str, Any]]) -> None:
    """The subset produced exactly its rows, in table order, none with an error."""
    wanted = [m.name for b in bench_mod.select(SUBSET) for m in b.metrics]
    assert list(quick_rows) == wanted
    assert {b.name for b in bench_mod.select(SUBSET)} == set(SUBSET)
    for row in quick_rows.values():
        assert "error" not in row, row
        assert row["runs"] >= 1
        assert row["min"] <= row["median"] <= row["max"]


@pytest.mark.timeout(180)
def test_quick_dispatch_percentiles(quick_rows: dict[str, dict[str, Any]]) -> None:
    for name in ("dispatch_latency_nofsync", "dispatch_latency_nofsync_after_commit",
                 "emit_event_sh_latency"):
        row = quick_rows[name]
        assert row["unit"] == "ms"
        assert row["min"] <= row["p50"] <= row["p95"] <= row["p99"] <= row["max"]
        assert row["p50"] == pytest.approx(row["median"])
    assert quick_rows["dispatch_latency_nofsync"]["n"] == 50


@pytest.mark.timeout(180)
def test_quick_idle_and_rss(quick_rows: dict[str, dict[str, Any]]) -> None:
    for name in ("idle_cpu_supervisor", "idle_cpu_worker", "idle_cpu_total"):
        assert quick_rows[name]["unit"] == "%core" and quick_rows[name]["n"] == 3
    for name in ("rss_supervisor", "rss_worker", "rss_janitor_run", "rss_metrics_snapshot",
                 "rss_cli_baseline"):
        assert quick_rows[name]["unit"] == "MiB" and quick_rows[name]["median"] > 1


def test_throughput_rows_relate_to_the_spawn_ceiling() -> None:
    """The throughput rows carry the ceiling and their ratio to it (computed rows: the
    throughput bench itself runs in .ci/run's `harness bench --quick`)."""
    by_bench = {b.name: b for b in bench_mod.BENCHES}
    throughput = by_bench["throughput"]
    figures = {"spawn_ceiling": 400.0, "spawn_ceiling_posix_spawn": 900.0,
               "throughput_1w": 50.0, "throughput_2w": 80.0, "throughput_4w": 100.0,
               "throughput_2w_nofsync": 120.0}
    run: dict[str, Figure] = dict(figures)
    rows = [bench_mod._row(throughput, m, [run], None) for m in throughput.metrics]
    bench_mod._relate(rows)
    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == list(figures)
    for name in ("throughput_1w", "throughput_2w", "throughput_4w", "throughput_2w_nofsync"):
        row = by_name[name]
        assert row["unit"] == "tasks/s" and row["ceiling"] == 400.0
        assert row["ratio_to_ceiling"] == pytest.approx(figures[name] / 400.0)
    assert "ratio_to_ceiling" not in by_name["spawn_ceiling_posix_spawn"]


def test_floor_rows_relate_to_harness_and_the_peer() -> None:
    """dispatch_latency and throughput_2w_600 carry their ratio to the host's floor, and
    the throughput floor its ratio to huey (computed rows)."""
    by_bench = {b.name: b for b in bench_mod.BENCHES}
    runs: dict[str, dict[str, Figure]] = {
        "dispatch": {"dispatch_latency": [4.0, 5.0, 6.0],
                     "dispatch_latency_after_commit": [3.0]},
        "dispatch_floor": {"dispatch_floor": [2.0, 2.5, 3.0]},
        "throughput_floor": {"throughput_floor_2w_600": 500.0},
        "peers": {"throughput_2w_600": 300.0, "peer_huey_2w_600": 800.0,
                  "peer_huey_2w_600_fsync": 250.0}}
    rows = [bench_mod._row(by_bench[name], m, [run], None)
            for name, run in runs.items() for m in by_bench[name].metrics]
    bench_mod._relate(rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["dispatch_latency"]["ratio_to_floor"] == pytest.approx(5.0 / 2.5)
    assert by_name["throughput_2w_600"]["ratio_to_floor"] == pytest.approx(300.0 / 500.0)
    assert by_name["throughput_floor_2w_600"]["ratio_to_peer"] == pytest.approx(500 / 800)
    assert "vs floor 2.00" in "\n".join(bench_mod.format_table(rows))


@pytest.mark.timeout(120)
def test_floors_run_their_tasks(tmp_path: Path) -> None:
    """The floors do the per-task work they claim: every dispatch sample is a date read
    after its enqueue, and the throughput floor's journal holds one claim and one
    completion per task, each with its result folder and log file."""
    from daemons.devtools.floors import dispatch_floor, throughput_floor

    samples = dispatch_floor(tmp_path / "d", 5)
    assert len(samples) == 5 and all(0 < s < 10_000 for s in samples)
    assert sorted(p.name for p in (tmp_path / "d" / "floor-dispatch" / "results").iterdir()) \
        == [f"t-{i:06d}" for i in range(5)]
    rate = throughput_floor(tmp_path / "t", 2, 40)
    assert rate > 0
    folder = tmp_path / "t" / "floor-throughput-2w"
    journal = (folder / "journal").read_text()
    for i in range(40):
        task = f"t-{i:06d}"
        assert journal.count(f'"claim","task_id":"{task}"') == 1
        assert journal.count(f'"complete","task_id":"{task}","exit_code":0') == 1
        assert (folder / "results" / task).is_dir() and (folder / "logs" / f"{task}.log").is_file()
