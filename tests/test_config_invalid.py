"""A bad system.json never stops a daemon (issue 14, item 8): the supervisor and the worker
keep running on the last good values, emit config_invalid, pick up the fixed file without a
restart (config_valid), and `harness check` says CRITICAL meanwhile."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO_ROOT, daemon_env, events, make_home, set_system, wait_until

from coordination import config
from coordination.config import ConfigWatch, config_problems, keep_last_good, load_system
from coordination.errors import ConfigError
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.store import parse_json, replace_bytes

HARNESS = [sys.executable, "-m", "daemons"]


@pytest.fixture
def last_good() -> Iterator[None]:
    keep_last_good(True)
    try:
        yield
    finally:
        keep_last_good(False)


def _break(home: Home) -> None:
    set_system(home, max_workers="lots")


def test_strict_mode_raises_and_names_the_key(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    load_system(home)
    _break(home)
    with pytest.raises(ConfigError, match="'max_workers'"):
        load_system(home)


def test_keep_last_good_returns_the_last_valid_values(tmp_path: Path,
                                                      last_good: None) -> None:
    home = make_home(tmp_path, max_workers=7)
    assert load_system(home)["max_workers"] == 7
    _break(home)
    assert load_system(home)["max_workers"] == 7
    assert any("max_workers" in p for p in config_problems(home))
    set_system(home, max_workers=9)  # fixed: picked up, no restart
    assert load_system(home)["max_workers"] == 9
    assert config_problems(home) == []


def test_config_watch_reports_each_change_once(tmp_path: Path, last_good: None) -> None:
    home = make_home(tmp_path)
    watch = ConfigWatch()
    assert watch.check(home) == []
    load_system(home)
    _break(home)
    first = watch.check(home)
    assert [e["type"] for e in first] == ["config_invalid"]
    assert "keeping the last good values" in first[0]["message"]
    assert watch.check(home) == []  # same problem: no second event
    replace_bytes(home.system_config, b"{not json", "none")
    assert [e["type"] for e in watch.check(home)] == ["config_invalid"]
    set_system_text = b'{"version": 1}\n'
    replace_bytes(home.system_config, set_system_text, "none")
    assert [e["type"] for e in watch.check(home)] == ["config_valid"]


def test_a_broken_file_is_not_reparsed_on_every_call(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home(tmp_path)
    _break(home)
    calls: list[Path] = []
    real = parse_json

    def counting(path: Path, data: bytes) -> Any:
        calls.append(path)
        return real(path, data)

    monkeypatch.setattr(config, "parse_json", counting)
    for _ in range(3):
        with pytest.raises(ConfigError):
            load_system(home)
    assert len(calls) == 1


def test_supervisor_survives_a_bad_config_and_picks_up_the_fix(
        tmp_path: Path, procs: object, last_good: None) -> None:
    home = make_home(tmp_path, actuator="process", min_workers=0, warm_pool=0,
                     supervisor_tick_s=0.2, durability="none")
    load_system(home)  # this test process also writes to the home while the file is bad
    sup = procs.spawn("supervisor", [*HARNESS, "supervisor", "run", "--no-scale",  # type: ignore[attr-defined]
                                     "--home", str(home.root)],
                      env=daemon_env(PYTHONPATH=str(REPO_ROOT)))
    wait_until(lambda: home.health_file.exists(), what="the first pass")
    _break(home)
    wait_until(lambda: events(home, "config_invalid"), what="config_invalid", timeout=30)
    # Still alive several ticks later, and still doing its job (ingesting the inbox).
    TaskQueue(home).submit({"description": "x", "command": ["true"]})
    wait_until(lambda: TaskQueue(home).stats()["by_status"]["queued"] == 1,
               what="the inbox to be ingested on the last good config")
    assert sup.popen.poll() is None, sup.stderr()
    set_system(home, max_workers=4)
    wait_until(lambda: events(home, "config_valid"), what="config_valid", timeout=30)
    assert len(events(home, "config_invalid")) == 1
    sup.popen.send_signal(signal.SIGTERM)
    assert sup.wait(30) == 0, sup.stderr()


def test_supervisor_started_on_a_bad_config_waits_for_a_good_one(tmp_path: Path,
                                                                 procs: object) -> None:
    home = make_home(tmp_path, actuator="process", min_workers=0, warm_pool=0,
                     supervisor_tick_s=0.2, durability="none")
    _break(home)
    sup = procs.spawn("supervisor", [*HARNESS, "supervisor", "run", "--no-scale",  # type: ignore[attr-defined]
                                     "--home", str(home.root)],
                      env=daemon_env(PYTHONPATH=str(REPO_ROOT)))
    wait_until(lambda: events(home, "config_invalid"), what="config_invalid", timeout=30)
    assert sup.popen.poll() is None, sup.stderr()
    assert "no good version was read yet" in events(home, "config_invalid")[0]["message"]
    set_system(home, max_workers=4)
    wait_until(lambda: home.health_file.exists(), what="a pass on the fixed config")
    sup.popen.send_signal(signal.SIGTERM)
    assert sup.wait(30) == 0, sup.stderr()


def test_janitor_and_metrics_runs_use_the_last_good_copy(tmp_path: Path) -> None:
    """The oneshots of the systemd timers have no earlier values of their own: they run on
    the copy in config/last-good/ that a daemon kept, and say so on stderr."""
    import subprocess

    home = make_home(tmp_path, durability="none")
    env = daemon_env(PYTHONPATH=str(REPO_ROOT))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*HARNESS, *args, "--home", str(home.root)], env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    assert run("janitor", "run").returncode == 0  # a daemon run keeps the good version
    assert config.last_good_copy(home.system_config).exists()
    _break(home)
    for args in (("janitor", "run"), ("metrics", "snapshot")):
        res = run(*args)
        assert res.returncode == 0, res.stderr
        assert "config invalid, running on the last good values" in res.stderr
        assert "max_workers" in res.stderr
    # without a kept copy there is nothing to fall back on: exit 2 naming the key
    config.last_good_copy(home.system_config).unlink()
    res = run("janitor", "run")
    assert res.returncode == 2 and "'max_workers'" in res.stderr


def test_worker_started_on_a_bad_config_waits_then_runs(tmp_path: Path,
                                                        procs: object) -> None:
    home = make_home(tmp_path, durability="none")
    _break(home)
    worker = procs.spawn("worker", [*HARNESS, "worker", "run", "--home",  # type: ignore[attr-defined]
                                    str(home.root)], env=daemon_env(PYTHONPATH=str(REPO_ROOT)))
    wait_until(lambda: events(home, "config_invalid"), what="config_invalid", timeout=30)
    assert worker.popen.poll() is None, worker.stderr()
    set_system(home, max_workers=4)
    worker.wait_for_line("started worker-", timeout=30)
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.stderr()


def test_a_daemon_run_in_process_leaves_the_process_strict(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from daemons.cli import cli

    home = make_home(tmp_path, durability="none")
    for args in (["supervisor", "run", "--once", "--no-scale"], ["janitor", "run"],
                 ["metrics", "snapshot", "-q"]):
        result = CliRunner().invoke(cli, [*args, "--home", str(home.root)])
        assert result.exit_code == 0, result.output
    load_system(home)
    _break(home)
    with pytest.raises(ConfigError):
        load_system(home)


def test_one_version_reads_each_config_file_once(tmp_path: Path) -> None:
    """Inside config.one_version (a worker's step) a change to system.json is not seen, so
    every load of the block agrees; the next block (the next step) sees it."""
    home = make_home(tmp_path)
    before = load_system(home)["max_workers"]
    with config.one_version():
        assert load_system(home)["max_workers"] == before
        set_system(home, max_workers=before + 3)
        assert load_system(home)["max_workers"] == before
    assert load_system(home)["max_workers"] == before + 3
    with config.one_version():
        assert load_system(home)["max_workers"] == before + 3
