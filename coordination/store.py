"""Store primitives: publish-by-rename JSON, whole-line JSONL appends, safe folder I/O.

Guarantees
- :func:`replace_bytes` / :func:`replace_json`: readers see the old file or the new file,
  never a torn one. The new content is written to a hidden temp file in the same directory
  (``.NAME.tmp-PID-RANDOM``), fsynced, renamed over the target, and the directory fsynced
  (with ``durability="none"`` both fsyncs are skipped: atomic, but not crash-durable).
  On any failure (ENOSPC included) the temp file is removed and the old file is untouched.
- :func:`append_line`: one ``write(2)`` of one whole line with O_APPEND; callers hold the
  resource's lock so a rotating janitor never loses or duplicates it.
- No link is followed out of the home: every write opens the file's folder with
  ``O_NOFOLLOW | O_DIRECTORY`` and the file relative to that descriptor (openat) with
  ``O_NOFOLLOW``, so neither the file nor its folder can be a symbolic link planted or
  swapped in; :class:`UnsafePath` is raised instead (:func:`open_in_folder`).
- Modes do not depend on the umask: files are created ``0600`` (``0640`` in a setgid
  folder, as a home made by ``harness init --group`` has) and set with fchmod
  (:func:`file_mode_for`).

The tolerant JSONL readers are :mod:`coordination.jsonl`.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Literal, NoReturn

import orjson

from .errors import CorruptFileError, DiskFull, HarnessError, UnsafePath

Durability = Literal["fsync", "none"]
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (orjson; non-str keys rejected)."""
    return orjson.dumps(obj)


def dumps_pretty(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n"


#: Mode of every file harness creates; FILE_MODE_GROUP in a home shared with a group.
FILE_MODE = 0o600
FILE_MODE_GROUP = 0o640
_LINK_ERRORS = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)


def file_mode_for(folder_mode: int) -> int:
    """The mode of a file created in a folder of mode ``folder_mode``: 0640 when the folder
    is shared with its group (setgid, as ``harness init --group`` makes them), else 0600."""
    return FILE_MODE_GROUP if folder_mode & stat.S_ISGID else FILE_MODE


def unsafe_path(path: Path, what: str) -> UnsafePath:
    return UnsafePath(f"{path}: {what} is a symbolic link (or not a regular {what}); harness "
                      f"does not follow links inside the home. Replace it with a real "
                      f"{what} (`harness doctor` lists every link).")


def open_folder(folder: Path) -> int:
    """A descriptor of ``folder``, refusing a symbolic link (:class:`UnsafePath`)."""
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _LINK_ERRORS:
            raise unsafe_path(folder, "folder") from None
        raise


def open_in_folder(path: Path, flags: int, folder_fd: int | None = None) -> int:
    """``os.open(path, flags | O_NOFOLLOW)`` relative to a descriptor of its folder
    (``folder_fd``, else one opened here with :func:`open_folder`), so neither the file
    nor the folder may be a symbolic link (:class:`UnsafePath`). A file this call creates
    gets :func:`file_mode_for` the folder, whatever the umask."""
    own = folder_fd is None
    dfd = open_folder(path.parent) if folder_fd is None else folder_fd
    try:
        mode = file_mode_for(os.fstat(dfd).st_mode)
        try:
            fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in _LINK_ERRORS:
                raise unsafe_path(path, "file") from None
            raise
        if flags & os.O_CREAT:
            st = os.fstat(fd)
            if st.st_mode & 0o777 != mode and st.st_uid == os.geteuid() and \
                    (st.st_size == 0 or flags & os.O_EXCL):
                os.fchmod(fd, mode)  # created now: the umask does not decide
        return fd
    finally:
        if own:
            os.close(dfd)


@functools.cache
def _process_umask() -> int:
    """This process's umask, read once (``/proc/self/status``; harness sets it at start,
    daemons/cli.py); all bits set (nothing assumed) where it cannot be read."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777


def _task_folder_mode(parent: int) -> int:
    """The mode of a folder made in the folder open as ``parent``: shared with the group
    (setgid, read-only for it) when the parent is, else private."""
    return 0o2750 if os.fstat(parent).st_mode & stat.S_ISGID else 0o700


def make_spare_folder(spare: Path) -> bool:
    """Make ``spare`` an empty real folder with a task folder's mode, for a later
    :func:`prepare_task_folder` to rename into place; True when it is ready. An empty
    leftover of that name is made afresh; anything else there (a link, a file, a folder
    with something in it) is left alone and False returned (the task folder is then made
    the usual way)."""
    parent = open_folder(spare.parent)
    try:
        mode = _task_folder_mode(parent)
        try:
            os.mkdir(spare.name, mode, dir_fd=parent)
        except FileExistsError:
            try:
                os.rmdir(spare.name, dir_fd=parent)
                os.mkdir(spare.name, mode, dir_fd=parent)
            except OSError:
                return False
        if mode & _process_umask():
            fd = os.open(spare.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC, dir_fd=parent)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        return True
    finally:
        os.close(parent)


def prepare_task_folder(folder: Path, stale: str, spare: str | None = None) -> None:
    """Make ``folder`` (``results/<task_id>/``) a real directory of the home and remove
    its file ``stale`` (a previous attempt's result), without following a link: neither
    ``folder`` nor its parent may be one (:class:`UnsafePath`), so a planted link can
    neither send the task to run elsewhere nor make the worker delete a file there.

    ``spare``: the name of an empty folder beside it (:func:`make_spare_folder`), renamed
    into place when ``folder`` does not exist yet: a rename allocates nothing, where a
    mkdir allocates an inode and a block, which costs 0.1-0.5 ms on a busy ext4. A rename
    never replaces anything but an empty folder (rename(2): a non-empty folder, a file or
    a link there fails it), and then the usual way follows."""
    parent = open_folder(folder.parent)
    try:
        mode = _task_folder_mode(parent)
        if spare is not None and _take_spare(parent, spare, folder):
            return
        try:
            os.mkdir(folder.name, mode, dir_fd=parent)
        except FileExistsError:
            pass
        else:
            if mode & _process_umask() == 0:
                return  # new and empty, and the umask left its mode alone: nothing to do
        try:
            fd = os.open(folder.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC, dir_fd=parent)
        except OSError as exc:
            if exc.errno in _LINK_ERRORS:
                raise unsafe_path(folder, "folder") from None
            raise
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, mode)
            try:
                os.unlink(stale, dir_fd=fd)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def _take_spare(parent: int, spare: str, folder: Path) -> bool:
    """Rename the spare folder ``spare`` to ``folder`` (both in ``parent``); True when
    ``folder`` is now that new, empty folder. The spare is checked to be a real folder
    after the move, so a link planted as the spare is refused rather than run in."""
    try:
        os.rename(spare, folder.name, src_dir_fd=parent, dst_dir_fd=parent)
    except OSError:
        return False  # no spare, or a folder (or a link) is there already
    if not stat.S_ISDIR(os.lstat(folder.name, dir_fd=parent).st_mode):
        raise unsafe_path(folder, "folder")
    return True


def read_in_folder(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` (at most ``limit`` + 1), refusing a link as the file or its
    folder (:class:`UnsafePath`): a task's ``result.json`` linked to a file elsewhere is
    never read into the history."""
    fd = open_in_folder(path, os.O_RDONLY)
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(limit + 1)
    finally:
        os.close(fd)


def move_aside(path: Path, folder: Path, stamp: str) -> Path:
    """Move ``path`` (a file, or a link itself, never its target) into ``folder`` as
    ``NAME.STAMP`` by rename; returns the new path. Used for quarantine."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = folder / f"{path.name}.{stamp}"
    os.replace(path, target)
    return target


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_write_error(path: Path, exc: OSError) -> NoReturn:
    if exc.errno in _DISK_FULL:
        raise DiskFull(f"{path}: no space left ({os.strerror(exc.errno or 0)}); the previous "
                       f"version is intact. Free space (`harness janitor run`) and retry.") from exc
    raise HarnessError(f"{path}: write failed: {exc.strerror or exc}") from exc


def replace_bytes(path: Path, data: bytes, durability: Durability = "fsync") -> None:
    """Atomically publish ``data`` as ``path`` (see module docstring)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        dfd = open_folder(path.parent)  # the temp file and the rename stay in this folder
    except OSError as exc:
        _raise_write_error(path, exc)
    try:
        try:
            fd = open_in_folder(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dfd)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if durability == "fsync":
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp.name, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            try:
                os.unlink(tmp.name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            _raise_write_error(path, exc)
        if durability == "fsync":
            os.fsync(dfd)
    finally:
        os.close(dfd)


def replace_json(path: Path, obj: Any, durability: Durability = "fsync",
                 pretty: bool = False) -> None:
    replace_bytes(path, dumps_pretty(obj) if pretty else dumps(obj) + b"\n", durability)


def read_json(path: Path) -> Any:
    """Parse ``path``; raise :class:`CorruptFileError` naming file, line and column.

    Raises FileNotFoundError when the file does not exist (callers decide what absent means).
    """
    data = path.read_bytes()
    return parse_json(path, data)


def parse_json(path: Path, data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptFileError(
            path, f"invalid JSON at line {exc.lineno} column {exc.colno} (byte {exc.pos}): "
                  f"{exc.msg}; the file was not modified (see `harness doctor --repair`)"
        ) from None


def append_line(path: Path, obj: Any, durability: Durability = "fsync") -> None:
    """Append ``obj`` as one JSON line with one write. The caller holds the file's lock."""
    append_bytes(path, dumps(obj) + b"\n", durability)


def append_bytes(path: Path, data: bytes, durability: Durability = "fsync") -> None:
    """Append whole lines (``data`` ends with a newline) with one ``write(2)``.

    The caller holds the file's lock. A short write (disk full mid-line) is cut off again,
    so the file never keeps a torn line; then :class:`DiskFull` is raised.
    """
    try:
        dfd = open_folder(path.parent)
        try:
            fd = open_in_folder(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, dfd)
            try:
                start = os.fstat(fd).st_size
                try:
                    written = os.write(fd, data)
                except OSError:
                    os.ftruncate(fd, start)
                    raise
                if written != len(data):
                    os.ftruncate(fd, start)
                    raise OSError(errno.ENOSPC, "short write")
                if durability == "fsync":
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            if durability == "fsync" and start == 0:
                os.fsync(dfd)  # a new directory entry must survive a crash too
        finally:
            os.close(dfd)
    except OSError as exc:
        _raise_write_error(path, exc)
