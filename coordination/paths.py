"""Where every file of a harness home lives (docs/coordination.md, "Layout").

A :class:`Home` only computes paths; it creates directories only in :meth:`Home.create`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import NotInitialized
from .ids import check_id

#: Directory modes: a private home, and one shared with an operator group (setgid).
DIR_MODE = 0o700
DIR_MODE_GROUP = 0o2750

#: The name prefix of a worker's spare result folder, ``results/.spare-<worker_id>/``
#: (:meth:`Home.spare_result_dir`).
SPARE_PREFIX = ".spare-"

#: The lock names; one lock file per resource under ``coordination/locks/NAME.lock``.
#: ``supervisor`` is held by a running supervisor for its whole life (one per home).
LOCK_NAMES = ("queue", "history", "events", "metrics", "specs", "control", "config", "janitor",
              "supervisor")


def resolve_home(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The home directory: ``explicit`` (``--home``), else ``$HARNESS_HOME``, else systemd's
    ``$STATE_DIRECTORY`` (its first entry), else ``$XDG_STATE_HOME/harness`` (default
    ``~/.local/state/harness``). The path is made absolute but not created."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    env = os.environ.get("HARNESS_HOME")
    if env:
        return Path(env).expanduser().absolute()
    state_dir = os.environ.get("STATE_DIRECTORY")
    if state_dir:
        return Path(state_dir.split(":")[0]).absolute()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg).expanduser().absolute() / "harness"


@dataclass(frozen=True)
class Home:
    """The paths of one harness home. Cheap to build; touches no file. Each path is
    computed once per instance (cached_property: daemons ask for them on every step)."""

    root: Path

    @classmethod
    def at(cls, explicit: str | os.PathLike[str] | None = None) -> Home:
        return cls(resolve_home(explicit))

    # -- coordination/ -------------------------------------------------------------------
    @cached_property
    def coordination(self) -> Path:
        return self.root / "coordination"

    @cached_property
    def queue_file(self) -> Path:
        return self.coordination / "task-queue.json"

    @cached_property
    def queue_journal(self) -> Path:
        """The file queue's journal: one line per committed transaction."""
        return self.coordination / "task-queue.journal"

    @cached_property
    def queue_base_file(self) -> Path:
        """The snapshot the current journal starts from (a hard link made at compaction),
        for ``doctor --repair``."""
        return self.coordination / "task-queue.base.json"

    @cached_property
    def inbox(self) -> Path:
        return self.coordination / "inbox"

    @cached_property
    def inbox_rejected(self) -> Path:
        return self.inbox / "rejected"

    @cached_property
    def history_file(self) -> Path:
        return self.coordination / "task-history.jsonl"

    @cached_property
    def dead_letters(self) -> Path:
        return self.coordination / "dead-letters"

    @cached_property
    def specs_active(self) -> Path:
        return self.coordination / "worker-specs" / "active"

    @cached_property
    def specs_completed(self) -> Path:
        return self.coordination / "worker-specs" / "completed"

    @cached_property
    def events_file(self) -> Path:
        return self.coordination / "dashboard-events.jsonl"

    @cached_property
    def metrics_file(self) -> Path:
        return self.coordination / "metrics-snapshots.jsonl"

    @cached_property
    def control_file(self) -> Path:
        return self.coordination / "control.json"

    @cached_property
    def health_file(self) -> Path:
        """The supervisor's health verdict, published by rename under the metrics lock."""
        return self.coordination / "health.json"

    @cached_property
    def supervisor_state_file(self) -> Path:
        """What a supervisor carries across passes and restarts (scale time, circuits,
        progress watermarks, stalls), published by rename by the supervisor only."""
        return self.coordination / "supervisor-state.json"

    @cached_property
    def config_dir(self) -> Path:
        return self.coordination / "config"

    @cached_property
    def system_config(self) -> Path:
        return self.config_dir / "system.json"

    @cached_property
    def worker_types_config(self) -> Path:
        return self.config_dir / "worker-types.json"

    @cached_property
    def web_token_file(self) -> Path:
        """The optional write token of ``harness web`` (mode 0600; docs/web.md)."""
        return self.config_dir / "web-token"

    @cached_property
    def locks(self) -> Path:
        return self.coordination / "locks"

    @cached_property
    def quarantine(self) -> Path:
        return self.coordination / "quarantine"

    @cached_property
    def supervisor_lock(self) -> Path:
        """Held (flock) by a running supervisor for its life: one supervisor per home."""
        return self.lock_path("supervisor")

    def lock_path(self, name: str) -> Path:
        if name not in LOCK_NAMES:
            raise ValueError(f"unknown lock {name!r}; known: {', '.join(LOCK_NAMES)}")
        return self.locks / f"{name}.lock"

    # -- logs/ and results/ --------------------------------------------------------------
    @cached_property
    def logs(self) -> Path:
        return self.root / "logs"

    @cached_property
    def task_logs(self) -> Path:
        return self.logs / "tasks"

    @cached_property
    def worker_logs(self) -> Path:
        """stdout/stderr of workers started by the process actuator (``harness up``,
        ``demo``): ``worker-<instance>.log``, created on the first start (not by init)."""
        return self.logs / "workers"

    @cached_property
    def results(self) -> Path:
        return self.root / "results"

    # Every path built from an id checks the id first (coordination/ids.py): an id from
    # the command line, the inbox or a file can never name a path outside its folder.
    def task_log(self, task_id: str) -> Path:
        return self.task_logs / f"{check_id(task_id, 'task id')}.log"

    def result_dir(self, task_id: str) -> Path:
        return self.results / check_id(task_id, "task id")

    def spare_result_dir(self, worker_id: str) -> Path:
        """``results/.spare-<worker_id>/``: the empty folder a worker makes ahead of its
        next task and renames to ``results/<task_id>/`` when it starts one, so no folder is
        made between the claim and the spawn (docs/coordination.md, "logs/ and results/")."""
        return self.results / f"{SPARE_PREFIX}{check_id(worker_id, 'worker id')}"

    def dead_letter(self, task_id: str) -> Path:
        return self.dead_letters / f"{check_id(task_id, 'task id')}.json"

    def spec_file(self, worker_id: str, completed: bool = False) -> Path:
        """``worker-specs/{active,completed}/<worker_id>.json``."""
        folder = self.specs_completed if completed else self.specs_active
        return folder / f"{check_id(worker_id, 'worker id')}.json"

    # -- lifecycle -------------------------------------------------------------------------
    def directories(self) -> tuple[Path, ...]:
        return (
            self.coordination, self.inbox, self.inbox_rejected,
            self.dead_letters,
            self.specs_active, self.specs_completed, self.config_dir, self.locks,
            self.quarantine, self.logs, self.task_logs, self.results,
        )

    def shared(self) -> bool:
        """Whether the home is shared with an operator group (``harness init --group``):
        its root has the setgid bit (mode 2750). Files are then 0640, else 0600."""
        try:
            return bool(self.root.stat().st_mode & stat.S_ISGID)
        except FileNotFoundError:
            return False

    def expected_dir_mode(self) -> int:
        """0700, or 2750 (setgid: new files get the group) in a shared home."""
        return DIR_MODE_GROUP if self.shared() else DIR_MODE

    def create(self, group: int | None = None) -> None:
        """Create every directory and lock file (idempotent; never truncates a lock file).

        Directories created here are 0700 whatever the umask (0750 plus setgid with a
        ``group`` id, or when the home already is shared); with ``group`` every directory
        of the home gets that group and mode. A root that exists already (made by
        systemd's StateDirectory= or by hand) and is open to others is tightened to 0700
        unless shared. Lock files are 0600 (0640 shared)."""
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        if group is not None:
            os.chown(self.root, -1, group)
            os.chmod(self.root, DIR_MODE_GROUP)
        elif created or (not self.shared() and self.root.stat().st_mode & 0o077
                         and self.root.stat().st_uid == os.geteuid()):
            os.chmod(self.root, DIR_MODE)  # also tightens a root made by someone else
        mode = self.expected_dir_mode()
        chain = [p for d in self.directories()
                 for p in reversed(d.relative_to(self.root).parents) if p != Path(".")]
        for d in dict.fromkeys([*(self.root / p for p in chain), *self.directories()]):
            if not d.exists():
                d.mkdir(exist_ok=True)
                os.chmod(d, mode)  # explicit: the umask does not decide
            elif group is not None:
                os.chmod(d, mode)
            if group is not None:
                os.chown(d, -1, group)
        file_mode = 0o640 if mode & stat.S_ISGID else 0o600
        for name in LOCK_NAMES:
            fd = os.open(self.lock_path(name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                         file_mode)
            try:
                if group is not None:
                    os.fchown(fd, -1, group)
                    os.fchmod(fd, file_mode)
            finally:
                os.close(fd)

    def umask(self) -> int:
        """The umask harness processes of this home run with: 077, or 027 when shared."""
        return 0o027 if self.shared() else 0o077

    def require(self) -> Home:
        """Return self if initialised, else raise :class:`NotInitialized` naming the path."""
        if not self.system_config.is_file():
            raise NotInitialized(
                f"{self.root} is not an initialised harness home "
                f"(missing {self.system_config}); run `harness init --home {self.root}`"
            )
        return self
