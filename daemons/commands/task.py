"""``harness task ...``: add, list, show, cancel, retry and reprioritize tasks, through
the queue port. Registered on the CLI by :func:`register` (see daemons/cli.py)."""

from __future__ import annotations

import sys
from typing import Any

import click
import orjson

from coordination import clock
from coordination.errors import NotFound, UsageError
from coordination.redact import printable, redact_record
from coordination.tasks import PRIORITIES

from ..context import TASK_ID, WORKER_TYPE, CliContext, json_option, pass_ctx, print_json


@click.group()
def task() -> None:
    """Add, inspect, cancel and retry tasks."""


def _parse_ts_option(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    if value.startswith("+"):
        try:
            return clock.iso(clock.now() + float(value[1:].rstrip("s")))
        except ValueError:
            raise UsageError(f"{name}: {value!r} is not +SECONDS") from None
    try:
        clock.parse_iso(value)
    except ValueError:
        raise UsageError(f"{name}: {value!r} is not YYYY-MM-DDTHH:MM:SS.mmmZ or +SECONDS") \
            from None
    return value


def _read_batch(source: str) -> list[dict[str, Any]]:
    stream = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115
    requests = []
    try:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise UsageError(f"{source}: line {number}: invalid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{source}: line {number}: a task request must be an object")
            requests.append(obj)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    return requests


@task.command("add", context_settings={"ignore_unknown_options": False})
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("-d", "--description", default="", help="What the task is for.")
@click.option("-p", "--priority", type=click.Choice(PRIORITIES), default="medium",
              show_default=True)
@click.option("-t", "--type", "worker_type", default="default", show_default=True,
              type=WORKER_TYPE, help="Worker type (coordination/config/worker-types.json).")
@click.option("--max-attempts", type=click.IntRange(1, 1000), help="Default: system.json.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.001), help="Seconds.")
@click.option("--depends-on", multiple=True, type=TASK_ID, help="Task id that must complete first "
              "(repeatable).")
@click.option("--dedup-key", help="If a live task holds this key, return it instead.")
@click.option("--not-before", help="Earliest start: a timestamp or +SECONDS.")
@click.option("--correlation-id", help="Groups related tasks and events.")
@click.option("--budget", type=click.IntRange(min=0), help="Token budget for the task.")
@click.option("--from-file", "from_file", help="Enqueue a JSONL batch of task requests "
              "('-' for stdin) in one commit.")
@click.option("--force", is_flag=True, help="Enqueue even under backpressure.")
@json_option
@pass_ctx
def task_add(obj: CliContext, command: tuple[str, ...], description: str, priority: str,
             worker_type: str, max_attempts: int | None, timeout_s: float | None,
             depends_on: tuple[str, ...], dedup_key: str | None, not_before: str | None,
             correlation_id: str | None, budget: int | None, from_file: str | None,
             force: bool, as_json: bool) -> None:
    """Enqueue a task; the argv follows `--`. Prints the task id (or the task with --json).

    \b
    Returns once the task is committed (durable, and visible to every other
    process); coordination/task-queue.json shows it before this command exits.
    Exit status:
      0   enqueued (or deduplicated onto the live task holding --dedup-key);
          the id is printed
      1   error (e.g. a corrupt queue file, disk full)
      2   bad input (nothing is queued) or an uninitialised home
      75  retry later, and it means one of:
          - backpressure: the task would make more than max_queue_depth tasks
            queued (--force skips the check); checked before anything is
            written, so nothing is queued;
          - the queue lock stayed busy for lock_timeout_s; nothing was
            written, so a retry is safe.
    Examples:
      harness task add --priority high -- ./run-agent.sh --repo foo
      harness task add --type shell -d 'make test'
      harness task add --from-file tasks.jsonl
    """
    queue = obj.queue()
    if from_file:
        if command:
            raise UsageError("--from-file and a command after -- are mutually exclusive")
        results = queue.enqueue_batch(_read_batch(from_file), force=force)
        if as_json:
            print_json([dict(r.task, created=r.created) for r in results])
        else:
            for r in results:
                click.echo(r.task["task_id"])
        return
    request: dict[str, Any] = {
        "description": description, "priority": priority, "worker_type": worker_type,
        "command": list(command) or None, "max_attempts": max_attempts,
        "timeout_s": timeout_s, "depends_on": list(depends_on), "dedup_key": dedup_key,
        "not_before": _parse_ts_option(not_before, "--not-before"),
        "correlation_id": correlation_id, "budget": budget,
    }
    result = queue.enqueue({k: v for k, v in request.items() if v not in (None, [])},
                           force=force)
    if as_json:
        print_json(dict(result.task, created=result.created))
    else:
        click.echo(result.task["task_id"])
        if not result.created:
            click.echo(f"deduplicated: dedup_key {dedup_key} is held by this live task",
                       err=True)


_TASK_COLUMNS = "{:<34}  {:<9} {:<8} {:<8} {:<24} {}"
TASK_LIST_HEADER = _TASK_COLUMNS.format("TASK_ID", "STATUS", "PRIORITY", "ATTEMPTS",
                                        "WORKER", "DESCRIPTION")


def _task_line(t: dict[str, Any]) -> str:
    argv = " ".join(t.get("command") or [])
    return _TASK_COLUMNS.format(t["task_id"], t["status"], t["priority"],
                                f"{t['attempts']}/{t['max_attempts']}",
                                t.get("worker_id") or "-",
                                printable((t.get("description") or argv)[:60])).rstrip()


@task.command("list")
@click.option("--status", type=click.Choice(("queued", "running")), help="Only this status.")
@click.option("--priority", type=click.Choice(PRIORITIES))
@click.option("--limit", type=click.IntRange(min=1), help="At most this many.")
@json_option
@pass_ctx
def task_list(obj: CliContext, status: str | None, priority: str | None, limit: int | None,
              as_json: bool) -> None:
    """List live tasks (queued and running), highest priority first, then oldest.

    Requests that create-task.sh left in the inbox are admitted first when the queue lock
    is free (so they are listed); when it is busy, how many wait is said on stderr.
    """
    from coordination.tasks import PRIORITY_RANK

    from ..context import ingest_if_free

    queue = obj.queue()
    _, pending = ingest_if_free(queue)
    tasks = [t for t in queue.live_tasks()
             if (status is None or t["status"] == status)
             and (priority is None or t["priority"] == priority)]
    tasks.sort(key=lambda t: (PRIORITY_RANK[t["priority"]], t["created_at"], t["task_id"]))
    # Shown redacted (the queue keeps the exact text, which a retry needs).
    tasks = [redact_record(t) for t in (tasks[:limit] if limit else tasks)]
    if pending:
        click.echo(f"{pending} request(s) pending in coordination/inbox/ (the queue lock is "
                   "busy; they are admitted by its holder or `harness queue ingest`)",
                   err=True)
    if as_json:
        print_json(tasks)
        return
    if tasks:
        click.echo(TASK_LIST_HEADER)
    for t in tasks:
        click.echo(_task_line(t))
    if not tasks:
        click.echo("no live tasks", err=True)


@task.command("show")
@click.argument("task_id", type=TASK_ID)
@click.option("--history", "with_history", is_flag=True, help="Include every history record.")
@click.option("--archives", is_flag=True,
              help="Also search the janitor's archives (task-history.N.jsonl.gz): finds "
                   "tasks whose records were rotated away; reads every archive.")
@json_option
@pass_ctx
def task_show(obj: CliContext, task_id: str, with_history: bool, archives: bool,
              as_json: bool) -> None:
    """Show one task: live, else its dead letter, else its final history record (with
    --archives, also from the rotated archives). Exit 1 when it is found nowhere."""
    queue = obj.queue()
    found = queue.get(task_id)
    records = queue.history_of(task_id, archives=True) if archives else None
    if found is None and records:
        found = next((r for r in reversed(records) if r.get("final")), records[-1])
    if found is None:
        hint = "" if archives else "; --archives also searches the rotated history"
        raise NotFound(f"no task {task_id} (not live, not in history, not a dead "
                       f"letter{hint})")
    out: dict[str, Any] = dict(found)
    if with_history:
        out["history"] = records if records is not None else queue.history_of(task_id)
    out = redact_record(out)  # also masks what older versions wrote in clear
    if as_json:
        print_json(out)
        return
    for key, value in out.items():
        if key != "history":
            click.echo(printable(f"{key:>16}: {orjson.dumps(value).decode()}"))
    for record in out.get("history", []):
        click.echo(f"  history: {record.get('recorded_at')} {record.get('outcome')} "
                   f"attempt {record.get('attempts')} "
                   f"{printable(str(record.get('last_error') or ''))}")


@task.command("cancel")
@click.argument("task_ids", nargs=-1, required=True, type=TASK_ID)
@click.option("--reason", default="cancelled by operator", show_default=True)
@json_option
@pass_ctx
def task_cancel(obj: CliContext, task_ids: tuple[str, ...], reason: str, as_json: bool) -> None:
    """Cancel tasks: queued ones at once, running ones via their worker (cancel_requested)."""
    queue = obj.queue()
    out = [queue.cancel(t, reason=reason) for t in task_ids]
    if as_json:
        print_json(out)
        return
    for t in out:
        state = "cancelled" if t["status"] == "cancelled" else "cancel requested (running)"
        click.echo(f"{t['task_id']}: {state}")


@task.command("retry")
@click.argument("task_ids", nargs=-1, required=True, type=TASK_ID)
@json_option
@pass_ctx
def task_retry(obj: CliContext, task_ids: tuple[str, ...], as_json: bool) -> None:
    """Queue failed tasks again from the dead letters (attempts reset)."""
    queue = obj.queue()
    out = [queue.requeue_dead(t) for t in task_ids]
    if as_json:
        print_json(out)
    else:
        for t in out:
            click.echo(f"{t['task_id']}: queued")


@task.command("set-priority")
@click.argument("task_id", type=TASK_ID)
@click.argument("priority", type=click.Choice(PRIORITIES))
@json_option
@pass_ctx
def task_set_priority(obj: CliContext, task_id: str, priority: str, as_json: bool) -> None:
    """Reprioritise a live task."""
    t = obj.queue().reprioritize(task_id, priority)
    if as_json:
        print_json(t)
    else:
        click.echo(f"{t['task_id']}: {t['priority']}")


def register(group: click.Group) -> None:
    group.add_command(task)
