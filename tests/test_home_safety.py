"""The home protects itself (issue 14): no link is followed out of it (item 5), its modes
do not depend on the caller's umask (item 6), and a failed append never tears a JSONL
file (item 7)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import REPO_ROOT, make_home, needs

from coordination.doctor import check
from coordination.errors import DiskFull, UnsafePath
from coordination.jsonl import read_appended, read_jsonl, tail_jsonl
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.store import append_bytes, replace_json

SCRIPTS = REPO_ROOT / "scripts"
needs_jq = needs("jq")


def harness(home: Home, *args: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "daemons", "--home", str(home.root), *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False,
                          preexec_fn=lambda: os.umask(umask))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def codes(report: object) -> list[str]:
    return sorted({f.code for f in report.findings if not f.repaired})  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- modes
@pytest.mark.parametrize("umask", [0o000, 0o022, 0o002])
def test_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    home = Home(tmp_path / "home")
    assert harness(home, "init", umask=umask).returncode == 0
    assert harness(home, "task", "add", "--", "true", umask=umask).returncode == 0
    assert harness(home, "events", "emit", "--type", "t", umask=umask).returncode == 0
    env = dict(os.environ, HARNESS_HOME=str(home.root))
    for script, args in (("create-task.sh", ["--description", "x", "--", "true"]),
                         ("emit-event.sh", ["--type", "t2"])):
        if script == "create-task.sh" and shutil.which("jq") is None:
            continue
        res = subprocess.run([str(SCRIPTS / script), *args], env=env, capture_output=True,
                             text=True, timeout=60, check=False,
                             preexec_fn=lambda: os.umask(umask))
        assert res.returncode == 0, res.stderr
    assert mode(home.root) == 0o700
    for folder, dirs, files in os.walk(home.root):
        for name in dirs:
            assert mode(Path(folder) / name) == 0o700, Path(folder) / name
        for name in files:
            assert mode(Path(folder) / name) == 0o600, Path(folder) / name
    assert check(home).clean, check(home).findings


def test_init_group_shares_the_home_read_only(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    gid = os.getgid()
    res = harness(home, "init", "--group", str(gid), umask=0o000)
    assert res.returncode == 0, res.stderr
    assert harness(home, "task", "add", "--", "true", umask=0o000).returncode == 0
    assert mode(home.root) == 0o2750
    assert mode(home.coordination) == 0o2750
    assert mode(home.system_config) == 0o640
    assert mode(home.queue_file) == 0o640
    assert mode(home.lock_path("queue")) == 0o640
    assert check(home).clean, check(home).findings
    bad = harness(home, "init", "--group", "no-such-group-xyz")
    assert bad.returncode == 2 and "no such group" in bad.stderr


def test_doctor_reports_and_repairs_wrong_modes(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    queue = TaskQueue(home)
    queue.enqueue({"command": ["true"]})
    queue.sync()  # the jq view exists (as after 1 s of quiet)
    os.chmod(home.queue_file, 0o644)
    os.chmod(home.inbox, 0o777)
    os.chmod(home.root, 0o755)
    report = check(home)
    found = [f for f in report.findings if f.code == "bad_mode"]
    assert {Path(str(f.path)) for f in found} == {home.queue_file, home.inbox, home.root}
    assert "0644" in next(f.message for f in found if f.path == str(home.queue_file))
    check(home, repair=True)
    assert (mode(home.queue_file), mode(home.inbox), mode(home.root)) == (0o600, 0o700, 0o700)
    assert check(home).clean


# ---------------------------------------------------------------------------- links
def test_appends_refuse_a_linked_file_or_folder(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(b"")
    home.events_file.symlink_to(outside)
    res = harness(home, "events", "emit", "--type", "t")
    assert res.returncode == 1
    assert "symbolic link" in res.stderr
    assert outside.read_bytes() == b""
    # a folder swapped for a link is refused too (openat under an O_NOFOLLOW folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(home.dead_letters)
    home.dead_letters.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafePath):
        replace_json(home.dead_letter("t-1"), {"task_id": "t-1"})
    with pytest.raises(UnsafePath):
        append_bytes(home.dead_letters / "x.jsonl", b"{}\n")
    assert os.listdir(elsewhere) == []


def test_shell_append_refuses_a_linked_events_file(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(b"")
    home.events_file.symlink_to(outside)
    res = subprocess.run([str(SCRIPTS / "emit-event.sh"), "--home", str(home.root),
                          "--type", "t"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 2, res.stderr
    assert "symbolic link" in res.stderr
    assert outside.read_bytes() == b""


def test_doctor_flags_links_and_repair_quarantines_them(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    target = tmp_path / "secret.txt"
    target.write_text("keep me")
    (home.results / "t-1").symlink_to(tmp_path, target_is_directory=True)
    home.task_log("t-2").symlink_to(target)
    report = check(home)
    links = [f for f in report.findings if f.code == "symlink"]
    assert {Path(str(f.path)) for f in links} == {home.results / "t-1", home.task_log("t-2")}
    assert all(f.level == "error" for f in links)
    check(home, repair=True)
    assert not (home.results / "t-1").is_symlink() and not home.task_log("t-2").is_symlink()
    assert target.read_text() == "keep me"  # the link moved, never its target
    assert "symlink" not in codes(check(home))


def _run_one_task(home: Home) -> subprocess.CompletedProcess[str]:
    return harness(home, "worker", "run", "--once", "--idle-exit", "5")


def test_worker_refuses_a_linked_results_folder(tmp_path: Path) -> None:
    home = make_home(tmp_path, durability="none")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "result.json").write_text('{"keep": true}')
    task = TaskQueue(home).enqueue({"max_attempts": 1,
                                    "command": ["touch", "ran-here"]}).task
    (home.results / task["task_id"]).symlink_to(elsewhere, target_is_directory=True)
    res = _run_one_task(home)
    assert res.returncode == 0, res.stderr
    assert (elsewhere / "result.json").read_text() == '{"keep": true}'  # not deleted
    assert not (elsewhere / "ran-here").exists()  # the task did not run there
    letter = TaskQueue(home).dead_letters()[0]
    assert "symbolic link" in (letter["last_error"] or "")


def test_worker_refuses_a_linked_task_log(tmp_path: Path) -> None:
    home = make_home(tmp_path, durability="none")
    outside = tmp_path / "outside.log"
    outside.write_text("untouched\n")
    task = TaskQueue(home).enqueue({"max_attempts": 1, "command": ["echo", "hi"]}).task
    home.task_log(task["task_id"]).symlink_to(outside)
    res = _run_one_task(home)
    assert res.returncode == 0, res.stderr
    assert outside.read_text() == "untouched\n"
    assert "symbolic link" in (TaskQueue(home).dead_letters()[0]["last_error"] or "")


def test_worker_does_not_read_a_linked_result_file(tmp_path: Path) -> None:
    home = make_home(tmp_path, durability="none")
    private = tmp_path / "private.json"
    private.write_text('{"stolen": "private data"}')
    task = TaskQueue(home).enqueue({"max_attempts": 1, "command": [
        "sh", "-c", f'ln -s {private} "$HARNESS_RESULT_FILE"']}).task
    assert _run_one_task(home).returncode == 0
    records = [r for r in read_jsonl(home.history_file).records
               if r["task_id"] == task["task_id"]]
    assert records and all("private data" not in orjson.dumps(r).decode() for r in records)


# ---------------------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only); skipped where mount(8) is refused."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                          str(mnt)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"needs a small tmpfs: mount -t tmpfs failed ({res.stderr.strip()}); "
                    "run as root with CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` up to its last byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"x" * 4096)
    with open(filler, "ab", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"x")
    return filler


def _lines_are_whole(path: Path) -> None:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    read = read_jsonl(path)
    assert read.bad_lines == 0, read


def test_failed_appends_on_a_full_disk_leave_no_torn_line(small_disk: Path) -> None:
    home = make_home(small_disk, durability="none")
    # tmpfs allocates whole pages: end the file 10 bytes short of a page boundary, so
    # that any event needs a new page, which the full disk refuses.
    room = 4096 - 10 - len(b'{"pad":""}\n')
    append_bytes(home.events_file, orjson.dumps({"pad": "p" * room}) + b"\n", "none")
    before = home.events_file.read_bytes()
    assert len(before) % 4096 == 4086
    filler = _fill(small_disk)
    big = orjson.dumps({"message": "y" * 8000}) + b"\n"
    with pytest.raises(DiskFull):
        append_bytes(home.events_file, big, "none")
    assert home.events_file.read_bytes() == before
    # the shell writer: a long line (dd) and a short one (printf)
    for message in ("z" * 6000, "short"):
        res = subprocess.run([str(SCRIPTS / "emit-event.sh"), "--home", str(home.root),
                              "--type", "t", "--message", message], capture_output=True,
                             text=True, timeout=60, check=False)
        assert res.returncode == 1, res.stderr
        assert "the file is as it was" in res.stderr
        assert home.events_file.read_bytes() == before
    filler.unlink()
    res = subprocess.run([str(SCRIPTS / "emit-event.sh"), "--home", str(home.root),
                          "--type", "t", "--message", "after"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    _lines_are_whole(home.events_file)
    assert [r.get("message") for r in read_jsonl(home.events_file).records][-1] == "after"


def test_readers_keep_the_record_glued_after_a_torn_fragment(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    good: dict[str, Any] = {
        "event_id": "ev-2", "timestamp": "2026-01-01T00:00:00.000Z", "type": "after",
        "severity": "info", "source": "t", "message": "kept", "task_id": None,
        "worker_id": None, "correlation_id": None, "data": {}}
    home.events_file.write_bytes(b'{"event_id": "ev-0", "type": "ok"}\n'
                                 b'{"event_id": "ev-1", "message": "tor'
                                 + orjson.dumps(good) + b"\n")
    read = read_jsonl(home.events_file)
    assert read.bad_lines == 1
    assert [r["event_id"] for r in read.records] == ["ev-0", "ev-2"]
    assert [r["event_id"] for r in tail_jsonl(home.events_file, 5)] == ["ev-0", "ev-2"]
    size = home.events_file.stat().st_size
    assert [r["event_id"] for r in read_appended(home.events_file, 0, size)[0]] == \
        ["ev-0", "ev-2"]
    out = harness(home, "events", "tail")
    assert "kept" in out.stdout
    assert "skipped 1 torn or unparseable line(s)" in out.stderr
    assert any(f.code == "bad_jsonl_lines" for f in check(home).findings)


def test_init_tightens_an_existing_open_root(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir()
    os.chmod(root, 0o755)  # e.g. systemd's StateDirectory= default mode
    home = Home(root)
    assert harness(home, "init").returncode == 0
    assert mode(root) == 0o700
    assert check(home).clean


def test_a_linked_lock_file_is_refused(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    outside = tmp_path / "elsewhere.lock"
    home.lock_path("events").unlink()
    home.lock_path("events").symlink_to(outside)
    res = harness(home, "events", "emit", "--type", "t")
    assert res.returncode == 1 and "symbolic link" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not outside.exists()
    sh = subprocess.run([str(SCRIPTS / "emit-event.sh"), "--home", str(home.root),
                         "--type", "t"], capture_output=True, text=True, timeout=60,
                        check=False)
    assert sh.returncode == 2 and "symbolic link" in sh.stderr
    assert not outside.exists()


def test_failed_appends_past_rlimit_fsize_leave_no_torn_line(tmp_path: Path) -> None:
    """The same guarantee without root: RLIMIT_FSIZE makes the write stop part-way
    (EFBIG, SIGXFSZ ignored), from the shell and from Python."""
    home = make_home(tmp_path, durability="none")
    limit = 4 * 1024  # bash's ulimit -f counts KiB
    pad = limit - 10 - len(b'{"pad":""}\n')
    append_bytes(home.events_file, orjson.dumps({"pad": "p" * pad}) + b"\n", "none")
    before = home.events_file.read_bytes()
    assert len(before) == limit - 10
    for message in ("short message", "m" * 3000):
        res = subprocess.run(
            ["bash", "-c", 'trap "" XFSZ; ulimit -f 4; exec "$@"', "bash",
             str(SCRIPTS / "emit-event.sh"), "--home", str(home.root), "--type", "t",
             "--message", message], capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 1, res.stderr
        assert home.events_file.read_bytes() == before  # no partial line left
        assert "the file is as it was" in res.stderr
    code = ("import resource, signal, sys; from pathlib import Path; "
            "from coordination.store import append_bytes; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "append_bytes(Path(sys.argv[1]), b'{\"event\": \"' + b'x' * 100 + b'\"}\\n', 'none')")
    res = subprocess.run([sys.executable, "-c", code, str(home.events_file)],
                         capture_output=True, text=True, timeout=60, check=False,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert res.returncode == 1 and "DiskFull" in res.stderr, res.stderr  # a short write
    assert home.events_file.read_bytes() == before
    _lines_are_whole(home.events_file)
