"""``harness queue ...`` (stats, sync, ingest) and ``harness dlq ...`` (the dead letters:
list, requeue, purge), through the queue port. Registered on the CLI by :func:`register`
(see daemons/cli.py)."""

from __future__ import annotations

import click

from coordination.errors import UsageError
from coordination.redact import printable, redact_record

from ..context import TASK_ID, CliContext, json_option, pass_ctx, print_json


@click.group()
def queue() -> None:
    """Queue-wide operations."""


@queue.command("stats")
@json_option
@pass_ctx
def queue_stats(obj: CliContext, as_json: bool) -> None:
    """Counts by status and priority, oldest queued age, inbox and dead letters."""
    stats = obj.queue().stats()
    if as_json:
        print_json(stats)
        return
    s = stats["by_status"]
    click.echo(f"live {stats['live']}: queued {s['queued']}, running {s['running']}; "
               f"inbox {stats['inbox_pending']}; dead letters {stats['dead_letters']}")
    for p, counts in stats["by_priority"].items():
        click.echo(f"  {p:<8} queued {counts['queued']:>6}  running {counts['running']:>4}")
    if stats["oldest_queued_age_s"] is not None:
        click.echo(f"oldest queued: {stats['oldest_queued_at']} "
                   f"({stats['oldest_queued_age_s']:.1f}s ago)")


@queue.command("sync")
@click.option("--durable", is_flag=True,
              help="Also fsync it and start a new journal from it (a compaction).")
@json_option
@pass_ctx
def queue_sync(obj: CliContext, durable: bool, as_json: bool) -> None:
    """Publish coordination/task-queue.json for the newest revision now.

    The file follows the queue within 1 s on its own; run this before editing it by
    hand (jq and mv under `flock coordination/locks/queue.lock`) so the edit starts
    from the newest revision.
    """
    queue = obj.queue()
    if durable:
        queue.sync(durable=True)
    else:
        queue.sync()
    revision = queue.stats()["revision"]
    if as_json:
        print_json({"revision": revision, "durable": durable})
    else:
        click.echo(f"task-queue.json shows revision {revision}")


@queue.command("ingest")
@json_option
@pass_ctx
def queue_ingest(obj: CliContext, as_json: bool) -> None:
    """Drain the inbox now (create-task.sh leaves tasks there for the next queue holder)."""
    count = obj.queue().ingest()
    if as_json:
        print_json({"ingested": count})
    else:
        click.echo(f"ingested {count} task(s)")


@click.group()
def dlq() -> None:
    """Dead letters: tasks that failed after max_attempts."""


@dlq.command("list")
@json_option
@pass_ctx
def dlq_list(obj: CliContext, as_json: bool) -> None:
    """List dead letters, oldest first."""
    letters = [redact_record(t) for t in obj.queue().dead_letters()]
    if as_json:
        print_json(letters)
        return
    for t in letters:
        click.echo(f"{t['task_id']}  {t.get('completed_at')}  attempts {t['attempts']}  "
                   f"{printable((t.get('last_error') or '')[:70])}")
    if not letters:
        click.echo("no dead letters", err=True)


@dlq.command("requeue")
@click.argument("task_ids", nargs=-1, type=TASK_ID)
@click.option("--all", "requeue_all", is_flag=True, help="Requeue every dead letter.")
@json_option
@pass_ctx
def dlq_requeue(obj: CliContext, task_ids: tuple[str, ...], requeue_all: bool,
                as_json: bool) -> None:
    """Put dead letters back in the queue (attempts reset)."""
    queue = obj.queue()
    if requeue_all == bool(task_ids):
        raise UsageError("give task ids or --all (not both)")
    ids = [t["task_id"] for t in queue.dead_letters()] if requeue_all else list(task_ids)
    out = [queue.requeue_dead(t) for t in ids]
    if as_json:
        print_json(out)
    else:
        click.echo(f"requeued {len(out)} task(s)")


@dlq.command("purge")
@click.argument("task_ids", nargs=-1, type=TASK_ID)
@click.option("--all", "purge_all", is_flag=True, help="Delete every dead letter.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation with --all.")
@json_option
@pass_ctx
def dlq_purge(obj: CliContext, task_ids: tuple[str, ...], purge_all: bool, yes: bool,
              as_json: bool) -> None:
    """Delete dead letters (their final history records stay)."""
    if purge_all == bool(task_ids):
        raise UsageError("give task ids or --all (not both)")
    if purge_all and not yes and not click.confirm("Delete every dead letter?"):
        raise UsageError("not confirmed")
    removed = obj.queue().purge_dead(None if purge_all else list(task_ids))
    if as_json:
        print_json({"purged": removed})
    else:
        click.echo(f"purged {len(removed)} dead letter(s)")


def register(group: click.Group) -> None:
    group.add_command(queue)
    group.add_command(dlq)
