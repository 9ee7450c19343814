"""``harness status`` and ``harness check`` (plus scripts/check-performance.sh, the cron
file and the metrics systemd units)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from helpers import (
    REPO_ROOT,
    Known,
    build_known_home,
    events,
    make_home,
    needs,
    present,
    req,
    set_system,
)

from coordination import clock
from coordination.control import update_control
from coordination.events import emit
from coordination.metrics import HISTORY_TAIL_MAX_BYTES
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.store import append_bytes, read_json, replace_bytes
from daemons.cli import cli
from daemons.reporting.checks import check_state_file, run_check
from daemons.reporting.status import collect_status
from daemons.systemd_units import render_unit

HARNESS = str(Path(sys.executable).with_name("harness"))
CHECK_SH = REPO_ROOT / "scripts" / "check-performance.sh"
SUMMARY_RE = re.compile(r"^HARNESS (OK|WARNING|CRITICAL) - .+ \| (\S+=\S+;\S+;\S+ ?)+$")


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def known(tmp_path: Path) -> Known:
    return build_known_home(tmp_path)


# ---------------------------------------------------------------------------- status
def test_status_json_summary(known: Known) -> None:
    update_control(known.home, lambda s: s["paused_types"].update(
        shell={"since": clock.iso(known.now), "until": None, "reason": "maintenance"}))
    emit(known.home, "disk_low", severity="warning", message="token=abc123secret left")
    emit(known.home, "chatter", severity="info", message="not an alert")
    result = invoke("status", "--home", str(known.home.root), "--json")
    assert result.exit_code == 0, result.output
    s = orjson.loads(result.output)
    assert s["health"]["state"] == "degraded"
    assert s["backpressure"] is True
    assert (s["queue"]["queued"], s["queue"]["running"], s["queue"]["dead_letters"]) == (2, 1, 1)
    rows = {w["worker_id"]: w for w in s["workers"]}
    assert rows[known.busy_worker]["current_task_id"] == known.running
    assert 4 <= rows[known.busy_worker]["heartbeat_age_s"] < 30
    assert rows[known.stalled_worker]["stalled"] is True
    assert rows[known.idle_worker]["state"] == "idle"
    assert list(s["paused_types"]) == ["shell"]
    alert_types = [a["type"] for a in s["alerts"]]
    assert "disk_low" in alert_types and "chatter" not in alert_types
    disk_low = next(a for a in s["alerts"] if a["type"] == "disk_low")
    assert "abc123secret" not in disk_low["message"] and "[redacted]" in disk_low["message"]


def test_status_text(known: Known) -> None:
    result = invoke("--home", str(known.home.root), "status")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "health: DEGRADED (computed)" in out
    assert "queue: 2 queued, 1 running, 1 dead letter(s)" in out
    assert "backpressure ON (max 1)" in out
    assert known.busy_worker in out and known.running in out
    # worker-stalled's heartbeat is 200 s old: proven dead, which wins over "stalled".
    assert "1 stalled, 1 dead" in out and "paused types: none" in out
    (line,) = [x for x in out.splitlines() if x.startswith(f"  {known.stalled_worker} ")]
    assert " dead " in line and "DEAD: heartbeat is" in line and "spec says busy" in line


def _liveness_home(tmp_path: Path) -> tuple[Home, float, dict[str, str]]:
    """A running task per worker: one alive (this process), one whose pid is gone, one
    whose pid was reused (recorded start time 100 s off), one with a stale heartbeat but
    a live pid (frozen), one on another host with a fresh heartbeat."""
    from helpers import dead_pid

    from coordination.specs import new_spec, write_spec

    home = make_home(tmp_path, durability="none", heartbeat_timeout_s=60)
    q = TaskQueue(home)
    now = time.time()
    ids = {}
    for wid in ("w-alive", "w-gone", "w-reused", "w-frozen", "w-remote"):
        tid = q.enqueue(req(description=wid), now=now - 30).task["task_id"]
        assert present(q.claim(wid, now=now - 20))["task_id"] == tid
        ids[wid] = tid
        spec = new_spec(wid, wid, now - 20)
        spec.update({"state": "busy", "current_task_id": tid,
                     "task_started_at": clock.iso(now - 20), "heartbeat_at": clock.iso(now - 2),
                     "progress": 1})
        if wid == "w-gone":
            spec["pid"] = dead_pid()
        elif wid == "w-reused":
            assert spec["process_start_time"] is not None
            spec["process_start_time"] -= 100
        elif wid == "w-frozen":
            spec["heartbeat_at"] = clock.iso(now - 90)
        elif wid == "w-remote":
            spec.update({"hostname": "elsewhere.invalid", "pid": 1})
        write_spec(home, spec, create=True)
    return home, now, ids


def test_status_shows_proven_dead_workers_as_dead_not_busy(tmp_path: Path) -> None:
    home, now, ids = _liveness_home(tmp_path)
    s = collect_status(home, now)
    rows = {w["worker_id"]: w for w in s["workers"]}
    for wid in ("w-alive", "w-remote"):
        assert rows[wid]["state"] == "busy" and rows[wid]["alive"] is True, rows[wid]
        assert rows[wid]["dead_reason"] is None
    proofs = {"w-gone": "is gone", "w-reused": "was reused", "w-frozen": "heartbeat is"}
    for wid, proof in proofs.items():
        row = rows[wid]
        assert row["state"] == "dead" and row["alive"] is False, row
        assert row["spec_state"] == "busy" and proof in row["dead_reason"], row
        assert row["current_task_id"] == ids[wid]
    wc = s["worker_counts"]
    assert (wc["active"], wc["busy"], wc["dead"]) == (5, 2, 3)
    result = invoke("status", "--home", str(home.root))
    assert result.exit_code == 0, result.output
    assert "workers: 5 active (busy 2, idle 0, draining 0)" in result.output
    assert "3 dead" in result.output
    lines = {wid: next(x for x in result.output.splitlines() if x.startswith(f"  {wid} "))
             for wid in rows}
    for wid, proof in proofs.items():
        assert "DEAD: " in lines[wid] and proof in lines[wid], lines[wid]
    assert "DEAD" not in lines["w-alive"] and "DEAD" not in lines["w-remote"]


def test_status_reads_history_and_events_backwards_only(tmp_path: Path) -> None:
    """On a home with 35+ MB of history and events, status reads a bounded part of them
    (measured with the kernel's per-process byte counter)."""
    home = make_home(tmp_path)
    now = time.time()
    pad = "x" * 900
    old = b"".join(orjson.dumps({"task_id": f"t-{i}", "status": "completed", "final": True,
                                 "recorded_at": clock.iso(now - 86400), "pad": pad}) + b"\n"
                   for i in range(20_000))
    append_bytes(home.history_file, old, "none")
    ev = b"".join(orjson.dumps({"event_id": f"ev-{i}", "timestamp": clock.iso(now - 86400),
                                "type": "noise", "severity": "info", "message": pad}) + b"\n"
                  for i in range(20_000))
    append_bytes(home.events_file, ev, "none")
    big = home.history_file.stat().st_size + home.events_file.stat().st_size
    assert big > 35 * 1024 * 1024

    def rchar() -> int:
        with open("/proc/self/io") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("rchar"))

    before = rchar()
    summary = collect_status(home, now)
    spent = rchar() - before
    assert summary["queue"]["queued"] == 0
    # One 256 KiB chunk of history (the window stops at the first old record) and the
    # newest ALERT_SCAN_LINES events (about 2 MB of these fat lines).
    assert spent < HISTORY_TAIL_MAX_BYTES // 2, spent
    assert spent < big / 10


# ---------------------------------------------------------------------------- check
def _check(home: Home, *extra: str) -> Any:
    return invoke("check", "--home", str(home.root), *extra)


def test_check_ok_exit_0(tmp_path: Path) -> None:
    home = make_home(tmp_path, check_disk_free_mb=[1, 0])
    result = _check(home)
    first = result.output.splitlines()[0]
    assert result.exit_code == 0, result.output
    assert first.startswith("HARNESS OK - 9 checks ok | queue_depth=0;500;900")
    assert SUMMARY_RE.match(first), first


def test_check_warning_exit_1(tmp_path: Path) -> None:
    known = build_known_home(tmp_path, check_error_rate=[0.4, 0.9], check_disk_free_mb=[1, 0])
    result = _check(known.home)
    first = result.output.splitlines()[0]
    assert result.exit_code == 1, result.output
    assert first.startswith("HARNESS WARNING - error_rate=0.5 (warn 0.4), "
                            "stalled_workers=1 (warn 1) [worker-stalled] | ")
    assert SUMMARY_RE.match(first), first
    assert "error_rate=0.5;0.4;0.9" in first and "stalled_workers=1;1;3" in first


def test_check_critical_exit_2(known: Known) -> None:
    set_system(known.home, check_disk_free_mb=[1, 0])
    result = _check(known.home)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("HARNESS CRITICAL - error_rate=0.5 (crit 0.5)")


def test_check_disk_free_lower_is_worse(tmp_path: Path) -> None:
    home = make_home(tmp_path, check_disk_free_mb=[10**12, 10**11])
    result = _check(home, "--json")
    out = orjson.loads(result.output)
    assert result.exit_code == 2 and out["status"] == "CRITICAL"
    disk = next(c for c in out["checks"] if c["name"] == "disk_free_mb")
    assert disk["level"] == "critical" and disk["lower_is_worse"] is True


def test_check_file_size_thresholds(tmp_path: Path) -> None:
    home = make_home(tmp_path, check_file_mb=[0.5, 100], check_events_file_mb=[0.25, 0.4],
                     check_disk_free_mb=[1, 0])
    replace_bytes(home.events_file, b'{"type":"x"}\n' * 50_000, "none")  # 0.62 MB
    result = _check(home)
    assert result.exit_code == 2, result.output
    assert "events_file_mb=0.62 (crit 0.4)" in result.output
    assert "file_mb=0.62 (warn 0.5) [dashboard-events.jsonl]" in result.output


@pytest.mark.parametrize("damage", ["missing", "corrupt_queue"])
def test_check_unknown_exit_3(tmp_path: Path, damage: str) -> None:
    home = make_home(tmp_path)
    if damage == "missing":
        home = Home(tmp_path / "nothing")
    else:
        replace_bytes(home.queue_file, b'{"version": 1, "tasks": [', "none")
    result = _check(home)
    assert result.exit_code == 3, result.output
    assert result.output.startswith("HARNESS UNKNOWN - ")
    assert len(result.output.splitlines()) == 1
    as_json = _check(home, "--json")
    assert as_json.exit_code == 3 and orjson.loads(as_json.output)["status"] == "UNKNOWN"


def _unserved_home(tmp_path: Path, **overrides: Any) -> tuple[Home, float]:
    """The issue's scene: 12 tasks queued 6 minutes ago, no worker, no supervisor."""
    home = make_home(tmp_path, check_disk_free_mb=[1, 0], durability="none", **overrides)
    now = time.time()
    TaskQueue(home).enqueue_batch([req(description=f"t{i}") for i in range(12)],
                                  now=now - 360)
    return home, now


def test_check_alerts_when_nothing_serves_the_queue(tmp_path: Path) -> None:
    home, _ = _unserved_home(tmp_path)
    result = _check(home, "--json")
    out = orjson.loads(result.output)
    assert result.exit_code == 2 and out["status"] == "CRITICAL", result.output
    checks = {c["name"]: c for c in out["checks"]}
    oldest, stale = checks["oldest_queued_s"], checks["supervisor_stale_s"]
    assert oldest["level"] == "warning" and 360 <= oldest["value"] < 400
    assert (oldest["warning"], oldest["critical"]) == (300, 1800)
    assert stale["level"] == "critical" and 360 <= stale["value"] < 400
    assert "no supervisor has run" in stale["detail"]
    assert "supervisor_stale_s=" in out["summary"] and "(crit 180)" in out["summary"]
    prom = invoke("metrics", "show", "--home", str(home.root), "--no-textfile").output
    (age,) = [x for x in prom.splitlines() if x.startswith("harness_oldest_runnable_age_")]
    assert 360 <= float(age.split()[1]) < 400
    assert "harness_supervisor_health_age_seconds NaN" in prom
    snap = orjson.loads(invoke("metrics", "show", "--home", str(home.root), "--json").output)
    assert snap["supervisor"] == {"supervisor": "absent", "health_updated_at": None,
                                  "health_age_s": None}
    assert snap["queue"]["oldest_runnable_age_s"] >= 360


def test_check_with_a_live_supervisor_and_a_paused_type(tmp_path: Path) -> None:
    """A fresh health.json clears the supervisor check; tasks of a paused type or with a
    future not_before are not runnable, so they do not age the oldest-queued check."""
    from coordination.metrics import health_document

    home, now = _unserved_home(tmp_path)
    replace_bytes(home.health_file, orjson.dumps(health_document(
        None, [], backpressure=False, now=now - 10)), "none")
    checks = {c["name"]: c for c in orjson.loads(_check(home, "--json").output)["checks"]}
    assert checks["supervisor_stale_s"]["level"] == "ok"
    assert 10 <= checks["supervisor_stale_s"]["value"] < 60
    assert checks["oldest_queued_s"]["level"] == "warning"
    update_control(home, lambda st: st["paused_types"].update(
        default={"since": clock.iso(now), "until": None, "reason": "test"}))
    TaskQueue(home).enqueue(req(worker_type="shell", description="later",
                                not_before=clock.iso(now + 600)), now=now - 3000)
    out = orjson.loads(_check(home, "--json").output)
    checks = {c["name"]: c for c in out["checks"]}
    assert checks["oldest_queued_s"]["value"] is None
    assert checks["oldest_queued_s"]["level"] == "ok", out["summary"]
    # The same rule through the thresholds in system.json: 5 s is already critical.
    update_control(home, lambda st: st["paused_types"].clear())
    set_system(home, check_oldest_queued_s=[1, 5], check_supervisor_stale_s=5)
    out = orjson.loads(_check(home, "--json").output)
    checks = {c["name"]: c for c in out["checks"]}
    assert checks["oldest_queued_s"]["level"] == "critical"
    assert checks["supervisor_stale_s"]["level"] == "critical"


def test_status_says_what_to_run_when_nothing_serves_the_queue(tmp_path: Path) -> None:
    home, _ = _unserved_home(tmp_path)
    result = invoke("--home", str(home.root), "status")
    assert result.exit_code == 0, result.output
    assert "supervisor: absent (no health.json)" in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("NOTHING SERVES")]
    assert "12 task(s) waiting" in line and "`harness up`" in line
    assert "systemctl --user start harness-supervisor.service" in line
    s = orjson.loads(invoke("--home", str(home.root), "status", "--json").output)
    assert s["service"]["served"] is False and s["service"]["waiting"] == 12
    assert s["queue"]["oldest_runnable_age_s"] >= 360
    # A running supervisor serves it (it starts workers): no hint.
    from coordination.metrics import health_document

    replace_bytes(home.health_file, orjson.dumps(health_document(
        None, [], backpressure=False, now=time.time())), "none")
    result = invoke("--home", str(home.root), "status")
    assert "supervisor: running" in result.output and "NOTHING SERVES" not in result.output


@pytest.mark.parametrize("damage", ["bad_config", "bad_json"])
def test_check_critical_on_an_invalid_config(tmp_path: Path, damage: str) -> None:
    """A config known to be bad is CRITICAL (the daemons run on stale values meanwhile),
    naming the file and the key."""
    home = make_home(tmp_path)
    if damage == "bad_config":
        set_system(home, check_queue_depth=[1])
    else:
        replace_bytes(home.system_config, b"{not json", "none")
    result = _check(home)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("HARNESS CRITICAL - ")
    assert "system.json" in result.output
    as_json = _check(home, "--json")
    assert as_json.exit_code == 2 and orjson.loads(as_json.output)["status"] == "CRITICAL"


def _alerts(home: Home) -> list[dict[str, Any]]:
    return events(home, "performance_alert")


def _recoveries(home: Home) -> list[dict[str, Any]]:
    return events(home, "performance_recovered")


def test_alerts_are_emitted_once_per_crossing_and_recoveries_on_clearing(
        tmp_path: Path) -> None:
    home = make_home(tmp_path, check_queue_depth=[2, 5], check_disk_free_mb=[1, 0])
    q = TaskQueue(home)
    assert _check(home).exit_code == 0
    assert not _alerts(home) and not _recoveries(home)
    q.enqueue_batch([req() for _ in range(3)])
    assert _check(home).exit_code == 1
    assert _check(home).exit_code == 1            # still crossed: no second event
    alerts = _alerts(home)
    assert len(alerts) == 1
    assert alerts[0]["severity"] == "warning" and alerts[0]["source"] == "harness-check"
    assert alerts[0]["data"]["check"] == "queue_depth"
    assert alerts[0]["data"]["previous"] == "ok" and alerts[0]["data"]["level"] == "warning"
    state = read_json(check_state_file(home))
    assert state["checks"]["queue_depth"]["level"] == "warning"
    since = state["checks"]["queue_depth"]["since"]
    q.enqueue_batch([req() for _ in range(3)])    # 6 queued: the critical threshold
    assert _check(home).exit_code == 2
    assert _check(home).exit_code == 2
    alerts = _alerts(home)
    assert [a["data"]["level"] for a in alerts] == ["warning", "critical"]
    assert alerts[1]["severity"] == "critical"
    assert read_json(check_state_file(home))["checks"]["queue_depth"]["since"] >= since
    assert not _recoveries(home)
    set_system(home, check_queue_depth=[100, 200])  # clears it
    assert _check(home).exit_code == 0
    assert _check(home).exit_code == 0
    recovered = _recoveries(home)
    assert len(recovered) == 1 and len(_alerts(home)) == 2
    assert recovered[0]["data"] == {"check": "queue_depth", "level": "ok",
                                    "previous": "critical", "value": 6.0,
                                    "warning": 100.0, "critical": 200.0}
    assert recovered[0]["severity"] == "info"


def test_check_no_alerts_touches_nothing(tmp_path: Path) -> None:
    home = make_home(tmp_path, check_queue_depth=[0, 5])
    result = _check(home, "--no-alerts")
    assert result.exit_code == 1
    assert not check_state_file(home).exists() and not _alerts(home)


def test_corrupt_check_state_is_replaced_with_a_note(tmp_path: Path) -> None:
    home = make_home(tmp_path, check_queue_depth=[0, 5], check_disk_free_mb=[1, 0])
    replace_bytes(check_state_file(home), b"garbage", "none")
    run = run_check(home)
    assert run.exit_code == 1 and run.notes and len(run.alerts) == 1
    assert read_json(check_state_file(home))["checks"]["queue_depth"]["level"] == "warning"


# ---------------------------------------------------------------------------- the script
def _script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HARNESS_BIN"] = HARNESS
    env.pop("HARNESS_HOME", None)
    return env


def test_check_performance_sh_passes_exit_codes_through(tmp_path: Path) -> None:
    ok = make_home(tmp_path, "ok", check_disk_free_mb=[1, 0])
    crit = make_home(tmp_path, "crit", check_queue_depth=[0, 0], check_disk_free_mb=[1, 0])
    for home, code in ((ok, 0), (crit, 2), (Home(tmp_path / "absent"), 3)):
        proc = subprocess.run(["bash", str(CHECK_SH), "--home", str(home.root)],
                              capture_output=True, text=True, env=_script_env(), timeout=60)
        assert proc.returncode == code, proc.stdout + proc.stderr
        assert proc.stdout.startswith(f"HARNESS {('OK', 'WARNING', 'CRITICAL', 'UNKNOWN')[code]}")
    env = _script_env()
    env["HARNESS_HOME"] = str(crit.root)  # resolved like the CLI
    proc = subprocess.run(["bash", str(CHECK_SH), "--json", "--no-alerts"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 2 and orjson.loads(proc.stdout)["status"] == "CRITICAL"


def test_check_performance_sh_help_and_bad_input(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(CHECK_SH), "--help"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and "Exit status" in proc.stdout
    for argv in (["--bogus"], ["--timeout", "x"], ["--home"]):
        proc = subprocess.run(["bash", str(CHECK_SH), *argv], capture_output=True, text=True,
                              env=_script_env(), timeout=30)
        assert proc.returncode == 3 and proc.stdout.startswith("HARNESS UNKNOWN - ")
    env = _script_env()
    env["HARNESS_BIN"] = str(tmp_path / "no-such-harness")
    proc = subprocess.run(["bash", str(CHECK_SH), "--home", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=30)
    assert proc.returncode == 3 and "not executable" in proc.stdout


@needs("shellcheck")
def test_scripts_are_shellcheck_clean() -> None:
    scripts = [CHECK_SH, REPO_ROOT / "scripts" / "dashboards" / "metrics-dashboard.sh"]
    proc = subprocess.run(["shellcheck", "-x", *map(str, scripts)], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------------------- cron, systemd
def test_cron_file_lines() -> None:
    text = (REPO_ROOT / "etc" / "cron.d" / "harness").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    check = [line for line in lines if "check-performance.sh" in line]
    assert len(check) == 1 and check[0].startswith("*/5 * * * * ")
    assert "--home" in check[0]
    snapshot = [line for line in text.splitlines() if "metrics snapshot" in line
                and "* * * * *" in line]
    assert len(snapshot) == 1 and "--home" in snapshot[0]


def _directives(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line or line.startswith(("#", "[")):
            continue
        assert lines[i - 1].startswith("#"), f"{path.name}: no comment above {line!r}"
        key, _, value = line.partition("=")
        out.append((key, value))
    return out


def test_metrics_units() -> None:
    service = dict(_directives(REPO_ROOT / "systemd" / "harness-metrics.service"))
    assert service["Type"] == "oneshot"
    assert service["ExecStart"] == "@HARNESS_BIN@ metrics snapshot --home @HARNESS_HOME@"
    timer = dict(_directives(REPO_ROOT / "systemd" / "harness-metrics.timer"))
    assert timer["OnCalendar"] == "*-*-* *:*:00"
    assert timer["WantedBy"] == "timers.target"


@needs("systemd-analyze")
def test_metrics_units_verify(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    for name in ("harness-metrics.service", "harness-metrics.timer"):
        text = (REPO_ROOT / "systemd" / name).read_text()
        (tmp_path / name).write_text(render_unit(text, name=name,
                                                 harness_argv=[HARNESS],
                                                 home=home.root))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           str(tmp_path / "harness-metrics.service"),
                           str(tmp_path / "harness-metrics.timer")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "harness-metrics" not in proc.stderr, proc.stderr
