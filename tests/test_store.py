"""Store primitives: publish-by-rename, whole-line appends, tolerant JSONL readers."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import temp_files

from coordination.errors import CorruptFileError, DiskFull, HarnessError
from coordination.jsonl import iter_jsonl, parse_record, read_appended, read_jsonl, tail_jsonl
from coordination.store import append_bytes, append_line, read_json, replace_bytes, replace_json


# ------------------------------------------------------------------------------ replace
@pytest.mark.parametrize("durability", ["fsync", "none"])
def test_replace_json_publishes_and_leaves_no_temp_files(tmp_path: Path,
                                                         durability: Any) -> None:
    target = tmp_path / "doc.json"
    for i in range(5):
        replace_json(target, {"n": i, "items": list(range(i))}, durability)
        assert json.loads(target.read_bytes()) == {"n": i, "items": list(range(i))}
    replace_json(target, {"pretty": True}, durability, pretty=True)
    assert target.read_text().endswith("\n") and "\n  " in target.read_text()
    assert os.listdir(tmp_path) == ["doc.json"]
    assert temp_files(tmp_path) == []


def test_replace_bytes_changes_inode_never_writes_in_place(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    replace_bytes(target, b"{}\n")
    first = os.stat(target).st_ino
    with open(target, "rb") as reader:  # an open reader keeps seeing its own version
        replace_bytes(target, b'{"v": 2}\n')
        assert reader.read() == b"{}\n"
    assert os.stat(target).st_ino != first
    assert target.read_bytes() == b'{"v": 2}\n'


def test_reader_never_sees_partial_content(tmp_path: Path) -> None:
    target = tmp_path / "big.json"
    versions = [json.dumps({"fill": c * size}).encode() + b"\n"
                for c, size in (("a", 300_000), ("b", 120_000), ("c", 700_000))]
    replace_bytes(target, versions[0], "none")
    stop = threading.Event()
    seen: list[bytes] = []
    bad: list[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if data not in versions:
                bad.append(data[:80])
            else:
                seen.append(data[:10])
            try:
                json.loads(data)
            except ValueError:
                bad.append(b"unparseable")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(150):
            replace_bytes(target, versions[i % 3], "none")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert bad == []
    assert len(seen) > 0
    assert temp_files(tmp_path) == []


def test_enospc_during_replace_keeps_old_file_and_raises_disk_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "queue.json"
    replace_json(target, {"version": "old"})
    before = target.read_bytes()
    calls = []

    def full_disk(fd: int, data: Any) -> int:
        calls.append(len(data))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", full_disk)
        with pytest.raises(DiskFull) as info:
            replace_json(target, {"version": "new", "pad": "x" * 10_000})
    assert calls, "the fake os.write was not used"
    assert str(target) in str(info.value)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["queue.json"]  # the temp file was removed


def test_enospc_after_partial_write_keeps_old_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "queue.json"
    replace_json(target, {"version": "old"})
    before = target.read_bytes()
    real_write = os.write
    state = {"n": 0}

    def fills_up(fd: int, data: Any) -> int:
        state["n"] += 1
        if state["n"] == 1:
            return real_write(fd, bytes(data[:100]))  # a short write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "write", fills_up)
        with pytest.raises(DiskFull):
            replace_bytes(target, b"x" * 5000)
    assert state["n"] == 2
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["queue.json"]


def test_edquot_is_disk_full_and_other_errors_are_harness_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.json"
    replace_json(target, {"a": 1})

    def raiser(code: int) -> Any:
        def write(fd: int, data: Any) -> int:
            raise OSError(code, os.strerror(code))
        return write

    with monkeypatch.context() as m:
        m.setattr(os, "write", raiser(errno.EDQUOT))
        with pytest.raises(DiskFull):
            replace_json(target, {"a": 2})
    with monkeypatch.context() as m:
        m.setattr(os, "write", raiser(errno.EIO))
        with pytest.raises(HarnessError) as info:
            replace_json(target, {"a": 3})
        assert not isinstance(info.value, DiskFull)
    assert json.loads(target.read_bytes()) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_failed_rename_removes_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "adir"
    target.mkdir()
    (target / "keep").write_text("x")  # renaming a file over a non-empty directory fails
    with pytest.raises(HarnessError):
        replace_bytes(target, b"{}\n", "none")
    assert sorted(os.listdir(tmp_path)) == ["adir"]


# ------------------------------------------------------------------------------ append
def test_append_line_writes_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    for i in range(3):
        append_line(path, {"i": i}, "none")
    append_line(path, {"i": 3}, "fsync")
    assert path.read_text() == "".join(json.dumps({"i": i}, separators=(",", ":")) + "\n"
                                       for i in range(4))


def test_append_enospc_leaves_file_unchanged(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "log.jsonl"
    append_line(path, {"i": 0})
    before = path.read_bytes()
    real_write = os.write

    def short_write(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:5]))  # disk fills up mid-line

    with monkeypatch.context() as m:
        m.setattr(os, "write", short_write)
        with pytest.raises(DiskFull):
            append_line(path, {"i": 1, "pad": "y" * 100})

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        with pytest.raises(DiskFull):
            append_bytes(path, b'{"i":2}\n')
    assert path.read_bytes() == before
    assert read_jsonl(path).bad_lines == 0


def test_concurrent_appends_under_lock_never_interleave(tmp_path: Path) -> None:
    from coordination.locks import lock_for

    path = tmp_path / "log.jsonl"
    lock_path = tmp_path / "log.lock"

    def writer(n: int) -> None:
        for i in range(200):
            with lock_for(lock_path).held_for(10):
                append_line(path, {"w": n, "i": i, "pad": "z" * (n * 300)}, "none")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    result = read_jsonl(path)
    assert result.bad_lines == 0
    assert len(result.records) == 800
    for n in range(4):
        assert [r["i"] for r in result.records if r["w"] == n] == list(range(200))


# ------------------------------------------------------------------------------ readers
def test_read_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_bytes(b'{\n  "a": 1,\n  "b": [1, 2\n')
    with pytest.raises(CorruptFileError) as info:
        read_json(path)
    message = str(info.value)
    assert str(path) in message and "line" in message and "column" in message
    assert info.value.path == path
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "absent.json")


def test_read_jsonl_skips_and_counts_torn_and_garbage_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b'{"n": 1}\n'            # 1 good
        b"garbage\n"             # 2 bad
        b'{"n": 2}\n'            # 3 good
        b"\n"                    # 4 blank: skipped, not bad
        b"[1, 2, 3]\n"           # 5 valid JSON but not an object: bad
        b'{"n": 3, "cut\n'       # 6 torn in the middle of the file: bad
        b'{"n": 4}\n'            # 7 good
        b'{"n": 5, "tor'         # 8 torn tail (no newline): bad
    )
    result = read_jsonl(path)
    assert [r["n"] for r in result.records] == [1, 2, 4]
    assert result.bad_lines == 4
    assert result.bad_line_numbers == [2, 5, 6, 8]
    assert result.torn_tail is True
    assert [n for n, obj in iter_jsonl(path) if obj is None] == [2, 5, 6, 8]


def test_read_jsonl_complete_final_line_is_not_torn(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_bytes(b'{"n": 1}\nnot json\n{"n": 2}\n')
    result = read_jsonl(path)
    assert result.bad_lines == 1 and result.torn_tail is False
    # A final line that parses but has no newline is still treated as torn.
    path.write_bytes(b'{"n": 1}\n{"n": 2}')
    result = read_jsonl(path)
    assert [r["n"] for r in result.records] == [1]
    assert result.bad_line_numbers == [2] and result.torn_tail is True


def test_read_jsonl_of_missing_or_empty_file(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "absent.jsonl").records == []
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = read_jsonl(empty)
    assert result.records == [] and result.bad_lines == 0 and not result.torn_tail


def test_tail_jsonl_returns_last_records(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(json.dumps({"n": i}).encode() + b"\n" for i in range(1000)))
    assert [r["n"] for r in tail_jsonl(path, 3)] == [997, 998, 999]
    assert [r["n"] for r in tail_jsonl(path, 1)] == [999]
    assert len(tail_jsonl(path, 5000)) == 1000
    assert tail_jsonl(path, 0) == []
    assert tail_jsonl(tmp_path / "absent.jsonl", 5) == []
    for chunk in (7, 64, 1000):  # chunk boundaries fall inside lines
        assert [r["n"] for r in tail_jsonl(path, 25, chunk=chunk)] == list(range(975, 1000))
        assert len(tail_jsonl(path, 5000, chunk=chunk)) == 1000


def test_tail_jsonl_skips_torn_tail_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\nnot json\n{"n": 3}\n{"n": 4, "to')
    assert [r["n"] for r in tail_jsonl(path, 2)] == [2, 3]
    assert [r["n"] for r in tail_jsonl(path, 10)] == [1, 2, 3]


def test_tail_jsonl_returns_limit_records_when_garbage_is_near_the_end(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n{"n": 3}\ngarbage\n')
    assert [r["n"] for r in tail_jsonl(path, 2, chunk=8)] == [2, 3]


def test_read_appended_leaves_a_torn_line_for_later(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\n\ngarbage\n[1]\n{"b":2}\n{"c":')
    size = path.stat().st_size
    records, offset = read_appended(path, 0, size)
    assert records == [{"a": 1}, {"b": 2}]
    assert offset == size - len(b'{"c":')
    with open(path, "ab") as fh:
        fh.write(b"3}\n")
    more, offset2 = read_appended(path, offset, path.stat().st_size)
    assert more == [{"c": 3}] and offset2 == path.stat().st_size
    assert read_appended(path, offset2, offset2) == ([], offset2)


def test_parse_record_only_objects() -> None:
    assert parse_record(b'{"x": 1}') == {"x": 1}
    assert parse_record(b"[1]") is None and parse_record(b"") is None
    assert parse_record(b"{torn") is None


# -- spare result folders ----------------------------------------------------------------
def test_a_spare_folder_becomes_the_task_folder_by_rename(tmp_path: Path) -> None:
    from coordination.store import make_spare_folder, prepare_task_folder

    results = tmp_path / "results"
    results.mkdir(mode=0o700)
    spare = results / ".spare-w1"
    assert make_spare_folder(spare)
    ino = spare.stat().st_ino
    prepare_task_folder(results / "t-1", "result.json", spare.name)
    assert (results / "t-1").stat().st_ino == ino  # renamed, not made anew
    assert not spare.exists()
    assert (results / "t-1").stat().st_mode & 0o7777 == 0o700
    # No spare any more: the folder of the next task is made by mkdir.
    prepare_task_folder(results / "t-2", "result.json", spare.name)
    assert (results / "t-2").is_dir()


def test_a_spare_never_replaces_a_retried_tasks_folder(tmp_path: Path) -> None:
    from coordination.store import make_spare_folder, prepare_task_folder

    results = tmp_path / "results"
    results.mkdir(mode=0o700)
    (results / "t-1").mkdir(mode=0o700)
    (results / "t-1" / "notes.txt").write_text("kept\n")
    (results / "t-1" / "result.json").write_text("{}\n")
    spare = results / ".spare-w1"
    assert make_spare_folder(spare)
    prepare_task_folder(results / "t-1", "result.json", spare.name)
    assert (results / "t-1" / "notes.txt").read_text() == "kept\n"
    assert not (results / "t-1" / "result.json").exists()  # the stale result is gone
    assert spare.is_dir()  # still there for a later task


def test_a_spare_takes_the_shared_mode_whatever_the_umask(tmp_path: Path) -> None:
    from coordination.store import make_spare_folder

    results = tmp_path / "results"
    results.mkdir()
    os.chmod(results, 0o2750)
    old = os.umask(0o077)
    try:
        assert make_spare_folder(results / ".spare-w1")
    finally:
        os.umask(old)
    assert (results / ".spare-w1").stat().st_mode & 0o7777 == 0o2750


def test_links_as_spare_or_task_folder_are_refused(tmp_path: Path) -> None:
    from coordination.errors import UnsafePath
    from coordination.store import make_spare_folder, prepare_task_folder

    results = tmp_path / "results"
    results.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A link planted as the spare: never made into a spare, and never run in.
    (results / ".spare-w1").symlink_to(elsewhere)
    assert not make_spare_folder(results / ".spare-w1")
    with pytest.raises(UnsafePath):
        prepare_task_folder(results / "t-1", "result.json", ".spare-w1")
    # A link planted as the task folder: the spare is not renamed over it.
    (results / "t-2").symlink_to(elsewhere)
    assert make_spare_folder(results / ".spare-w2")
    with pytest.raises(UnsafePath):
        prepare_task_folder(results / "t-2", "result.json", ".spare-w2")
    assert (results / ".spare-w2").is_dir() and (results / "t-2").is_symlink()


def test_a_non_empty_leftover_is_not_a_spare(tmp_path: Path) -> None:
    from coordination.store import make_spare_folder

    results = tmp_path / "results"
    (results / ".spare-w1").mkdir(parents=True)
    (results / ".spare-w1" / "x").write_text("x")
    assert not make_spare_folder(results / ".spare-w1")
    assert (results / ".spare-w1" / "x").exists()
    (results / ".spare-w2").mkdir()
    assert make_spare_folder(results / ".spare-w2")  # an empty leftover is made afresh
