"""The shell producers: scripts/emit-event.sh and scripts/create-task.sh (and lib/common.sh).

They write the same files as the Python code, under the same locks and with the same
shapes, without starting Python. Every test works in its own ``tmp_path`` home.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import make_home, needs, wait_until

from coordination.config import default_system
from coordination.config_keys import DEFAULT_WORKER_TYPES
from coordination.events import ENVELOPE_FIELDS, emit
from coordination.jsonl import read_jsonl
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.store import read_json, replace_json

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
EMIT = SCRIPTS / "emit-event.sh"
CREATE = SCRIPTS / "create-task.sh"
COMMON = SCRIPTS / "lib" / "common.sh"
TIMEOUT = 60

EVENT_ID_RE = re.compile(r"^ev-(\d{8}T\d{9})-[0-9a-f]{12}$")
TASK_ID_RE = re.compile(r"^t-(\d{8}T\d{9})-[0-9a-f]{10}$")
TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")

needs_bash = needs("bash")
needs_flock = needs("flock")
needs_jq = needs("jq")
needs_shellcheck = needs("shellcheck")

pytestmark = [needs_bash, needs_flock]


# ---------------------------------------------------------------------------- helpers
def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without the home-selecting variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HARNESS_HOME", "STATE_DIRECTORY", "XDG_STATE_HOME")}
    env.update(extra)
    return env


def run(script: Path, *args: str | bytes, env: dict[str, str],
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(script), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


def event_lines(home: Home) -> list[bytes]:
    try:
        return home.events_file.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        return []


def size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def inbox_entries(home: Home) -> list[str]:
    """Files (not directories) directly in the inbox, hidden temp files included."""
    return sorted(e.name for e in os.scandir(home.inbox) if not e.is_dir())


@pytest.fixture
def shome(tmp_path: Path) -> Home:
    """An initialised home (the recipe of docs: Home.create + default configs)."""
    h = Home(tmp_path / "home")
    h.create()
    replace_json(h.system_config, default_system(), pretty=True)
    replace_json(h.worker_types_config, DEFAULT_WORKER_TYPES, pretty=True)
    return h


@pytest.fixture
def env(shome: Home) -> dict[str, str]:
    return clean_env(HARNESS_HOME=str(shome.root))


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[Any]]]:
    """Children started by a test; whatever is still running at teardown is killed."""
    started: list[subprocess.Popen[Any]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            p.communicate()


# ---------------------------------------------------------------------------- --help
@pytest.mark.parametrize("script", [EMIT, CREATE], ids=lambda p: p.name)
def test_help_exits_0_and_documents_the_contract(script: Path, shome: Home,
                                                 env: dict[str, str]) -> None:
    before = sorted(p.name for p in shome.coordination.rglob("*"))
    for flag in ("--help", "-h"):
        res = run(script, flag, env=env)
        assert res.returncode == 0, res.stderr
        out = res.stdout
        assert out.startswith(f"Usage: {script.name}")
        for needle in ("Options:", "Exit status:", "Files:", "--home", "system.json",
                       "  0 ", "  2 "):
            assert needle in out, needle
    assert sorted(p.name for p in shome.coordination.rglob("*")) == before


# ---------------------------------------------------------------------------- emit-event.sh
def test_emit_event_option_form_writes_one_full_envelope(shome: Home,
                                                         env: dict[str, str]) -> None:
    needs_data = shutil.which("jq") is not None
    args = ["--type", "task.progress", "--severity", "warning", "--message", "50% done",
            "--source", "my-producer", "--task", "t-1", "--worker", "w-1",
            "--correlation", "corr-1"]
    if needs_data:
        args += ["--data", '{ "pct": 50, "nested": {"a": [1, 2, null]}, "s": "x" }']
    before = time.time()
    res = run(EMIT, *args, env=env)
    after = time.time()
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    lines = event_lines(shome)
    assert len(lines) == 1 and lines[0].endswith(b"\n")
    event = json.loads(lines[0])
    assert list(event) == list(ENVELOPE_FIELDS)
    assert res.stdout == event["event_id"] + "\n"
    m = EVENT_ID_RE.match(event["event_id"])
    assert m, event["event_id"]
    assert TIMESTAMP_RE.match(event["timestamp"])
    # The id carries the same instant as the timestamp, in compact form.
    assert m.group(1) == re.sub(r"[-:.Z]", "", event["timestamp"])
    from coordination.clock import parse_iso
    assert before - 0.002 <= parse_iso(event["timestamp"]) <= after + 0.002
    assert event["type"] == "task.progress"
    assert event["severity"] == "warning"
    assert event["source"] == "my-producer"
    assert event["message"] == "50% done"
    assert (event["task_id"], event["worker_id"], event["correlation_id"]) == \
        ("t-1", "w-1", "corr-1")
    if needs_data:
        assert event["data"] == {"pct": 50, "nested": {"a": [1, 2, None]}, "s": "x"}
        # compacted by jq: no whitespace between tokens
        assert b'"data":{"pct":50,"nested":{"a":[1,2,null]},"s":"x"}}' in lines[0]


def test_emit_event_defaults(shome: Home, env: dict[str, str]) -> None:
    res = run(EMIT, "--type", "heartbeat", env=env)
    assert res.returncode == 0, res.stderr
    event = json.loads(event_lines(shome)[0])
    assert event["severity"] == "info"
    assert event["source"] == "emit-event.sh"
    assert event["message"] == ""
    assert event["task_id"] is None and event["worker_id"] is None
    assert event["correlation_id"] is None
    assert event["data"] == {}


def test_emit_event_equals_form_and_double_dash(shome: Home, env: dict[str, str]) -> None:
    res = run(EMIT, "--type=a.b", "--message=x=y", "--severity=debug", env=env)
    assert res.returncode == 0, res.stderr
    event = json.loads(event_lines(shome)[0])
    assert (event["type"], event["message"], event["severity"]) == ("a.b", "x=y", "debug")


@needs_jq
def test_emit_event_positional_form(shome: Home, env: dict[str, str]) -> None:
    cases = [
        (["job_started"], "job_started", {}, "emit-event.sh"),
        (["job_done", '{"rc": 0}'], "job_done", {"rc": 0}, "emit-event.sh"),
        (["job_failed", '{"rc":1,"why":"x"}', "cron-backup"], "job_failed",
         {"rc": 1, "why": "x"}, "cron-backup"),
        (["job_noted", "", "cron"], "job_noted", {}, "cron"),
    ]
    for case in cases:
        res = run(EMIT, *case[0], env=env)
        assert res.returncode == 0, (case, res.stderr)
    events = [json.loads(line) for line in event_lines(shome)]
    assert len(events) == len(cases)
    for event, (_, etype, data, source) in zip(events, cases, strict=True):
        assert list(event) == list(ENVELOPE_FIELDS)
        assert (event["type"], event["data"], event["source"]) == (etype, data, source)
        assert event["severity"] == "info" and event["message"] == ""


def test_emit_event_escapes_every_string_exactly(shome: Home, env: dict[str, str]) -> None:
    controls = "".join(chr(c) for c in range(1, 32)) + "\x7f"
    message = f'quote " backslash \\ slash / {controls} unicode é€😀 $(date) `id` %s %b \\n'
    # --task and --worker follow the id grammar (they name files): checked, not escaped
    res = run(EMIT, "--type", "t", "--message", message, "--source", 'src "q"\n',
              "--task", "t.1_x-2", "--worker", "w-1", "--correlation", "é", env=env)
    assert res.returncode == 0, res.stderr
    line = event_lines(shome)[0]
    assert line.count(b"\n") == 1  # every control character is escaped
    event = orjson.loads(line)
    assert event["message"] == message
    assert event["source"] == 'src "q"\n'
    assert (event["task_id"], event["worker_id"], event["correlation_id"]) == \
        ("t.1_x-2", "w-1", "é")
    # control characters other than \n \r \t are written as \u00XX
    assert b"\\u0001" in line and b"\\u001f" in line and b"\\n" in line


def test_emit_event_long_line_is_one_valid_line(shome: Home, env: dict[str, str]) -> None:
    message = "x" * 16384  # the largest message allowed: the line is written in one block
    for _ in range(3):
        res = run(EMIT, "--type", "big", "--message", message, env=env)
        assert res.returncode == 0, res.stderr
    read = read_jsonl(shome.events_file)
    assert read.bad_lines == 0
    assert [r["message"] for r in read.records] == [message] * 3


@needs("strace")
@pytest.mark.parametrize("size", [10, 900, 5000, 16384])
def test_emit_event_appends_with_a_single_write(shome: Home, env: dict[str, str],
                                                tmp_path: Path, size: int) -> None:
    """One write(2) of the whole line, short or long (bash's printf alone would split a
    line longer than its stdio buffer)."""
    log = tmp_path / "strace.log"
    res = subprocess.run(["strace", "-f", "-y", "-e", "trace=write", "-o", str(log),
                          str(EMIT), "--type", "t", "--message", "m" * size],
                         env=env, capture_output=True, text=True, timeout=TIMEOUT,
                         check=False)
    if res.returncode != 0 and "ptrace" in res.stderr.lower():
        pytest.skip(f"strace cannot trace here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    line = event_lines(shome)[0]
    writes = [ln for ln in log.read_text().splitlines()
              if re.search(r"write\(\d+<[^>]*dashboard-events\.jsonl>", ln)]
    assert len(writes) == 1, writes
    assert writes[0].endswith(f"= {len(line)}")


BAD_EMIT_ARGS: list[Any] = [
    pytest.param(["--type", "t", "--data", "{not json"], id="data-invalid-json",
                 marks=needs_jq),
    pytest.param(["--type", "t", "--data", "[1, 2]"], id="data-array", marks=needs_jq),
    pytest.param(["--type", "t", "--data", '"str"'], id="data-string", marks=needs_jq),
    pytest.param(["--type", "t", "--data", "null"], id="data-null", marks=needs_jq),
    pytest.param(["--type", "t", "--data", "{} {}"], id="data-two-values", marks=needs_jq),
    pytest.param(["--type", "t", "--data", ""], id="data-empty", marks=needs_jq),
    pytest.param(["--type", "t", "--data", '{"k": "' + "v" * 65536 + '"}'],
                 id="data-too-big", marks=needs_jq),
    pytest.param(["t", "[1]"], id="positional-data-array", marks=needs_jq),
    pytest.param(["t", "{oops"], id="positional-data-invalid", marks=needs_jq),
    pytest.param(["--type", "t", "--severity", "fatal"], id="unknown-severity"),
    pytest.param(["--type", "t", "--severity", ""], id="empty-severity"),
    pytest.param([], id="no-arguments"),
    pytest.param(["--message", "m"], id="missing-type"),
    pytest.param(["--type", ""], id="empty-type"),
    pytest.param(["--type", "Upper"], id="type-uppercase"),
    pytest.param(["--type", "1abc"], id="type-leading-digit"),
    pytest.param(["--type", "a b"], id="type-space"),
    pytest.param(["--type", "abc\n"], id="type-trailing-newline"),
    pytest.param(["--type", "a" * 65], id="type-too-long"),
    pytest.param(["--type", "t", "--bogus", "x"], id="unknown-option"),
    pytest.param(["--type", "t", "-x"], id="unknown-short-option"),
    pytest.param(["--type"], id="option-without-value"),
    pytest.param(["--type", "t", "--message"], id="message-without-value"),
    pytest.param(["t", "{}", "src", "extra"], id="too-many-positionals"),
    pytest.param(["--type", "t", "u"], id="type-twice"),
    pytest.param(["--type", "t", "--message", "m" * 16385], id="message-too-long"),
    pytest.param(["--type", "t", "--message", b"bad \xff utf-8"], id="message-not-utf8"),
    pytest.param(["--type", "t", "--source", b"\xc3("], id="source-not-utf8"),
]


@pytest.mark.parametrize("args", BAD_EMIT_ARGS)
def test_emit_event_bad_input_exits_2_and_writes_nothing(shome: Home, env: dict[str, str],
                                                         args: list[str]) -> None:
    emit(shome, "earlier.event", source="test", message="so the file is not empty")
    size = size_of(shome.events_file)
    res = run(EMIT, *args, env=env)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert res.stderr.startswith("emit-event.sh: "), res.stderr
    assert size_of(shome.events_file) == size


def test_emit_event_uninitialised_home_exits_2(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    res = run(EMIT, "--type", "t", env=clean_env(HARNESS_HOME=str(bare)))
    assert res.returncode == 2
    assert f"harness init --home {bare}" in res.stderr
    assert list(bare.iterdir()) == []
    # --home names the (missing) home just the same
    res = run(EMIT, "--home", str(tmp_path / "nowhere"), "--type", "t", env=clean_env())
    assert res.returncode == 2
    assert f"harness init --home {tmp_path / 'nowhere'}" in res.stderr
    assert not (tmp_path / "nowhere").exists()


def test_emit_event_unwritable_events_file_exits_2(shome: Home, env: dict[str, str]) -> None:
    shome.events_file.mkdir()  # a directory where the log should be: not writable as a file
    res = run(EMIT, "--type", "t", env=env)
    assert res.returncode == 2
    assert "not a writable file" in res.stderr
    assert list(shome.events_file.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_emit_event_read_only_home_exits_2(shome: Home, env: dict[str, str]) -> None:
    emit(shome, "earlier.event", source="test")
    size = size_of(shome.events_file)
    shome.events_file.chmod(0o444)
    shome.coordination.chmod(0o555)
    try:
        res = run(EMIT, "--type", "t", env=env)
    finally:
        shome.coordination.chmod(0o755)
        shome.events_file.chmod(0o644)
    assert res.returncode == 2, res.stderr
    assert size_of(shome.events_file) == size


def test_emit_event_home_resolution(tmp_path: Path) -> None:
    """--home, then $HARNESS_HOME, then $STATE_DIRECTORY, then $XDG_STATE_HOME/harness,
    then ~/.local/state/harness: like coordination.paths.resolve_home."""
    user_home = tmp_path / "user"
    user_home.mkdir()
    uninit = tmp_path / "uninitialised"

    def check(expected: Path, args: Sequence[str], cwd: Path | None = None,
              **variables: str) -> None:
        h = make_home(expected.parent, expected.name)
        res = run(EMIT, *args, "--type", "where", env=clean_env(HOME=str(user_home),
                                                                **variables), cwd=cwd)
        assert res.returncode == 0, (expected, res.stderr)
        assert len(event_lines(h)) == 1, expected
        shutil.rmtree(expected)

    check(tmp_path / "opt", ["--home", str(tmp_path / "opt")], HARNESS_HOME=str(uninit))
    check(tmp_path / "opt", [f"--home={tmp_path / 'opt'}"], HARNESS_HOME=str(uninit))
    check(tmp_path / "rel", ["--home", "rel"], cwd=tmp_path, HARNESS_HOME=str(uninit))
    check(tmp_path / "env", [], HARNESS_HOME=str(tmp_path / "env"),
          STATE_DIRECTORY=str(uninit))
    check(user_home / "tilde", [], HARNESS_HOME="~/tilde")
    check(tmp_path / "state1", [], STATE_DIRECTORY=f"{tmp_path / 'state1'}:{uninit}",
          XDG_STATE_HOME=str(uninit))
    check(tmp_path / "xdg" / "harness", [], XDG_STATE_HOME=str(tmp_path / "xdg"))
    check(user_home / ".local" / "state" / "harness", [])


def test_shell_and_python_events_have_the_same_envelope(shome: Home,
                                                        env: dict[str, str]) -> None:
    emit(shome, "py.event", source="python", message='say "hi"\n\t')
    res = run(EMIT, "--type", "sh.event", "--source", "shell", "--message", 'say "hi"\n\t',
              env=env)
    assert res.returncode == 0, res.stderr
    emit(shome, "py.full", severity="error", source="python", message="m", task_id="t-1",
         worker_id="w-1", correlation_id="c-1", data={})
    res = run(EMIT, "--type", "sh.full", "--severity", "error", "--source", "shell",
              "--message", "m", "--task", "t-1", "--worker", "w-1", "--correlation", "c-1",
              env=env)
    assert res.returncode == 0, res.stderr

    lines = event_lines(shome)
    assert len(lines) == 4
    read = read_jsonl(shome.events_file)
    assert read.bad_lines == 0
    py_min, sh_min, py_full, sh_full = read.records
    for py, sh in ((py_min, sh_min), (py_full, sh_full)):
        assert list(py) == list(sh) == list(ENVELOPE_FIELDS)
        assert {k: type(v) for k, v in py.items()} == {k: type(v) for k, v in sh.items()}
        assert EVENT_ID_RE.match(py["event_id"]) and EVENT_ID_RE.match(sh["event_id"])
        assert TIMESTAMP_RE.match(py["timestamp"]) and TIMESTAMP_RE.match(sh["timestamp"])
        assert {k: v for k, v in py.items() if k not in ("event_id", "timestamp", "type",
                                                         "source")} == \
            {k: v for k, v in sh.items() if k not in ("event_id", "timestamp", "type",
                                                      "source")}
    # Byte for byte the same encoding as orjson (compact separators, same escapes).
    for line in lines:
        assert orjson.dumps(orjson.loads(line)) + b"\n" == line


def test_emit_event_waits_for_the_events_lock(shome: Home, env: dict[str, str],
                                              children: list[subprocess.Popen[Any]]) -> None:
    lock_path = shome.lock_path("events")
    inode = lock_path.stat().st_ino
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        p = subprocess.Popen([str(EMIT), "--type", "waited"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        children.append(p)
        time.sleep(0.5)
        assert p.poll() is None, p.communicate()
        assert event_lines(shome) == []
    finally:
        os.close(fd)  # releases the lock
    _, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err
    assert len(event_lines(shome)) == 1
    # the lock file is neither replaced nor written to
    assert lock_path.stat().st_ino == inode
    assert lock_path.stat().st_size == 0


def test_emit_event_lock_timeout_exits_75(tmp_path: Path) -> None:
    h = make_home(tmp_path, lock_timeout_s=0.2)
    fd = os.open(h.lock_path("events"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = run(EMIT, "--type", "t", env=clean_env(HARNESS_HOME=str(h.root)))
    finally:
        os.close(fd)
    assert res.returncode == 75, res.stderr
    assert "timed out" in res.stderr
    assert event_lines(h) == []


@pytest.mark.slow
def test_emit_event_concurrent_writers_lose_nothing(shome: Home, env: dict[str, str],
                                                   children: list[subprocess.Popen[Any]]
                                                   ) -> None:
    loop = 'for i in $(seq 200); do ./scripts/emit-event.sh --type t --message "$i"; done'
    for _ in range(8):
        children.append(subprocess.Popen(["bash", "-c", loop], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    printed: list[str] = []
    for p in children:
        out, err = p.communicate(timeout=100)
        assert p.returncode == 0 and err == "", err
        printed += out.split()
    lines = event_lines(shome)
    assert len(lines) == 1600
    assert all(line.endswith(b"\n") for line in lines)
    read = read_jsonl(shome.events_file)
    assert read.bad_lines == 0 and len(read.records) == 1600
    ids = [r["event_id"] for r in read.records]
    assert len(set(ids)) == 1600
    assert all(EVENT_ID_RE.match(i) for i in ids)
    assert sorted(printed) == sorted(ids)
    assert all(list(r) == list(ENVELOPE_FIELDS) for r in read.records)
    assert Counter(r["message"] for r in read.records) == {str(i): 8 for i in range(1, 201)}
    # Timestamps are taken under the lock: the file is in time order.
    stamps = [r["timestamp"] for r in read.records]
    assert stamps == sorted(stamps)


def test_emit_event_median_latency(shome: Home, env: dict[str, str]) -> None:
    """Guard against a regression to Python or many forks per call (target: < 10 ms)."""
    loop = ('for i in $(seq 50); do s=$EPOCHREALTIME; ./scripts/emit-event.sh --type t '
            '--message "$i" >/dev/null || exit 1; e=$EPOCHREALTIME; '
            'echo "${s/,/.} ${e/,/.}"; done')
    res = subprocess.run(["bash", "-c", loop], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 0, res.stderr
    durations = [float(e) - float(s) for s, e in (ln.split() for ln in res.stdout.splitlines())]
    assert len(durations) == 50
    median_ms = statistics.median(durations) * 1000
    # generous bound for loaded CI machines; typical is ~6-8 ms with an fdatasync
    assert median_ms < 50, f"median {median_ms:.1f} ms per call"


# ---------------------------------------------------------------------------- no Python
@needs_jq
def test_scripts_never_start_python(shome: Home, env: dict[str, str],
                                    tmp_path: Path) -> None:
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    marker = tmp_path / "python-was-started"
    for name in ("python", "python3", f"python3.{sys.version_info.minor}"):
        fake = fake_bin / name
        fake.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 99\n")
        fake.chmod(0o755)
    env = dict(env, PATH=f"{fake_bin}:{env.get('PATH', '/usr/bin:/bin')}")
    assert run(EMIT, "--type", "t", env=env).returncode == 0
    assert run(EMIT, "--type", "t", "--data", '{"a":1}', env=env).returncode == 0
    assert run(EMIT, "t", '{"a":1}', "src", env=env).returncode == 0
    res = run(CREATE, "--description", "d", "--", "true", env=env)
    assert res.returncode == 0, res.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------- create-task.sh
@needs_jq
def test_create_task_writes_a_request_the_queue_accepts(shome: Home,
                                                        env: dict[str, str]) -> None:
    parent = run(CREATE, "--description", "parent", "--", "true", env=env)
    assert parent.returncode == 0, parent.stderr
    parent_id = parent.stdout.strip()
    res = run(CREATE, "--description", "résumé \"x\"", "--priority", "high", "--type",
              "default", "--dedup-key", "nightly:2024-01-01", "--max-attempts", "5",
              "--timeout", "2.5", "--depends-on", parent_id, "--correlation", "run-42",
              "--not-before", "2030-01-02T03:04:05.678Z", "--budget", "1000",
              "--", "echo", "hello", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    task_id = res.stdout.strip()
    assert res.stdout == task_id + "\n"
    m = TASK_ID_RE.match(task_id)
    assert m, task_id
    assert inbox_entries(shome) == sorted([f"{parent_id}.json", f"{task_id}.json"])
    request = read_json(shome.inbox / f"{task_id}.json")
    assert request == {
        "task_id": task_id, "description": "résumé \"x\"", "priority": "high",
        "worker_type": "default", "command": ["echo", "hello"], "max_attempts": 5,
        "timeout_s": 2.5, "depends_on": [parent_id],
        "not_before": "2030-01-02T03:04:05.678Z", "dedup_key": "nightly:2024-01-01",
        "correlation_id": "run-42", "created_at": request["created_at"], "budget": 1000,
    }
    assert TIMESTAMP_RE.match(request["created_at"])
    assert m.group(1) == re.sub(r"[-:.Z]", "", request["created_at"])

    queue = TaskQueue(shome)
    assert queue.ingest() == 2
    task = queue.get(task_id)
    assert task is not None
    assert task["status"] == "queued"
    for key, value in request.items():
        assert dict(task)[key] == value, key
    assert inbox_entries(shome) == []
    assert list(shome.inbox_rejected.iterdir()) == []


def harness(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemons", *args], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


@needs_jq
def test_create_task_tasks_show_in_task_list_and_status(shome: Home,
                                                        env: dict[str, str]) -> None:
    """No daemon runs: `task list` and `status` admit the inbox when the queue lock is
    free, so the task is listed (and counted queued) at once; while another process holds
    the lock they do not wait, and say how many requests are pending."""
    first = run(CREATE, "--description", "from the shell", "--", "true", env=env)
    assert first.returncode == 0, first.stderr
    task_id = first.stdout.strip()
    listed = harness("task", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["TASK_ID", "STATUS", "PRIORITY", "ATTEMPTS", "WORKER",
                              "DESCRIPTION"]
    assert row.split()[:4] == [task_id, "queued", "medium", "0/3"], row
    assert row.endswith("from the shell") and inbox_entries(shome) == []

    second = run(CREATE, "--description", "second", "--", "true", env=env)
    assert second.returncode == 0, second.stderr
    status = harness("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    queue = orjson.loads(status.stdout)["queue"]
    assert (queue["queued"], queue["inbox_pending"]) == (2, 0)

    third = run(CREATE, "--description", "third", "--", "true", env=env).stdout.strip()
    holder = subprocess.Popen(["flock", str(shome.lock_path("queue")), "sleep", "30"],
                              start_new_session=True)
    try:
        wait_until(lambda: subprocess.run(
            ["flock", "-n", str(shome.lock_path("queue")), "true"],
            check=False).returncode != 0, 10, "flock to hold the queue lock")
        started = time.monotonic()
        busy = harness("task", "list", "--json", env=env)
        assert busy.returncode == 0, busy.stderr
        assert time.monotonic() - started < 10  # lock_timeout_s is 30: it did not wait
        assert third not in busy.stdout
        assert "1 request(s) pending in coordination/inbox/" in busy.stderr
        text = harness("status", env=env)
        assert text.returncode == 0 and "inbox 1;" in text.stdout, text.stdout
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # flock and its sleep, which holds the lock
        holder.wait()
    assert third in harness("task", "list", env=env).stdout


@needs_jq
def test_create_task_reads_a_legacy_types_key(shome: Home, env: dict[str, str]) -> None:
    """A home made before worker-types.json's map was renamed worker_types still works."""
    raw = read_json(shome.worker_types_config)
    raw["types"] = raw.pop("worker_types")
    replace_json(shome.worker_types_config, raw, pretty=True)
    res = run(CREATE, "--description", "legacy", "--type", "shell", env=env)
    assert res.returncode == 0, res.stderr
    res = run(CREATE, "--description", "legacy", "--type", "nope", "--", "true", env=env)
    assert res.returncode == 2 and "known: default, shell" in res.stderr, res.stderr


@needs_jq
def test_create_task_minimal_request(shome: Home, env: dict[str, str]) -> None:
    res = run(CREATE, "--description", "d", "--", "true", env=env)
    assert res.returncode == 0, res.stderr
    task_id = res.stdout.strip()
    request = read_json(shome.inbox / f"{task_id}.json")
    assert request == {"task_id": task_id, "description": "d", "priority": "medium",
                       "worker_type": "default", "command": ["true"],
                       "created_at": request["created_at"]}


@needs_jq
def test_create_task_command_arrives_as_the_exact_argv(shome: Home,
                                                       env: dict[str, str]) -> None:
    argv = ["printf", "%s\\n", "two words", "it's", 'say "hi"', "$(rm -rf /)", "`id`",
            "$HOME", "*", "-c", "--arg", "--", "", "line1\nline2", "tab\there", "back\\slash",
            "é€😀", "x" * 1000]
    res = run(CREATE, "--description", "exact argv", "--", *argv, env=env)
    assert res.returncode == 0, res.stderr
    task_id = res.stdout.strip()
    assert read_json(shome.inbox / f"{task_id}.json")["command"] == argv
    queue = TaskQueue(shome)
    assert queue.ingest() == 1
    task = queue.get(task_id)
    assert task is not None and task["command"] == argv


@needs_jq
def test_create_task_without_command_uses_the_worker_type_template(
        shome: Home, env: dict[str, str]) -> None:
    res = run(CREATE, "--description", "echo from the shell type", "--type", "shell", env=env)
    assert res.returncode == 0, res.stderr
    task_id = res.stdout.strip()
    assert "command" not in read_json(shome.inbox / f"{task_id}.json")
    queue = TaskQueue(shome)
    assert queue.ingest() == 1
    task = queue.get(task_id)
    assert task is not None
    assert task["command"] == ["bash", "-c", "echo from the shell type"]
    assert task["worker_type"] == "shell"


@needs_jq
@needs("strace")
def test_create_task_publishes_by_rename(shome: Home, env: dict[str, str],
                                         tmp_path: Path) -> None:
    """The request is written to a hidden temp file in the inbox and renamed into place;
    the published name is never opened for writing (the queue never sees half a file)."""
    log = tmp_path / "strace.log"
    res = subprocess.run(["strace", "-f", "-e", "trace=openat,open,creat,rename,renameat,"
                          "renameat2", "-o", str(log), str(CREATE), "--description", "d",
                          "--", "true"], env=env, capture_output=True, text=True,
                         timeout=TIMEOUT, check=False)
    if res.returncode != 0 and "ptrace" in res.stderr.lower():
        pytest.skip(f"strace cannot trace here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    task_id = res.stdout.strip()
    trace = log.read_text().splitlines()
    final, tmp = f"{shome.inbox}/{task_id}.json", f"{shome.inbox}/.tmp-{task_id}"
    assert not [ln for ln in trace if f'"{final}"' in ln and "open" in ln.split("(")[0]
                and ("O_WRONLY" in ln or "O_RDWR" in ln)]
    assert [ln for ln in trace if "open" in ln.split("(")[0] and f'"{tmp}"' in ln
            and "O_EXCL" in ln], "the temp file is created exclusively"
    renames = [ln for ln in trace if "rename" in ln.split("(")[0]]
    assert len(renames) == 1 and f'"{tmp}"' in renames[0] and f'"{final}"' in renames[0]
    assert renames[0].rstrip().endswith("= 0")
    assert inbox_entries(shome) == [f"{task_id}.json"]


BAD_CREATE_ARGS: list[Any] = [
    pytest.param(["--description", "d", "--priority", "urgent", "--", "true"],
                 id="invalid-priority"),
    pytest.param(["--description", "d", "--priority", "", "--", "true"], id="empty-priority"),
    pytest.param(["--", "true"], id="missing-description"),
    pytest.param(["--description", "", "--", "true"], id="empty-description"),
    pytest.param(["--description", "d"], id="no-command-and-no-template"),
    pytest.param(["--description", "d", "--type", "nope", "--", "true"],
                 id="unknown-worker-type"),
    pytest.param(["--description", "d", "--max-attempts", "0", "--", "true"],
                 id="max-attempts-0"),
    pytest.param(["--description", "d", "--max-attempts", "1001", "--", "true"],
                 id="max-attempts-1001"),
    pytest.param(["--description", "d", "--max-attempts", "three", "--", "true"],
                 id="max-attempts-word"),
    pytest.param(["--description", "d", "--timeout", "0", "--", "true"], id="timeout-0"),
    pytest.param(["--description", "d", "--timeout", "-5", "--", "true"],
                 id="timeout-negative"),
    pytest.param(["--description", "d", "--timeout", "1e3", "--", "true"],
                 id="timeout-not-decimal"),
    pytest.param(["--description", "d", "--budget", "-1", "--", "true"],
                 id="budget-negative"),
    pytest.param(["--description", "d", "--depends-on", "bad id", "--", "true"],
                 id="depends-on-invalid"),
    pytest.param(["--description", "d", "--depends-on", ".hidden", "--", "true"],
                 id="depends-on-dot"),
    pytest.param(["--description", "d", "--dedup-key", "has space", "--", "true"],
                 id="dedup-key-invalid"),
    pytest.param(["--description", "d", "--correlation", "-x", "--", "true"],
                 id="correlation-invalid"),
    pytest.param(["--description", "d", "--not-before", "tomorrow", "--", "true"],
                 id="not-before-invalid"),
    pytest.param(["--description", "d", "--not-before", "2030-13-01T00:00:00Z", "--",
                  "true"], id="not-before-month-13"),
    pytest.param(["--description", "d", "--bogus", "--", "true"], id="unknown-option"),
    pytest.param(["--description", "d", "true"], id="command-without-double-dash"),
    pytest.param(["--description"], id="option-without-value"),
    pytest.param(["--description", b"bad \xff", "--", "true"], id="description-not-utf8"),
    pytest.param(["--description", "d", "--", "echo", b"\xfe"], id="argv-not-utf8"),
]


@needs_jq
@pytest.mark.parametrize("args", BAD_CREATE_ARGS)
def test_create_task_bad_input_exits_2_and_writes_nothing(shome: Home, env: dict[str, str],
                                                          args: list[str]) -> None:
    res = run(CREATE, *args, env=env)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert res.stderr.startswith("create-task.sh: "), res.stderr
    assert inbox_entries(shome) == []


@needs_jq
def test_create_task_limits_from_system_json(tmp_path: Path) -> None:
    h = make_home(tmp_path, max_description_bytes=10, max_command_bytes=8,
                  max_depends_on=1)
    env = clean_env(HARNESS_HOME=str(h.root))
    assert run(CREATE, "--description", "0123456789", "--", "true", env=env).returncode == 0
    res = run(CREATE, "--description", "0123456789a", "--", "true", env=env)
    assert res.returncode == 2 and "max_description_bytes" in res.stderr
    res = run(CREATE, "--description", "d", "--", "echo", "12345", env=env)
    assert res.returncode == 2 and "max_command_bytes" in res.stderr
    res = run(CREATE, "--description", "d", "--depends-on", "a", "--depends-on", "b",
              "--", "true", env=env)
    assert res.returncode == 2 and "max_depends_on" in res.stderr
    assert len(inbox_entries(h)) == 1


@needs_jq
def test_create_task_uninitialised_home_exits_2(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    res = run(CREATE, "--home", str(bare), "--description", "d", "--", "true",
              env=clean_env())
    assert res.returncode == 2
    assert f"harness init --home {bare}" in res.stderr
    assert not bare.exists()


@needs_jq
def test_create_task_files_are_ingested_exactly_once(shome: Home, env: dict[str, str],
                                                     children: list[subprocess.Popen[Any]]
                                                     ) -> None:
    ids: list[str] = []
    for i in range(20):
        res = run(CREATE, "--description", f"seq {i}", "--priority",
                  ("critical", "high", "medium", "low")[i % 4], "--", "echo", str(i), env=env)
        assert res.returncode == 0, res.stderr
        ids.append(res.stdout.strip())
    loop = ('for i in $(seq 10); do ./scripts/create-task.sh --description "par $0 $i" '
            '-- echo "$i" || exit 1; done')
    producers = [subprocess.Popen(["bash", "-c", loop, str(k)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k in range(3)]
    children.extend(producers)
    for p in producers:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
        ids += out.split()
    assert len(ids) == len(set(ids)) == 50
    assert all(TASK_ID_RE.match(i) for i in ids)
    assert sorted(inbox_entries(shome)) == sorted(f"{i}.json" for i in ids)

    code = ("import sys\nfrom pathlib import Path\nfrom coordination.paths import Home\n"
            "from coordination.queue import TaskQueue\n"
            "q = TaskQueue(Home(Path(sys.argv[1])))\n"
            "print(sum(q.ingest() for _ in range(3)))\n")
    ingesters = [subprocess.Popen([sys.executable, "-c", code, str(shome.root)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    children.extend(ingesters)
    added = 0
    for p in ingesters:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
        added += int(out)
    assert added == 50

    queued = [t["task_id"] for t in read_json(shome.queue_file)["tasks"]]
    counts = Counter(queued)
    assert sorted(counts) == sorted(ids)
    assert set(counts.values()) == {1}
    assert inbox_entries(shome) == []
    assert list(shome.inbox_rejected.iterdir()) == []
    assert TaskQueue(shome).ingest() == 0


# ---------------------------------------------------------------------------- lib/common.sh
def bash_lib(snippet: str, *args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    script = f'set -euo pipefail\nsource "{COMMON}"\n{snippet}'
    return subprocess.run(["bash", "-c", script, "test", *args], capture_output=True,
                          timeout=TIMEOUT, check=False)


def test_common_json_quote_round_trips_every_character() -> None:
    text = "".join(chr(c) for c in range(1, 128)) + " é € 😀 \U0010ffff"
    res = bash_lib('json_quote out "$1"; printf "%s" "$out"', text)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.decode()) == text
    assert b"\\u001b" in res.stdout and b"\\t" in res.stdout
    res = bash_lib('json_quote_or_null out ""; printf "%s" "$out"')
    assert res.stdout == b"null"
    for bad in (b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xc0\xaf", b"ok\xf4\x90\x80\x80"):
        res = bash_lib('if json_quote out "$1"; then echo ok; else echo invalid; fi', bad)
        assert res.stdout == b"invalid\n", bad


def test_common_clock_ids_and_die() -> None:
    res = bash_lib('harness_clock; harness_new_event_id e; harness_new_task_id t\n'
                   'printf "%s %s %s %s\\n" "$HARNESS_NOW_ISO" "$HARNESS_NOW_COMPACT" "$e" "$t"')
    assert res.returncode == 0, res.stderr
    iso, compact, event_id, task_id = res.stdout.decode().split()
    assert TIMESTAMP_RE.match(iso)
    assert compact == re.sub(r"[-:.Z]", "", iso)
    assert EVENT_ID_RE.match(event_id) and event_id.split("-")[1] == compact
    assert TASK_ID_RE.match(task_id) and task_id.split("-")[1] == compact
    res = bash_lib('die 7 "went wrong"')
    assert res.returncode == 7
    assert res.stderr == b"test: went wrong\n"


# ---------------------------------------------------------------------------- shellcheck
@needs_shellcheck
def test_scripts_are_shellcheck_clean() -> None:
    scripts = sorted(str(p.relative_to(REPO)) for p in [*SCRIPTS.glob("*.sh"),
                                                        *SCRIPTS.glob("lib/*.sh")])
    assert "scripts/emit-event.sh" in scripts and "scripts/create-task.sh" in scripts
    res = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True,
                         text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
