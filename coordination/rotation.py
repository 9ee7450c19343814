"""Rotation of the home's append-only JSONL files (events, metrics, the file queue's
history) into gzip archives, under ``locks/janitor.lock``.

The janitor rotates ``dashboard-events.jsonl`` and ``metrics-snapshots.jsonl`` with a
:class:`Rotator`; the file queue backend rotates ``task-history.jsonl`` with one as its
``apply_retention`` (the queue port's retention: the janitor never names a queue file).
Only a holder of ``janitor.lock`` rewrites a rotated file.

Rotation of one file NAME.jsonl under its writers' lock L (``locks/events.lock``, ...):

a. *under L*: note the size S0. A last line without a newline is torn: appends are one
   ``write(2)`` under L, so none is in flight while we hold it. The fragment is appended
   to ``NAME.jsonl.corrupt`` (fsynced) and cut off the live file.
b. *unlocked*: the file is due when S0 > ``*_max_bytes`` or it has more than
   ``*_max_lines`` lines. The cut is the start of the newest ``*_keep_lines`` lines (at
   most ``*_max_bytes``/2 bytes of them, or the next run would rotate again at once).
   [0, cut) is gzipped into a hidden temp archive and [cut, S0) copied into a hidden temp
   live file, both fsynced. This is safe without L: writers only append past S0, and the
   only process that rewrites the file is a janitor, which ``janitor.lock`` excludes.
   The archive that would become generation ``archive_generations + 1`` is deleted before
   the archive is written, and older archives are shifted (.1 -> .2, ...).
c. *under L* (short: only the lines appended since a.): check the live file is still the
   same inode and not shorter, append [S0, end) to the temp live file (a torn last line
   is repaired as in a.), fsync it, write the journal ``.NAME.jsonl.rotation`` (the live
   file's inode, the cut, the temp names), rename the temp archive to NAME.1.jsonl.gz,
   rename the temp live file over NAME.jsonl, fsync the directory.
d. unlink the journal.

Writers (:func:`coordination.store.append_bytes`, ``scripts/emit-event.sh``) open the file
by path for every append, under L, so the append after c. goes to the new file: no line
is lost or written twice. A crash at any instant loses nothing, and the journal makes the
one state with duplicated lines (the archive published, the live file not yet replaced)
recoverable: the next run rolls the rotation back (the temp archive still exists: delete
the temp files, the live file is untouched) or forward (the archive is published and the
live file is still the old inode: rebuild the live file from the cut).

Disk full (ENOSPC, EDQUOT) during a rotation removes the temp files and leaves the live
file and the archives as they were; the run goes on with the other steps and finally
ends the file's part of the run with a :class:`coordination.errors.DiskFull` in
``errors`` (the janitor raises JanitorDiskFull, exit 1).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import clock
from .config import SystemConfig, load_system
from .errors import CorruptFileError, DiskFull, HarnessError
from .locks import lock_for
from .paths import Home
from .store import dumps, fsync_dir, open_in_folder, read_json, replace_bytes
from .streamcopy import Sink, copy_range, count_lines, find_cut, torn_start

#: zlib level of the archives: 6 is gzip's default trade-off (see docs/janitor.md figures).
GZIP_LEVEL = 6
#: Marker in the names of the janitor's temp files (``.NAME.tmp-janitor-PID-HEX``). It
#: contains ".tmp" so that ``harness doctor`` reports a stale one like any other temp file.
TMP_TAG = ".tmp-janitor-"
#: Longest list of names kept in a summary and the janitor_run event.
LIST_CAP = 50
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Rotated:
    """One rotated JSONL file: ``key`` is both its lock name and its config key prefix."""

    key: str
    path: Path

    @property
    def stem(self) -> str:
        return self.path.name.removesuffix(".jsonl")

    def archive(self, generation: int) -> Path:
        return self.path.with_name(f"{self.stem}.{generation}.jsonl.gz")

    @property
    def journal(self) -> Path:
        return self.path.with_name(f".{self.path.name}.rotation")

    @property
    def corrupt(self) -> Path:
        return self.path.with_name(self.path.name + ".corrupt")

    def generations(self) -> dict[int, Path]:
        """Existing archives by generation number."""
        pattern = re.compile(rf"^{re.escape(self.stem)}\.([1-9][0-9]*)\.jsonl\.gz$")
        out: dict[int, Path] = {}
        try:
            names = os.listdir(self.path.parent)
        except FileNotFoundError:
            return out
        for name in names:
            m = pattern.match(name)
            if m:
                out[int(m.group(1))] = self.path.parent / name
        return out


def rotated_files(home: Home) -> tuple[Rotated, ...]:
    return (Rotated("events", home.events_file), Rotated("metrics", home.metrics_file),
            Rotated("history", home.history_file))


def archive_paths(home: Home) -> dict[str, list[Path]]:
    """Every archive of each rotated file, newest (generation 1) first."""
    return {r.path.name: [p for _, p in sorted(r.generations().items())]
            for r in rotated_files(home)}


def _os_error(path: Path, exc: OSError, what: str) -> HarnessError:
    if exc.errno in _DISK_FULL:
        return DiskFull(f"{path}: no space left while {what} "
                        f"({os.strerror(exc.errno or errno.ENOSPC)}); nothing was lost, the "
                        "file is as it was. Free space and run `harness janitor run` again.")
    return HarnessError(f"{path}: {what} failed: {exc.strerror or exc}")


def _checkpoint(step: str, path: Path) -> None:
    """Called at the named steps of a rotation; tests replace it to crash or race there.

    Steps: ``archive_written`` (unlocked), ``journal_written``, ``archive_published``,
    ``live_published`` (those three under the file's lock).
    """


ROTATION_KEYS = ("bytes_freed", "lines_archived", "torn_lines_repaired", "archives_deleted",
                 "rotations", "torn", "recovered", "temp_files_removed", "skipped", "errors",
                 "error_count", "max_lock_hold_s")


def empty_summary() -> dict[str, Any]:
    """The rotation part of a janitor summary, all zero."""
    return {"bytes_freed": 0, "lines_archived": 0, "torn_lines_repaired": 0,
            "archives_deleted": 0, "rotations": [], "torn": [], "recovered": [],
            "temp_files_removed": 0, "skipped": [], "errors": [], "error_count": 0,
            "max_lock_hold_s": 0.0}


def merge_summary(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Add ``part`` (another run's summary, or a part of one) into ``into``: numbers add,
    lists extend (``errors`` up to LIST_CAP), ``max_lock_hold_s`` takes the larger."""
    for key, value in part.items():
        if key == "max_lock_hold_s":
            into[key] = max(into.get(key, 0.0), value)
        elif isinstance(value, list):
            into.setdefault(key, []).extend(value)
            if key == "errors":
                del into[key][LIST_CAP:]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value
        elif key not in into:
            into[key] = value


class Rotator:
    """One pass of rotations over a home, as of ``now``: the caller holds janitor.lock
    (:meth:`rotate_files` takes it, re-entrant within a process). ``summary`` says what it
    did (dry run: would do); ``errors`` what failed (a failed file is left as it was)."""

    def __init__(self, home: Home, now: float, dry_run: bool) -> None:
        self.home = home
        self.now = now
        self.dry_run = dry_run
        self.cfg: SystemConfig = load_system(home)
        self.fsync = self.cfg.durability == "fsync"
        self.timeout = self.cfg.lock_timeout
        self.errors: list[HarnessError] = []
        self.gone: set[Path] = set()  # what a dry run would have deleted
        self.unpredictable: set[Path] = set()  # a dry run would roll these forward first
        self.summary: dict[str, Any] = empty_summary()

    def rotate_files(self, files: tuple[Rotated, ...]) -> None:
        """Recover an interrupted rotation of each of ``files``, delete its archives beyond
        ``archive_generations``, then rotate it when due; under janitor.lock."""
        with lock_for(self.home.lock_path("janitor")).held_for(self.timeout):
            self.recover(files)
            for r in files:
                self.drop_generations(r)
            for r in files:
                self.rotate(r)

    # -- bookkeeping ----------------------------------------------------------------------
    def fail(self, exc: BaseException, where: str) -> None:
        if isinstance(exc, OSError):
            err = _os_error(Path(exc.filename or where), exc, where)
        elif isinstance(exc, HarnessError):
            err = exc
        else:
            raise exc
        self.errors.append(err)
        self.summary["error_count"] += 1
        if len(self.summary["errors"]) < LIST_CAP:
            self.summary["errors"].append(f"{where}: {err}"[:1000])

    def freed(self, nbytes: int | None) -> bool:
        """Count ``nbytes`` as freed; False when None (nothing was deleted)."""
        if nbytes is None:
            return False
        self.summary["bytes_freed"] += nbytes
        return True

    def held(self, started: float) -> float:
        held = time.monotonic() - started
        self.summary["max_lock_hold_s"] = max(self.summary["max_lock_hold_s"], round(held, 6))
        return held

    def delete(self, path: Path) -> int | None:
        """Delete a file or a directory tree and return the bytes it held; None when there
        was nothing to delete. A dry run deletes nothing but remembers the path, so a
        later step does not count it twice."""
        if path in self.gone:
            return None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        size = st.st_size
        if stat.S_ISDIR(st.st_mode):
            size = _tree_size(path)
            if not self.dry_run:
                shutil.rmtree(path)
        elif not self.dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return None
        if self.dry_run:
            self.gone.add(path)
        return size

    # -- 1. recovery ------------------------------------------------------------------------
    def recover(self, files: tuple[Rotated, ...]) -> None:
        """Resolve the rotation journal each of ``files`` may have left (see the module
        docstring)."""
        for r in files:
            if not r.journal.exists():
                continue
            try:
                self._recover_one(r)
            except (OSError, HarnessError) as exc:
                self.fail(exc, f"recovering the rotation of {r.path.name}")

    def remove_stale_temps(self) -> None:
        """Delete the janitor's temp files (``.NAME.tmp-janitor-*``) in the coordination
        folder, except those a pending rotation journal names (its recovery needs them)."""
        folder = self.home.coordination
        try:
            names = [n for n in os.listdir(folder) if n.startswith(".") and TMP_TAG in n]
        except FileNotFoundError:
            names = []
        pending = tuple(f".{r.stem}." for r in rotated_files(self.home)
                        if r.journal.exists() and r.journal not in self.gone)
        for name in names:
            if pending and name.startswith(pending):
                continue
            # Only a janitor writes these names, and we hold janitor.lock: they are stale.
            if self.freed(self.delete(folder / name)):
                self.summary["temp_files_removed"] += 1

    def _recover_one(self, r: Rotated) -> None:
        try:
            journal = read_json(r.journal)
            folder = r.path.parent
            archive_tmp = folder / str(journal["archive_tmp"])
            live_tmp = folder / str(journal["live_tmp"])
            inode, cut, archive_size = (int(journal["inode"]), int(journal["cut"]),
                                        int(journal["archive_size"]))
        except (CorruptFileError, KeyError, TypeError, ValueError) as exc:
            # A journal is published by rename, so this is not a crash of ours; it is
            # useless without its fields: report and drop it (nothing refers to it).
            self.summary["recovered"].append({"file": r.path.name, "action": "bad journal "
                                              f"dropped ({exc})"})
            self.delete(r.journal)
            return
        if archive_tmp.exists():
            action = "rolled back (the archive was never published; the live file is intact)"
            for p in (archive_tmp, live_tmp, r.journal):
                self.delete(p)
            self.summary["recovered"].append({"file": r.path.name, "action": action})
            return
        action = "nothing to do (the rotation had completed)"
        lock = lock_for(self.home.lock_path(r.key))
        started = time.monotonic()
        with lock.held_for(self.timeout):
            try:
                st = os.stat(r.path)
            except FileNotFoundError:
                st = None
            first = r.archive(1)
            if st is not None and st.st_ino == inode and first.exists() \
                    and first.stat().st_size == archive_size and st.st_size >= cut:
                action = ("rolled forward (the archive was published but the live file not "
                          "replaced: lines before the cut are now only in the archive)")
                if self.dry_run:
                    self.unpredictable.add(r.path)
                else:
                    self._rebuild_live(r, st, cut)
        self.held(started)
        self.delete(live_tmp)
        self.delete(r.journal)
        self.summary["recovered"].append({"file": r.path.name, "action": action})

    def _rebuild_live(self, r: Rotated, st: os.stat_result, cut: int) -> None:
        """Replace the live file by its bytes [cut, end), under its lock."""
        fd = os.open(r.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        sink: Sink | None = None
        try:
            end = st.st_size
            torn = torn_start(fd, cut, end)
            if torn is not None:
                self._repair_torn(r, fd, torn, end)
                end = torn
            sink = Sink.create(self._tmp_name(r.path), st)
            copy_range(fd, cut, end, sink)
            sink.close(self.fsync)
            os.replace(sink.name, r.path)
            if self.fsync:
                fsync_dir(r.path.parent)
        finally:
            os.close(fd)
            if sink is not None:
                sink.discard()

    def drop_generations(self, r: Rotated) -> None:
        """Delete the archives of ``r`` beyond ``archive_generations``."""
        self._drop_generations(r, int(self.cfg.values["archive_generations"]))

    def _drop_generations(self, r: Rotated, keep: int) -> None:
        """Delete the archives of ``r`` whose generation is above ``keep``."""
        for gen, path in sorted(r.generations().items()):
            if gen > keep:
                try:
                    if not self.freed(self.delete(path)):
                        continue
                except OSError as exc:
                    self.fail(exc, f"deleting {path}")
                    continue
                self.summary["archives_deleted"] += 1

    # -- 3. rotation ----------------------------------------------------------------------
    def _tmp_name(self, target: Path) -> Path:
        return target.with_name(f".{target.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")

    def _repair_torn(self, r: Rotated, fd: int, start: int, end: int) -> None:
        """Move the torn bytes [start, end) of the live file to NAME.corrupt and cut them
        off (the caller holds the file's lock). In a dry run only count them. Counted as
        repaired only once both are done: a failed repair raises (and is reported as an
        error by the caller), never counted."""
        if not self.dry_run:
            self._move_torn(r, fd, start, end)
        self.summary["torn_lines_repaired"] += 1
        if len(self.summary["torn"]) < LIST_CAP:
            self.summary["torn"].append({"file": r.path.name, "offset": start,
                                         "bytes": end - start, "moved_to": r.corrupt.name})

    def _move_torn(self, r: Rotated, fd: int, start: int, end: int) -> None:
        cfd = open_in_folder(r.corrupt, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            base = os.fstat(cfd).st_size
            try:
                sink = Sink(cfd)
                copy_range(fd, start, end, sink)
                sink.write(b"\n")
                if self.fsync:
                    os.fsync(cfd)
            except BaseException:
                os.ftruncate(cfd, base)  # never keep half a fragment
                raise
        finally:
            os.close(cfd)
        wfd = os.open(r.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.ftruncate(wfd, start)
            if self.fsync:
                os.fsync(wfd)
        finally:
            os.close(wfd)

    def rotate(self, r: Rotated) -> None:
        if (r.journal.exists() and r.journal not in self.gone) or r.path in self.unpredictable:
            # Recovery failed (an error is recorded) or, in a dry run, is only predicted:
            # rotating now could archive lines that the journal's archive already holds.
            self.summary["skipped"].append(f"{r.path.name}: an interrupted rotation is "
                                           f"pending ({r.journal.name})")
            return
        try:
            # O_NOFOLLOW: a linked live file is an error (doctor: symlink), never archived
            fd = os.open(r.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        sinks: list[Sink] = []
        try:
            self._rotate(r, fd, sinks)
        except (OSError, HarnessError) as exc:
            self.fail(exc, f"rotating {r.path.name}")
        finally:
            os.close(fd)
            for sink in sinks:
                sink.discard()

    def _rotate(self, r: Rotated, fd: int, sinks: list[Sink]) -> None:
        values = self.cfg.values
        max_bytes = int(values[f"{r.key}_max_bytes"])
        max_lines = int(values[f"{r.key}_max_lines"])
        keep_lines = int(values[f"{r.key}_keep_lines"])
        generations = int(values["archive_generations"])
        lock = lock_for(self.home.lock_path(r.key))

        # a. under the lock: the size, and a torn last line.
        started = time.monotonic()
        with lock.held_for(self.timeout):
            st = os.fstat(fd)
            if os.stat(r.path).st_ino != st.st_ino:
                raise HarnessError(f"{r.path} was replaced while the janitor opened it")
            size0 = st.st_size
            torn = torn_start(fd, 0, size0)
            if torn is not None:
                self._repair_torn(r, fd, torn, size0)
                size0 = torn
        self.held(started)

        # b. unlocked: due?, the cut, the archive and the kept tail.
        if size0 > max_bytes:
            reason = f"{size0} bytes > {r.key}_max_bytes {max_bytes}"
        else:
            lines = count_lines(fd, size0)
            if lines <= max_lines:
                return
            reason = f"{lines} lines > {r.key}_max_lines {max_lines}"
        cut, kept = find_cut(fd, size0, keep_lines, max_bytes // 2)
        if cut == 0:
            self.summary["skipped"].append(f"{r.path.name}: due ({reason}) but the newest "
                                           f"{r.key}_keep_lines lines are all of it")
            return
        # Deletions first: the archive the shift would push past archive_generations.
        self._drop_generations(r, generations - 1)
        archive = r.archive(1)
        if self.dry_run:
            archive_sink = Sink(None)
        else:
            archive_sink = Sink.create(self._tmp_name(archive), st)
            sinks.append(archive_sink)
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: gzip format
        lines_archived = copy_range(fd, 0, cut, archive_sink, compressor)
        archive_sink.write(compressor.flush())
        archive_sink.close(self.fsync)
        report: dict[str, Any] = {
            "file": r.path.name, "reason": reason, "archive": archive.name,
            "lines_archived": lines_archived, "bytes_archived": cut,
            "archive_bytes": archive_sink.size, "kept_lines": kept,
            "kept_bytes": size0 - cut, "appended_meanwhile_bytes": 0, "lock_hold_s": 0.0,
        }
        _checkpoint("archive_written", r.path)
        if self.dry_run:
            self._rotated(report)
            return
        live_sink = Sink.create(self._tmp_name(r.path), st)
        sinks.append(live_sink)
        copy_range(fd, cut, size0, live_sink)
        if self.fsync:
            live_sink.sync()
        shifted = self._shift(r, generations)
        published = False
        started = time.monotonic()
        try:
            # c. under the lock: the lines appended meanwhile, then publish both.
            with lock.held_for(self.timeout):
                now_st = os.stat(r.path)
                if (now_st.st_ino, now_st.st_dev) != (st.st_ino, st.st_dev) \
                        or now_st.st_size < size0:
                    raise HarnessError(f"{r.path} was replaced or truncated during the "
                                       "rotation (another tool rewrote it); the rotation was "
                                       "abandoned")
                end = now_st.st_size
                torn = torn_start(fd, size0, end)
                if torn is not None:
                    self._repair_torn(r, fd, torn, end)
                    end = torn
                copy_range(fd, size0, end, live_sink)
                live_sink.close(self.fsync)
                journal = {"version": 1, "file": r.path.name, "inode": st.st_ino, "cut": cut,
                           "archive": archive.name, "archive_size": archive_sink.size,
                           "archive_tmp": archive_sink.name.name,
                           "live_tmp": live_sink.name.name,
                           "started_at": clock.iso(clock.now())}
                replace_bytes(r.journal, dumps(journal) + b"\n",
                              "fsync" if self.fsync else "none")
                _checkpoint("journal_written", r.path)
                os.replace(archive_sink.name, archive)
                published = True
                # From here on, a failure leaves the journal: the next run rolls forward.
                _checkpoint("archive_published", r.path)
                os.replace(live_sink.name, r.path)
                if self.fsync:
                    fsync_dir(r.path.parent)
                _checkpoint("live_published", r.path)
        except BaseException:
            if not published:
                # Nothing was published: drop the journal (it would only name temp files
                # being removed) and put the shifted archives back where they were.
                try:
                    os.unlink(r.journal)
                except FileNotFoundError:
                    pass
                for src, dst in reversed(shifted):
                    try:
                        os.replace(dst, src)
                    except OSError:
                        pass
            raise
        report["lock_hold_s"] = round(max(report["lock_hold_s"], self.held(started)), 6)
        report["appended_meanwhile_bytes"] = end - size0
        os.unlink(r.journal)
        self._rotated(report)

    def _rotated(self, report: dict[str, Any]) -> None:
        self.summary["rotations"].append(report)
        self.summary["lines_archived"] += report["lines_archived"]
        self.freed(report["bytes_archived"] - report["archive_bytes"])

    def _shift(self, r: Rotated, generations: int) -> list[tuple[Path, Path]]:
        """Rename NAME.k.jsonl.gz to NAME.(k+1).jsonl.gz, oldest first, so .1 is free;
        return the renames done (to undo them if the rotation fails)."""
        done: list[tuple[Path, Path]] = []
        try:
            for gen, path in sorted(r.generations().items(), reverse=True):
                if gen >= generations:  # already deleted unless it appeared meanwhile
                    os.unlink(path)
                    continue
                os.replace(path, r.archive(gen + 1))
                done.append((path, r.archive(gen + 1)))
        except BaseException:
            for src, dst in reversed(done):
                os.replace(dst, src)
            raise
        return done


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total
