"""The janitor (``harness janitor run``, hourly via systemd/harness-janitor.timer).

One run is :func:`run_janitor`; it takes ``locks/janitor.lock`` for its whole duration, so
two janitors never work on the same files. docs/janitor.md is the operator's view.

What a run does, in this order (deletions first: they need no new space, so a janitor
on a full disk can still free it):

1. **Recovery.** A rotation journal left by a crashed run of events or metrics is
   resolved (:mod:`coordination.rotation`).
2. **Retention.** ``worker-specs/completed/*.json``, ``results/<task_id>/`` and
   ``logs/tasks/<task_id>.log`` whose newest mtime is older than ``retention_*_days`` are
   deleted, except those of live tasks (queued or running) and of dead letters (which
   ``harness dlq requeue`` may bring back). An unreadable queue means nothing is pruned.
   The spare result folders (``results/.spare-<worker_id>/``) of workers no longer active
   are deleted. Archive generations beyond ``archive_generations`` are deleted.
3. **Rotation** of this host's ``dashboard-events.jsonl`` and ``metrics-snapshots.jsonl``
   (streamed: memory stays bounded whatever the file size; the protocol is
   :mod:`coordination.rotation`).
4. **Queue retention** through the port, ``QueueBackend.apply_retention``: the file
   backend rotates its history file the same way (recovery, generations, rotation); the
   postgres backend deletes old history and shared event rows in the database.
5. **Clean-up** of the janitor's stale temp files (``.NAME.tmp-janitor-*``), except those
   an interrupted rotation still needs.
6. **Report**: one ``janitor_run`` event, once all of the above is durable.

Disk full (ENOSPC, EDQUOT) during a rotation removes the temp files and leaves the live
file and the archives as they were; the run goes on with the other steps and finally
raises :class:`JanitorDiskFull` (a :class:`coordination.errors.DiskFull`, exit 1).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordination import clock
from coordination.errors import DiskFull, HarnessError, TemporaryFailure
from coordination.events import emit
from coordination.locks import lock_for
from coordination.paths import SPARE_PREFIX, Home
from coordination.rotation import (
    TMP_TAG,
    Rotated,
    Rotator,
    archive_paths,
    merge_summary,
    rotated_files,
)

__all__ = ["TMP_TAG", "JanitorBusy", "JanitorDiskFull", "JanitorError", "JanitorFailed",
           "Rotated", "archive_paths", "format_summary", "janitor_files", "rotated_files",
           "run_janitor"]

DAY_S = 86400.0


def janitor_files(home: Home) -> tuple[Rotated, ...]:
    """The files the janitor rotates itself: this host's events and metrics (history is
    the queue backend's, through ``apply_retention``)."""
    return tuple(r for r in rotated_files(home) if r.key != "history")


# ---------------------------------------------------------------------------- errors
class JanitorFailed(Exception):
    """Mixin of the errors :func:`run_janitor` raises after a partly failed run; ``summary``
    is what it did manage (also printed by the CLI)."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


class JanitorDiskFull(JanitorFailed, DiskFull):
    """A write failed with ENOSPC/EDQUOT (exit 1); every file is intact."""


class JanitorBusy(JanitorFailed, TemporaryFailure):
    """A lock stayed busy (exit 75); retry later."""


class JanitorError(JanitorFailed, HarnessError):
    """Any other failure of a step (exit 1)."""


# ---------------------------------------------------------------------------- the run
class _Run(Rotator):
    def __init__(self, home: Home, now: float, dry_run: bool) -> None:
        super().__init__(home, now, dry_run)
        self.summary = {
            "dry_run": dry_run, "as_of": clock.iso(now), "home": str(home.root),
            "files_pruned": 0,
            "pruned": {"completed_specs": 0, "results": 0, "task_logs": 0},
            **self.summary, "trimmed": [], "duration_s": 0.0,
        }

    def queue_retention(self) -> None:
        """History (and, on a postgres home, shared events) retention through the port."""
        try:
            from coordination.queue import open_queue

            report = open_queue(self.home).apply_retention(now=self.now,
                                                           dry_run=self.dry_run)
        except (OSError, HarnessError) as exc:
            self.fail(exc, "queue retention")
            return
        merge_summary(self.summary, report.summary)
        self.errors.extend(report.errors)

    # -- 2. retention ---------------------------------------------------------------------
    def prune(self) -> None:
        try:
            from coordination.queue import open_queue

            queue = open_queue(self.home)
            protected = {t["task_id"] for t in queue.live_tasks()}
            protected |= {t["task_id"] for t in queue.dead_letters()}
        except (OSError, HarnessError) as exc:
            self.fail(exc, "reading the live tasks and dead letters (nothing was pruned)")
            return
        values = self.cfg.values
        kinds: tuple[tuple[str, Path, float, Callable[[str], str | None]], ...] = (
            ("completed_specs", self.home.specs_completed,
             values["retention_completed_specs_days"],
             lambda n: n if n.endswith(".json") else None),
            ("results", self.home.results, values["retention_results_days"], lambda n: n),
            ("task_logs", self.home.task_logs, values["retention_task_logs_days"],
             lambda n: n[:-4] if n.endswith(".log") else None),
        )
        for kind, folder, days, task_of in kinds:
            cutoff = self.now - float(days) * DAY_S
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                task_id = task_of(entry.name)
                if entry.name.startswith(".") or task_id is None:
                    continue
                if kind != "completed_specs" and task_id in protected:
                    continue
                try:
                    if _newest_mtime(Path(entry.path)) >= cutoff:
                        continue
                    if not self.freed(self.delete(Path(entry.path))):
                        continue
                except FileNotFoundError:
                    continue  # removed meanwhile
                except OSError as exc:
                    self.fail(exc, f"pruning {entry.path}")
                    continue
                self.summary["pruned"][kind] += 1
                self.summary["files_pruned"] += 1
        self.prune_spares()

    def prune_spares(self) -> None:
        """Remove the spare result folders (``results/.spare-<worker_id>/``) of workers no
        longer active: a worker removes its own as it exits, a killed one leaves it behind
        until the supervisor has moved its spec out of ``worker-specs/active/``. Counted
        with the results pruned."""
        try:
            entries = [e for e in os.scandir(self.home.results)
                       if e.name.startswith(SPARE_PREFIX)]
            active = {name[:-5] for name in os.listdir(self.home.specs_active)
                      if name.endswith(".json")} if entries else set()
        except FileNotFoundError:
            return
        except OSError as exc:
            self.fail(exc, "listing the spare result folders")
            return
        for entry in entries:
            if entry.name[len(SPARE_PREFIX):] in active:
                continue
            try:
                if not self.freed(self.delete(Path(entry.path))):
                    continue
            except OSError as exc:
                self.fail(exc, f"pruning {entry.path}")
                continue
            self.summary["pruned"]["results"] += 1
            self.summary["files_pruned"] += 1

    # -- 6. report ------------------------------------------------------------------------
    def report(self) -> None:
        s = self.summary
        severity = "error" if self.errors else (
            "warning" if s["torn_lines_repaired"] or s["recovered"] else "info")
        message = (f"freed {s['bytes_freed']} bytes, archived {s['lines_archived']} lines, "
                   f"pruned {s['files_pruned']} files, repaired {s['torn_lines_repaired']} "
                   f"torn lines" + (f"; {len(self.errors)} error(s)" if self.errors else ""))
        try:
            emit(self.home, "janitor_run", severity=severity, source="janitor",
                 message=message, data=dict(s))
        except (OSError, HarnessError) as exc:
            self.fail(exc, "emitting the janitor_run event")


def _newest_mtime(path: Path) -> float:
    """The newest mtime of ``path`` and, for a directory, of everything under it."""
    st = os.lstat(path)
    newest = st.st_mtime
    if stat.S_ISDIR(st.st_mode):
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest


def run_janitor(home: Home, now: float, dry_run: bool = False) -> dict[str, Any]:
    """One janitor run over ``home`` (see the module docstring); returns the summary.

    ``now`` drives retention. With ``dry_run`` nothing is changed (no file's bytes or
    mtime) and no event is emitted; the summary says what a real run would do.
    Raises :class:`JanitorDiskFull` (exit 1), :class:`JanitorBusy` (exit 75) or
    :class:`JanitorError` (exit 1) after a run in which a step failed; the steps that
    could run did, and the exception's ``summary`` says what they did.
    """
    home.require()
    run = _Run(home, now, dry_run)
    started = time.monotonic()
    with lock_for(home.lock_path("janitor")).held_for(run.timeout):
        files = janitor_files(home)
        run.recover(files)
        run.prune()
        for r in files:
            run.drop_generations(r)
        for r in files:
            run.rotate(r)
        run.queue_retention()
        run.remove_stale_temps()
        run.summary["duration_s"] = round(time.monotonic() - started, 6)
        if not dry_run:
            run.report()
    summary = run.summary
    if run.errors:
        message = "janitor: " + "; ".join(summary["errors"])
        if any(isinstance(e, DiskFull) for e in run.errors):
            raise JanitorDiskFull(message, summary)
        if all(isinstance(e, TemporaryFailure) for e in run.errors):
            raise JanitorBusy(message, summary)
        raise JanitorError(message, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> list[str]:
    """The summary as lines of text (``harness janitor run`` without --json)."""
    dry = bool(summary["dry_run"])

    def did(verb: str, past: str) -> str:
        return f"would {verb}" if dry else past

    out = []
    for rec in summary["recovered"]:
        out.append(f"{rec['file']}: interrupted rotation: "
                   f"{'(dry run) ' if dry else ''}{rec['action']}")
    if summary["temp_files_removed"]:
        out.append(f"{did('remove', 'removed')} {summary['temp_files_removed']} stale temp "
                   "file(s)")
    for t in summary["torn"]:
        out.append(f"{t['file']}: {did('move', 'moved')} a torn last line ({t['bytes']} "
                   f"bytes at offset {t['offset']}) to {t['moved_to']}")
    for rot in summary["rotations"]:
        out.append(f"{rot['file']}: {did('rotate', 'rotated')} ({rot['reason']}): "
                   f"{rot['lines_archived']} lines ({_human(rot['bytes_archived'])}) -> "
                   f"{rot['archive']} ({_human(rot['archive_bytes'])}); "
                   f"{rot['kept_lines']} kept")
    for trim in summary.get("trimmed", []):
        out.append(f"{trim['table']} (PostgreSQL): {did('delete', 'deleted')} "
                   f"{trim['rows_deleted']} row(s) ({trim['reason']}); {trim['kept_rows']} kept")
    for note in summary["skipped"]:
        out.append(f"skipped {note}")
    pruned = summary["pruned"]
    if summary["files_pruned"]:
        out.append(f"{did('prune', 'pruned')} {pruned['completed_specs']} completed spec(s), "
                   f"{pruned['results']} result dir(s), {pruned['task_logs']} task log(s)")
    if summary["archives_deleted"]:
        out.append(f"{did('delete', 'deleted')} {summary['archives_deleted']} old archive(s)")
    for err in summary["errors"]:
        out.append(f"error: {err}")
    out.append(("dry run (nothing changed): " if dry else "janitor: ")
               + f"{_human(summary['bytes_freed'])} freed, {summary['lines_archived']} lines "
               f"archived, {summary['files_pruned']} files pruned, "
               f"{summary['torn_lines_repaired']} torn lines repaired")
    return out


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
