"""Secrets are never shown or written in clear (issue 14, item 3), and text from events and
task output can never drive the terminal (item 10): redaction on write (Python and the
shell scripts, with the configured redact_patterns) and on display (files written by older
versions or by hand)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from helpers import REPO_ROOT, make_home, needs, set_system

from coordination import clock
from coordination.config import load_system
from coordination.errors import ConfigError
from coordination.events import emit
from coordination.jsonl import read_jsonl
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.redact import MASK, printable, redact_argv, redact_record, redact_text
from coordination.store import append_bytes
from daemons.cli import cli

SK = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
GHP = "ghp_" + "a1B2c3D4e5" * 3 + "abcdef"
SCRIPTS = REPO_ROOT / "scripts"
needs_jq = needs("jq")


def invoke(home: Home, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--home", str(home.root), *args])
    return result.exit_code, result.output


@pytest.fixture(autouse=True)
def _no_extra_patterns() -> None:
    from coordination.redact import use_patterns

    use_patterns([])


# ---------------------------------------------------------------------------- records
def test_redact_argv_masks_values_of_secret_options() -> None:
    argv = ["deploy", "--password", "hunter2", "--api-key", "K123", "-token", "abc",
            f"--auth={SK}", "Authorization: Bearer abcdefghijkl", "--verbose", "x"]
    assert redact_argv(argv) == ["deploy", "--password", MASK, "--api-key", MASK, "-token",
                                 MASK, "--auth=sk-\u2026[redacted]",
                                 "Authorization: Bearer [redacted]", "--verbose", "x"]


def test_redact_record_masks_every_text_field_and_keeps_the_input() -> None:
    record = {"task_id": "t-1", "description": f"use {SK}", "last_error": f"401 for {GHP}",
              "command": ["curl", "-H", f"Authorization: Bearer {SK}", "--password", "pw"],
              "result": {"api_key": "zzz", "tokens_used": 5}, "status": "failed"}
    before = orjson.dumps(record)
    out = redact_record(record)
    assert orjson.dumps(record) == before  # pure
    text = orjson.dumps(out).decode()
    for secret in (SK, GHP, "zzz", '"pw"'):
        assert secret not in text
    assert out["result"]["tokens_used"] == 5
    assert out["command"][:2] == ["curl", "-H"]


# ---------------------------------------------------------------------------- display
def _failed_once(home: Home) -> str:
    """A live task whose description, command and last_error hold secrets."""
    queue = TaskQueue(home)
    task = queue.enqueue({"description": f"call with {SK}", "max_attempts": 3,
                          "command": ["tool", "--password", "hunter2", f"--key={GHP}"]}).task
    queue.claim("worker-0-x")
    queue.fail(task["task_id"], "worker-0-x", error=f"HTTP 401 token={GHP}", exit_code=1)
    return str(task["task_id"])


@pytest.mark.parametrize("args", [["task", "show", "{id}", "--json"],
                                  ["task", "show", "{id}"],
                                  ["task", "show", "{id}", "--history", "--json"],
                                  ["task", "list", "--json"], ["task", "list"]])
def test_task_show_and_list_print_no_secret(tmp_path: Path, args: list[str]) -> None:
    home = make_home(tmp_path, retry_backoff_base_s=0)
    task_id = _failed_once(home)
    code, out = invoke(home, *[a.replace("{id}", task_id) for a in args])
    assert code == 0, out
    for secret in (SK, GHP, "hunter2"):
        assert secret not in out
    # The live task keeps its exact command: a retry needs it.
    live = TaskQueue(home).get(task_id)
    assert live is not None and "hunter2" in live["command"]


def test_dlq_list_prints_no_secret(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    queue = TaskQueue(home)
    task = queue.enqueue({"description": SK, "max_attempts": 1, "command": ["true"]}).task
    queue.claim("worker-0-x")
    queue.fail(task["task_id"], "worker-0-x", error=f"bad {GHP}", exit_code=1)
    for args in (["dlq", "list", "--json"], ["dlq", "list"]):
        code, out = invoke(home, *args)
        assert code == 0 and SK not in out and GHP not in out, out


def _hand_written_event(home: Home, message: str, **data: object) -> None:
    line = {"event_id": "ev-1", "timestamp": clock.iso(clock.now()), "type": "legacy",
            "severity": "info", "source": "old", "message": message, "task_id": None,
            "worker_id": None, "correlation_id": None, "data": data}
    append_bytes(home.events_file, orjson.dumps(line) + b"\n", "none")


@pytest.mark.parametrize("as_json", [False, True])
def test_events_tail_masks_lines_written_in_clear(tmp_path: Path, as_json: bool) -> None:
    home = make_home(tmp_path)
    _hand_written_event(home, f"deploy with {SK}", password="hunter2", note=GHP)
    code, out = invoke(home, "events", "tail", *(["--json"] if as_json else []))
    assert code == 0, out
    for secret in (SK, GHP, "hunter2"):
        assert secret not in out
    assert "sk-\u2026[redacted]" in out


def test_events_tail_escapes_terminal_sequences(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    _hand_written_event(home, "title \x1b]0;pwned\x07 red \x1b[31mX\x1b[0m\rover\x9b2J")
    code, out = invoke(home, "events", "tail")
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\x9b" not in out
    assert "\\x1b[31mX" in out


def test_timeline_escapes_event_messages_and_task_output(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    queue = TaskQueue(home)
    task_id = queue.enqueue({"command": ["true"]}).task["task_id"]
    emit(home, "note", message="bell\x07 esc\x1b[2J", task_id=task_id)
    home.task_log(task_id).write_bytes(b"output \x1b[31mred\x1b[0m and \x1b]0;title\x07\n")
    code, out = invoke(home, "timeline", task_id)
    assert code == 0, out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[31mred" in out


def test_printable_keeps_text_and_tabs() -> None:
    assert printable("plain text\twith tab, ünïcode") == "plain text\twith tab, ünïcode"
    assert printable("a\nb") == "a\\x0ab"
    assert printable("a\nb", keep_newlines=True) == "a\nb"


# ---------------------------------------------------------------------------- config
def test_redact_patterns_from_config_apply_to_python_writes(tmp_path: Path) -> None:
    home = make_home(tmp_path, redact_patterns=["ACME-[0-9]{6}", "internal[.]example[.]com"])
    event = emit(home, "deploy", message="key ACME-123456 at internal.example.com",
                 data={"note": "ACME-654321"})
    assert event["message"] == f"key {MASK} at {MASK}"
    assert event["data"] == {"note": MASK}
    assert b"ACME-" not in home.events_file.read_bytes()


@pytest.mark.parametrize("pattern, problem", [
    ("\\d{6}", "backslash"), ("(?i)acme", "(?"), ("[[:digit:]]+", "bracket"),
    ("a*?", "lazy"), ("x*", "empty"), ("(", "not a valid regex"), ("", "non-empty")])
def test_bad_redact_patterns_are_config_errors(tmp_path: Path, pattern: str,
                                              problem: str) -> None:
    home = make_home(tmp_path)
    set_system(home, redact_patterns=["ok-[a-z]+", pattern])
    with pytest.raises(ConfigError, match=r"'redact_patterns'\[1\]") as err:
        load_system(home)
    assert problem in str(err.value)


# ---------------------------------------------------------------------------- shell
def _bash_redact(texts: list[str], system_json: str = "{}") -> list[str]:
    script = ('source "$1"; HARNESS_SYSTEM_JSON=$2; shift 2; '
              'for t in "$@"; do harness_redact out "$t"; printf "%s\\0" "$out"; done')
    res = subprocess.run(["bash", "-c", script, "bash", str(SCRIPTS / "lib/common.sh"),
                          system_json, *texts], capture_output=True, timeout=60, check=True)
    return res.stdout.decode().split("\0")[:-1]


CORPUS = [
    f"error calling api with {SK}, retrying", f"[{GHP}]", f"'{SK}'",
    "AKIAIOSFODNN7EXAMPLE and AKIAIOSFODNN7EXAMPLEX",
    "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.x",
    "Basic dXNlcjpwYXNzd29yZA==", "xoxb-123456789012-123456789012-AbCdEfGhIjKl",
    "github_pat_11ABCDEFG0" + "abcdefghij" * 6, "sk-ant-api03-" + "Zx9_Yw8-" * 10,
    "password=hunter2 and PASSWORD: s3cret, token=123 api_key=[redacted]",
    "url?access_key=AbC&next=1", '{"client_secret": "abc"}', "--db-password=x --port=5432",
    "Authorization: Bearer", "nothing secret here", "max_tokens: 4096", "ünïcödé sk-",
    "gho_short", "x-secret-header: value;", "passwd:123abc",
]


def test_shell_redaction_matches_python() -> None:
    assert _bash_redact(CORPUS) == [redact_text(t) for t in CORPUS]


def test_shell_redaction_honours_redact_patterns() -> None:
    config = '{"redact_patterns": ["ACME-[0-9]{6}"]}'
    assert _bash_redact(["id ACME-123456 ok", SK], config) == [
        f"id {MASK} ok", "sk-\u2026[redacted]"]


@needs_jq
def test_emit_event_sh_redacts_message_and_data(tmp_path: Path) -> None:
    home = make_home(tmp_path, redact_patterns=["ACME-[0-9]{6}"])
    data = {"password": "hunter2", "api_token": 7, "nested": {"url": f"x?token={GHP}"},
            "list": [SK, "ACME-000001"], "ok": True, "keep": "visible"}
    res = subprocess.run([str(SCRIPTS / "emit-event.sh"), "--home", str(home.root),
                          "--type", "deploy", "--message", f"with {SK} and ACME-123456",
                          "--data", orjson.dumps(data).decode()],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    raw = home.events_file.read_bytes()
    for secret in (SK.encode(), GHP.encode(), b"hunter2", b"ACME-"):
        assert secret not in raw
    (event,) = read_jsonl(home.events_file).records
    assert event["message"] == f"with sk-\u2026[redacted] and {MASK}"
    assert event["data"]["api_token"] == 7 and event["data"]["ok"] is True
    assert event["data"]["keep"] == "visible"
    # the same as the Python writer would have stored
    from coordination.redact import redact

    assert event["data"] == redact(data) | {"list": ["sk-\u2026[redacted]", MASK]}


def test_shell_error_messages_are_redacted(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    res = subprocess.run([str(SCRIPTS / "emit-event.sh"), "--home", str(home.root),
                          "--type", f"Bad {SK}"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 2
    assert SK not in res.stderr and "sk-\u2026[redacted]" in res.stderr


def test_worker_log_header_and_last_error_are_redacted(tmp_path: Path) -> None:
    home = make_home(tmp_path, durability="none")
    queue = TaskQueue(home)
    task = queue.enqueue({"max_attempts": 1, "command": [
        "bash", "-c", f"echo 'failing with {GHP}'; exit 3", "--password", "hunter2"]}).task
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    res = subprocess.run([sys.executable, "-m", "daemons", "worker", "run", "--once", "--home",
                          str(home.root)], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    log = home.task_log(task["task_id"]).read_text()
    assert "hunter2" not in log.splitlines()[0]  # the header line shows the argv masked
    letter = TaskQueue(home).dead_letters()[0]
    assert GHP not in (letter["last_error"] or "")
    assert "ghp_\u2026[redacted]" in (letter["last_error"] or "")


def test_history_records_mask_the_command_argv(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    queue = TaskQueue(home)
    task = queue.enqueue({"max_attempts": 1,
                          "command": ["deploy", "--password", "hunter2", f"--key={GHP}"]}).task
    queue.claim("worker-0-x")
    queue.fail(task["task_id"], "worker-0-x", error="boom", exit_code=1)
    raw = home.history_file.read_bytes()
    assert b"hunter2" not in raw and GHP.encode() not in raw


@needs_jq
def test_shell_data_redaction_matches_python_on_the_corpus(tmp_path: Path) -> None:
    from coordination.redact import redact

    home = make_home(tmp_path)
    data = {f"s{i}": text for i, text in enumerate(CORPUS)}
    res = subprocess.run([str(SCRIPTS / "emit-event.sh"), "--home", str(home.root),
                          "--type", "t", "--data", orjson.dumps(data).decode()],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    (event,) = read_jsonl(home.events_file).records
    assert event["data"] == redact(data)


def test_status_escapes_alert_messages(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    emit(home, "disk", severity="error", message="full \x1b]0;owned\x07 \x1b[2J")
    code, out = invoke(home, "status")
    assert code == 0, out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J" in out
