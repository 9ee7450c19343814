"""`harness load-test`: scenarios run real workers through the autoscaling supervisor.

The figures (throughput, latency) are only printed by CI (`.ci/run`); these tests check the
report's accounting and the pass/fail rule, and that nothing is left running.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from coordination.jsonl import iter_jsonl
from daemons.cli import cli
from daemons.devtools.loadtest import SCENARIOS, Scenario, run_scenario

pytestmark = pytest.mark.timeout(180)


def _leftovers(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " ".join(
                f"{k}={v}" for k, v in (proc.info["environ"] or {}).items())
        except (psutil.Error, TypeError):
            continue
        if marker in text:
            found.append(proc)
    return found


def test_scenarios_match_the_issue() -> None:
    table = {name: (s.tasks, s.workers, s.failure_rate) for name, s in SCENARIOS.items()}
    assert table == {"smoke": (10, 5, 0.10), "light": (50, 8, 0.10),
                     "medium": (100, 15, 0.10), "heavy": (200, 25, 0.10),
                     "stress": (300, 35, 0.15)}
    assert all(s.variance == pytest.approx(0.3) for s in SCENARIOS.values())


def test_smoke_scenario_passes_and_accounts_for_every_task(tmp_path: Path) -> None:
    home_root = tmp_path / "home"
    report = run_scenario(SCENARIOS["smoke"], time_scale=0.1, root=home_root, seed=7)
    assert report["tasks"] == 10 and report["finished"] == 10
    assert report["completed"] + report["failed"] == 10
    assert report["attempts"] == report["finished"] + report["retries"]
    # Every attempt is in the history, and the final records match the report.
    finals = [r for _, r in iter_jsonl(home_root / "coordination" / "task-history.jsonl")
              if r and r.get("final")]
    assert len(finals) == 10
    assert sum(1 for r in finals if r["status"] == "completed") == report["completed"]
    assert report["peak_concurrent_workers"] >= 1
    assert report["scale_up"] >= 1  # one worker at the start, a burst of 10 tasks
    assert report["latency_p95_s"] <= report["latency_p99_s"]
    assert set(report["checks"]) == {"success_rate>=80%", "health_not_unhealthy",
                                     "stalls<10%_of_workers", "peak_concurrency_within_20%",
                                     "all_tasks_finished"}
    assert report["passed"] is all(report["checks"].values())
    assert report["passed"], report
    assert _leftovers(str(home_root)) == []


def test_failing_workload_fails_the_run(tmp_path: Path) -> None:
    """Every attempt fails: the retries are spent, success is 0%, exit status is 1.

    One task only: its three attempts stay under `circuit_min_tasks`, so the circuit
    breaker does not pause the type (which would hold the retries for its cool-down)."""
    sc = Scenario("all-fail", tasks=1, workers=1, mean_duration_s=0.05, variance=0.0,
                  failure_rate=1.0, ramp_up_s=0.0)
    home_root = tmp_path / "home"
    report = run_scenario(sc, time_scale=1.0, root=home_root, seed=1, timeout_s=60)
    assert report["failed"] == 1 and report["completed"] == 0
    assert report["retries"] == 2  # max_attempts 3 by default
    assert report["circuit_opens"] == 0
    assert report["checks"]["success_rate>=80%"] is False
    assert report["passed"] is False
    assert _leftovers(str(home_root)) == []


def test_cli_json_and_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "daemons", "load-test", "--scenario", "smoke", "--tasks", "4",
         "--workers", "2", "--mean-duration", "0.05", "--failure-rate", "0", "--time-scale",
         "1", "--json"], capture_output=True, text=True, timeout=150, cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert report["scenario"]["name"] == "smoke+custom"
    assert report["scenario"]["tasks"] == 4 and report["scenario"]["workers"] == 2
    assert report["success_rate"] == 1.0
    assert proc.returncode == (0 if report["passed"] else 1), proc.stderr


def test_help_lists_scenarios_and_pass_rule() -> None:
    result = CliRunner().invoke(cli, ["load-test", "--help"])
    assert result.exit_code == 0
    for word in ("smoke 10/5", "stress 300/35", "success >= 80%", "--time-scale"):
        assert word in result.output
