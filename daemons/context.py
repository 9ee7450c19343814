"""What every CLI command receives: the resolved home and the output mode."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from coordination.errors import UsageError
from coordination.ids import check_id
from coordination.paths import Home


@dataclass
class CliContext:
    home: Home

    def queue(self) -> Any:
        """The home's queue (QueueBackend), chosen by system.json ``queue_backend``."""
        from coordination.queue import open_queue

        return open_queue(self.home)


def ingest_if_free(queue: Any) -> tuple[int, int]:
    """Admit the inbox's requests (create-task.sh's) now if the queue is free, never waiting
    for it: returns ``(ingested, still pending)``.

    Read commands (``task list``, ``status``) call it so a request published without
    Python shows up at once (``QueueBackend.ingest(timeout=0)``); when another process
    holds the queue, nothing is ingested and the requests stay pending (the holder, or the
    supervisor's next pass, admits them)."""
    from coordination.errors import TemporaryFailure

    if not int(queue.stats()["inbox_pending"]):
        return 0, 0
    try:
        ingested = int(queue.ingest(timeout=0))
    except TemporaryFailure:  # busy (LockTimeout), or the history lock: a read still reads
        ingested = 0
    return ingested, int(queue.stats()["inbox_pending"])


pass_ctx = click.make_pass_decorator(CliContext)


def json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print machine-readable JSON instead of text.")(func)


def print_json(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def home_option(func: Any) -> Any:
    """A subcommand's own ``--home`` (systemd units pass the home there)."""
    return click.option("--home", "home_dir", type=click.Path(file_okay=False, path_type=Path),
                        default=None,
                        help="Harness home (overrides the global --home).")(func)


def resolve_home(home_dir: Path | None) -> Home:
    """The subcommand's ``--home`` if given, else the group's resolved home (no checks)."""
    if home_dir is not None:
        return Home.at(home_dir)
    obj = click.get_current_context().find_object(CliContext)
    return obj.home if obj is not None else Home.at(None)


def add_commands(group: click.Group, commands: tuple[click.Command, ...]) -> None:
    """Add ``commands`` to ``group``; a subgroup whose name the group already has is merged
    into the existing one (so two modules may each contribute subcommands)."""
    for command in commands:
        existing = group.commands.get(command.name or "")
        if isinstance(existing, click.Group) and isinstance(command, click.Group):
            for name, sub in command.commands.items():
                existing.add_command(sub, name)
        else:
            group.add_command(command)


if TYPE_CHECKING:  # click >= 8.2 types ParamType by its value type(s); older ones do not
    _ParamType = click.ParamType[str, Any]
else:
    _ParamType = click.ParamType


class IdParam(_ParamType):
    """A task id, worker id or worker type name, checked against the id grammar
    (coordination/ids.py) before any command builds a path from it: exit 2 otherwise."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = kind

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        try:
            return check_id(value, self.kind, where=param.get_error_hint(ctx) if param and ctx
                            else None)
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


TASK_ID = IdParam("task id")
WORKER_ID = IdParam("worker id")
WORKER_TYPE = IdParam("worker type")
