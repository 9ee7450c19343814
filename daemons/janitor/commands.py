"""``harness janitor ...``: registered on the CLI by :func:`register` (see daemons/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from coordination import clock
from coordination.config import daemon_run

from ..context import CliContext, home_option, json_option, pass_ctx, print_json, resolve_home
from .run import JanitorFailed, format_summary, run_janitor


@click.group()
def janitor() -> None:
    """Rotate the coordination JSONL logs and prune finished tasks' files (docs/janitor.md)."""


def _show(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(summary)
    else:
        for line in format_summary(summary):
            click.echo(line)


@janitor.command("run")
@click.option("--dry-run", is_flag=True,
              help="Report what a run would do; change nothing and emit no event.")
@home_option
@json_option
@pass_ctx
def janitor_run(obj: CliContext, dry_run: bool, home_dir: Path | None, as_json: bool) -> None:
    """One janitor run: recover an interrupted rotation, prune past retention (and the
    spare result folders of workers gone), rotate dashboard-events.jsonl and
    metrics-snapshots.jsonl when over their limits, apply the queue's history retention
    (through the queue port), repair torn last lines; then emit one janitor_run event.

    \b
    Exit 0 when every step succeeded; 1 when one failed (e.g. disk full: every file is
    intact, and whatever could be freed was); 75 when a lock stayed busy (another janitor
    run, or a writer holding a file's lock for longer than lock_timeout_s).
    The systemd timer harness-janitor.timer runs this hourly.
    """
    home = resolve_home(home_dir).require()
    try:
        with daemon_run(home, "janitor"):  # an invalid config: the last good values
            summary = run_janitor(home, clock.now(), dry_run=dry_run)
    except JanitorFailed as exc:
        _show(exc.summary, as_json)
        raise
    _show(summary, as_json)


@janitor.command("bench")
@click.option("--size-mb", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Size of the generated events file.")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Where to create the scratch home (default: a new temp directory). "
                   "Needs about 1.2x the size free.")
def janitor_bench(size_mb: int, workdir: str | None) -> None:
    """Measure one rotation of a big events file in a scratch home: wall time, peak RSS
    of the rotating process, lock hold time. Prints JSON; the scratch home is deleted."""
    from ..devtools.janitor_bench import bench_rotation

    print_json(bench_rotation(size_mb * 1024 * 1024, workdir=workdir))


def register(cli: click.Group) -> None:
    cli.add_command(janitor)
