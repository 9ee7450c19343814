"""Hostile input (issue 14): ids that try to leave their folder, malformed worker specs,
arguments that are not UTF-8, non-finite timeouts. Each test failed before its fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from helpers import REPO_ROOT, make_home

from coordination.doctor import check
from coordination.errors import UsageError
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import check_spec, new_spec, read_specs
from coordination.store import replace_json
from daemons.cli import cli


def run(home: Home, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The real ``harness`` entry point (main(), as installed), in a child process."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    code = "import sys; from daemons.cli import main; sys.argv[0] = 'harness'; main()"
    return subprocess.run([sys.executable, "-c", code, "--home", str(home.root), *args],
                          capture_output=True, env=env, timeout=60, check=False)


def invoke(home: Home, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--home", str(home.root), *args])
    return result.exit_code, result.output


# ---------------------------------------------------------------------------- ids
TRAVERSALS = ["../../../../tmp/x", "../x", "..", ".hidden", "a/b", "-rf", "", "x" * 129]


@pytest.mark.parametrize("bad", TRAVERSALS)
def test_home_paths_refuse_ids_outside_the_grammar(tmp_path: Path, bad: str) -> None:
    home = Home(tmp_path)
    for build in (home.task_log, home.result_dir, home.dead_letter, home.spec_file):
        with pytest.raises(UsageError, match="not a valid"):
            build(bad)
    assert home.task_log("t-1.ok_x").name == "t-1.ok_x.log"


def test_task_show_does_not_read_a_file_outside_the_home(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    outside = tmp_path / "x.json"
    outside.write_bytes(orjson.dumps({"task_id": "x", "secret": "outside the home"}))
    rel = os.path.relpath(tmp_path / "x", home.dead_letters)
    code, out = invoke(home, "task", "show", rel)
    assert code == 2, out
    assert "outside the home" not in out
    assert "not a valid task id" in out


def test_timeline_does_not_print_a_log_outside_the_home(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    (tmp_path / "x.log").write_text("private log line\n")
    rel = os.path.relpath(tmp_path / "x", home.task_logs)
    code, out = invoke(home, "timeline", rel)
    assert code == 2, out
    assert "private log line" not in out


@pytest.mark.parametrize("args", [
    ["events", "emit", "--type", "t", "--task", "../.."],
    ["events", "emit", "--type", "t", "--worker", "../w"],
    ["events", "tail", "--task", "../x"],
    ["task", "cancel", "../x"],
    ["task", "retry", "a/b"],
    ["task", "set-priority", "..", "high"],
    ["dlq", "requeue", "../x"],
    ["dlq", "purge", "../x"],
    ["task", "add", "--type", "../t", "--", "true"],
    ["task", "add", "--depends-on", "../t", "--", "true"],
    ["pause", "--type", "../t"],
    ["resume", "--type", "../t"],
    ["drain", "--instance", "../i"],
    ["worker", "run", "--instance", "../i", "--once"],
])
def test_every_id_argument_is_checked_exit_2(tmp_path: Path, args: list[str]) -> None:
    home = make_home(tmp_path)
    code, out = invoke(home, *args)
    assert code == 2, out
    assert "not a valid" in out
    assert not home.events_file.exists() or b"../" not in home.events_file.read_bytes()


def test_worker_type_names_in_config_follow_the_grammar(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    types = orjson.loads(home.worker_types_config.read_bytes())
    types["worker_types"]["../evil"] = {"command_template": None}
    replace_json(home.worker_types_config, types)
    code, out = invoke(home, "task", "add", "--", "true")
    assert code == 2
    assert "worker type name '../evil' is not valid" in out


def test_an_inbox_request_with_a_traversing_id_is_rejected(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    request = {"task_id": "../../escape", "description": "x", "command": ["true"]}
    (home.inbox / "t-evil.json").write_bytes(orjson.dumps(request))
    queue = TaskQueue(home)
    queue.ingest()
    assert queue.live_tasks() == []
    assert not (home.root.parent / "escape.json").exists()


# ---------------------------------------------------------------------------- specs
def _spec(home: Home, **changes: object) -> Path:
    spec: dict[str, object] = dict(new_spec("worker-0-x", "0", 0.0))  # any field, any value
    spec.update(changes)
    path = home.specs_active / "worker-0-x.json"
    replace_json(path, spec, "none", pretty=True)
    return path


@pytest.mark.parametrize("changes, problem", [
    ({"current_task_id": ["x"]}, "current_task_id"),
    ({"pid": "123"}, "pid"),
    ({"pid": 1.5}, "pid"),
    ({"pid": True}, "pid"),
    ({"hostname": None}, "hostname"),
    ({"worker_id": "../w"}, "worker_id"),
    ({"heartbeat_at": 5}, "heartbeat_at"),
])
def test_malformed_specs_are_reported_not_counted(tmp_path: Path, changes: dict[str, object],
                                                  problem: str) -> None:
    home = make_home(tmp_path)
    path = _spec(home, **changes)
    reads = read_specs(home)
    assert len(reads) == 1 and reads[0].spec is None
    assert problem in (reads[0].error or "")
    # status shows it as unreadable (no traceback) and counts no worker
    code, out = invoke(home, "status", "--json")
    assert code == 0, out
    rows = orjson.loads(out)["workers"]
    assert [r["state"] for r in rows] == ["unreadable"]
    # doctor reports it; --repair quarantines it
    report = check(home)
    assert any(f.code == "corrupt_spec" and problem in f.message for f in report.findings)
    check(home, repair=True)
    assert not path.exists()
    assert any(n.startswith(path.name) for n in os.listdir(home.quarantine))


def test_status_text_survives_a_malformed_spec(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    _spec(home, current_task_id=["x"])
    code, out = invoke(home, "status")
    assert code == 0, out


def test_a_valid_spec_has_no_problem() -> None:
    spec = new_spec("worker-1-a", "1", 0.0)
    assert spec["hostname"] == socket.gethostname()
    assert check_spec(spec, "worker-1-a") == []
    assert check_spec(spec, "worker-2-a") == ["worker_id 'worker-1-a' does not match the "
                                              "file name"]


# ---------------------------------------------------------------------------- arguments
def test_invalid_utf8_argument_exit_2_without_traceback(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    for args in ([b"task", b"add", b"-d", b"caf\xe9", b"--", b"true"],
                 [b"events", b"emit", b"--type", b"t", b"--message", b"\xff\xfe"],
                 [b"task", b"show", b"\xc3"]):
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        code = "import sys; from daemons.cli import main; main()"
        res = subprocess.run([sys.executable.encode(), b"-c", code.encode(), b"--home",
                              str(home.root).encode(), *args], capture_output=True, env=env,
                             timeout=60, check=False)
        assert res.returncode == 2, res
        assert b"Traceback" not in res.stderr
        assert b"not valid UTF-8" in res.stderr
    assert TaskQueue(home).live_tasks() == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "infinity"])
def test_non_finite_timeouts_are_refused(tmp_path: Path, value: str) -> None:
    home = make_home(tmp_path)
    res = run(home, "task", "add", "--timeout", value, "--", "true")
    assert res.returncode == 2, res
    assert b"timeout" in res.stderr
    assert TaskQueue(home).live_tasks() == []


def test_non_finite_timeout_in_a_request_is_refused(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    with pytest.raises(UsageError, match="finite"):
        TaskQueue(home).enqueue({"command": ["true"], "timeout_s": float("nan")})
    with pytest.raises(UsageError, match="finite"):
        TaskQueue(home).enqueue({"command": ["true"], "timeout_s": float("inf")})


def test_emit_event_sh_checks_task_and_worker_ids(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    script = REPO_ROOT / "scripts" / "emit-event.sh"
    for option in ("--task", "--worker"):
        res = subprocess.run([str(script), "--home", str(home.root), "--type", "t",
                              option, "../../x"], capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode == 2, res.stderr
        assert "is not a valid" in res.stderr
    assert not home.events_file.exists()


def test_timeline_skips_ids_from_hand_written_lines(tmp_path: Path) -> None:
    """An event written by hand (or by an older version) may name any worker or task: the
    timeline shows it but builds no path from it."""
    home = make_home(tmp_path)
    task_id = TaskQueue(home).enqueue({"command": ["true"]}).task["task_id"]
    # worker-specs/active/../../../../evil.json is tmp_path/evil.json, outside the home
    (tmp_path / "evil.json").write_bytes(orjson.dumps(
        {"started_at": "2026-01-01T00:00:00.000Z", "instance": "LEAKED", "pid": 1}))
    line: dict[str, Any] = {
        "event_id": "ev-1", "timestamp": "2026-01-01T00:00:00.000Z", "type": "x",
        "severity": "info", "source": "hand", "message": "m", "task_id": task_id,
        "worker_id": "../../../../evil", "correlation_id": None, "data": {}}
    home.events_file.write_bytes(orjson.dumps(line) + b"\n")
    code, out = invoke(home, "timeline", task_id)
    assert code == 0, out
    assert "LEAKED" not in out


def test_supervisor_quarantines_an_unusable_spec_and_reclaims_its_task(
        tmp_path: Path) -> None:
    home = make_home(tmp_path, heartbeat_timeout_s=0.1, retry_backoff_base_s=0)
    queue = TaskQueue(home)
    task_id = queue.enqueue({"command": ["true"]}).task["task_id"]
    queue.claim("worker-0-x")
    _spec(home, pid="not-a-pid", current_task_id=task_id)
    import time

    time.sleep(0.2)  # the task is older than heartbeat_timeout_s
    result = CliRunner().invoke(cli, ["supervisor", "run", "--once", "--no-scale",
                                      "--home", str(home.root)])
    assert result.exit_code == 0, result.output
    assert not (home.specs_active / "worker-0-x.json").exists()
    assert any(n.startswith("worker-0-x.json.") for n in os.listdir(home.quarantine))
    events = [orjson.loads(line) for line in home.events_file.read_bytes().splitlines()]
    (event,) = [e for e in events if e["type"] == "worker_spec_quarantined"]
    assert "pid 'not-a-pid'" in event["message"]
    task = queue.get(task_id)
    assert task is not None and task["status"] == "queued"  # reclaimed: no active spec
