"""``harness``: the click CLI and composition root of the daemons.

This module only builds the ``harness`` group: the home option, the umask, the mapping of
:class:`HarnessError` to exit codes, and the table of where each command lives
(:data:`LAZY_COMMANDS`). Every command is defined in a ``*_commands`` module (or beside
its daemon) and added by that module's ``register(group)`` on first use.

Exit codes: 0 ok, 1 error, 2 usage or bad input, 75 temporary failure (busy lock,
backpressure). Every read command takes ``--json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from coordination.errors import EXIT_USAGE, HarnessError, UsageError
from coordination.paths import Home
from coordination.tasks import STATUSES

from .context import CliContext

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


#: Commands defined beside their daemons, by the module whose ``register(group)`` adds them.
#: They are imported on first use, so `harness task add` or `harness status` does not pay
#: for importing every daemon (about a quarter of a cold start).
LAZY_COMMANDS: dict[str, str] = {
    **dict.fromkeys(("worker", "drain", "pause", "resume", "systemd"),
                    "daemons.worker.commands"),
    **dict.fromkeys(("supervisor", "up", "demo"), "daemons.supervisor.commands"),
    "init": "daemons.commands.init",
    "task": "daemons.commands.task",
    **dict.fromkeys(("queue", "dlq"), "daemons.commands.queue"),
    "events": "daemons.commands.events",
    "doctor": "daemons.commands.doctor",
    "janitor": "daemons.janitor.commands",
    "db": "daemons.commands.db",
    **dict.fromkeys(("metrics", "status", "check", "dashboard", "timeline", "report"),
                    "daemons.reporting.commands"),
    "bench": "daemons.devtools.bench",
    "load-test": "daemons.devtools.loadtest",
    "web": "daemons.web.commands",
}


class HarnessGroup(click.Group):
    """Maps :class:`HarnessError` to its exit code with a one-line message on stderr, and
    loads the commands of :data:`LAZY_COMMANDS` when they are first looked up."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in LAZY_COMMANDS:
            import importlib

            importlib.import_module(LAZY_COMMANDS[cmd_name]).register(self)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(LAZY_COMMANDS))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HarnessError as exc:
            click.echo(f"harness: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:  # `harness ... | head` is fine
            sys.stderr.close()
            ctx.exit(0)


@click.group(cls=HarnessGroup, context_settings=CONTEXT_SETTINGS)
@click.option("--home", "home_dir", type=click.Path(file_okay=False, path_type=Path),
              envvar=None, help="Harness home. Default: $HARNESS_HOME, else systemd's "
              "$STATE_DIRECTORY, else $XDG_STATE_HOME/harness.")
@click.version_option(package_name="harness")
@click.pass_context
def cli(ctx: click.Context, home_dir: Path | None) -> None:
    """File-based coordination of worker fleets under systemd.

    \b
    Exit codes: 0 ok, 1 error, 2 usage or bad input, 75 temporary failure
    (a busy lock or backpressure: retry later).
    The file contract is docs/coordination.md; operations are in docs/runbook.md.
    """
    ctx.obj = CliContext(Home.at(home_dir))
    # Whatever the caller's umask, what harness creates is private (0700 folders, 0600
    # files), or readable by the operator group of a shared home (2750, 0640). The store
    # also sets each file's mode explicitly; this covers every other file (archives,
    # worker logs, a task's results/<task_id>/, which tasks inherit).
    os.umask(ctx.obj.home.umask())


def check_arguments(argv: list[str]) -> None:
    """Refuse arguments that are not valid UTF-8 (Python hands them over with lone
    surrogates, which no file of the contract can hold) with a UsageError naming each."""
    for number, arg in enumerate(argv, start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            raise UsageError(f"argument {number} ({shown!r}) is not valid UTF-8") from None


def main() -> None:
    """Console entry point; click usage errors exit 2."""
    from .diagnostics import setup_logging

    setup_logging()
    try:
        check_arguments(sys.argv[1:])
        cli(standalone_mode=True)
    except HarnessError as exc:  # raised outside a command (e.g. while parsing)
        click.echo(f"harness: {exc}", err=True)
        sys.exit(exc.exit_code)


__all__ = ["EXIT_USAGE", "STATUSES", "cli", "main"]
