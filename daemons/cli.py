"""``harness``: the click CLI and composition root of the daemons.

Exit codes: 0 ok, 1 error, 2 usage or bad input, 75 temporary failure (busy lock,
backpressure). Every read command takes ``--json``.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from coordination import clock
from coordination.config import init_home
from coordination.errors import EXIT_USAGE, HarnessError, NotFound, UsageError
from coordination.events import SEVERITIES, emit
from coordination.paths import Home
from coordination.redact import printable, redact, redact_record
from coordination.store import read_appended, tail_jsonl
from coordination.tasks import PRIORITIES, STATUSES

from .context import TASK_ID, WORKER_ID, WORKER_TYPE, CliContext, json_option, pass_ctx, print_json

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


#: Commands defined beside their daemons, by the module whose ``register(group)`` adds them.
#: They are imported on first use, so `harness task add` or `harness status` does not pay
#: for importing every daemon (about a quarter of a cold start).
LAZY_COMMANDS: dict[str, str] = {
    **dict.fromkeys(("worker", "drain", "pause", "resume", "systemd"),
                    "daemons.worker_commands"),
    **dict.fromkeys(("supervisor", "up", "demo"), "daemons.supervisor_commands"),
    "janitor": "daemons.janitor_commands",
    "db": "daemons.db_commands",
    **dict.fromkeys(("metrics", "status", "check", "dashboard", "timeline", "report"),
                    "daemons.observability_commands"),
    "bench": "daemons.bench",
    "load-test": "daemons.loadtest",
    "web": "daemons.web_commands",
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


# ---------------------------------------------------------------------------- init
def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    import grp

    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except (KeyError, ValueError, OverflowError):
        raise UsageError(f"--group: no such group {name!r}") from None


@cli.command()
@click.option("--force", is_flag=True, help="Rewrite config files that already exist.")
@click.option("--group", "group", help="Share the home read-only with this operator group "
              "(name or id): folders 2750, files 0640. Default: private (0700, 0600).")
@click.option("--backend", type=click.Choice(["file", "postgres"]), default=None,
              help="The queue backend to write into system.json (queue_backend). Default: "
              "keep the home's, file for a new home. postgres also creates the schema.")
@click.option("--database-url", default=None,
              help="With --backend postgres: the PostgreSQL URL or conninfo, written to "
              "system.json database_url (default: $HARNESS_DATABASE_URL at run time). Keep "
              "the password in ~/.pgpass rather than here.")
@json_option
@pass_ctx
def init(obj: CliContext, force: bool, group: str | None, backend: str | None,
         database_url: str | None, as_json: bool) -> None:
    """Create the home: directories, lock files, commented default config, an empty
    coordination/dashboard-events.jsonl and (through the queue) task-queue.json.

    Idempotent: existing config files are kept unless --force (a worker-types.json with
    the legacy top-level key `types` is rewritten with it renamed `worker_types`); the
    events file and the queue are never overwritten. The home is 0700 and its files 0600
    whatever the umask (with --group: 2750 and 0640, group-readable).

    \b
    Several hosts (docs/multi-host.md):
      harness --home H init --backend postgres --database-url postgresql://app@db/harness
    writes queue_backend and database_url and applies the schema migrations (as
    `harness db migrate`); exit 75 when the server cannot be reached.
    """
    from coordination.events import create_events_file

    home = obj.home
    gid = _group_id(group)
    if gid is not None:
        os.umask(0o027)
    overrides = _backend_overrides(backend, database_url)
    written = init_home(home, force=force, group=gid, **overrides)
    if overrides and home.system_config.exists():
        _require_backend(home, overrides)
    if backend == "postgres":
        from coordination.queue.postgres.connect import database_url as url_of
        from coordination.queue.postgres.schema import migrate

        migrate(url_of(home))
    if create_events_file(home):
        written.append(str(home.events_file))
    # The queue backend publishes its own (empty) state: init never writes its file.
    if obj.queue().ensure_published():
        written.append(str(home.queue_file))
    if as_json:
        print_json({"home": str(home.root), "written": written})
    else:
        click.echo(f"home {home.root} ready" + (f"; wrote {', '.join(written)}" if written
                                                 else " (config kept)"))


def _backend_overrides(backend: str | None, url: str | None) -> dict[str, Any]:
    """The system.json keys ``init --backend`` writes ({} without --backend)."""
    if url is not None and backend != "postgres":
        raise UsageError("--database-url needs --backend postgres")
    if backend is None:
        return {}
    if backend == "file":
        return {"queue_backend": "file"}
    return {"queue_backend": "postgres", "database_url": url}


def _require_backend(home: Home, wanted: dict[str, Any]) -> None:
    """An existing system.json (kept without --force) must say what --backend asked for."""
    from coordination.config import load_system

    have = load_system(home).values
    for key, value in wanted.items():
        if key == "database_url" and value is None:
            continue
        if have.get(key) != value:
            from coordination.redact import redact_url

            raise UsageError(f"{home.system_config} exists with {key} "
                             f"{redact_url(str(have.get(key)))!r}, not "
                             f"{redact_url(str(value))!r}: "
                             "pass --force to rewrite it")


# ---------------------------------------------------------------------------- task
@cli.group()
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

    from .context import ingest_if_free

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


# ---------------------------------------------------------------------------- queue
@cli.group()
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


# ---------------------------------------------------------------------------- dlq
@cli.group()
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


# ---------------------------------------------------------------------------- events
@cli.group()
def events() -> None:
    """Emit and read dashboard events (coordination/dashboard-events.jsonl)."""


@events.command("emit")
@click.option("--type", "event_type", required=True, help="Event type, e.g. deploy_started.")
@click.option("--severity", type=click.Choice(SEVERITIES), default="info", show_default=True)
@click.option("--message", default="")
@click.option("--source", default="cli", show_default=True)
@click.option("--task", "task_id", type=TASK_ID)
@click.option("--worker", "worker_id", type=WORKER_ID)
@click.option("--correlation", "correlation_id")
@click.option("--data", "data_json", help="A JSON object.")
@json_option
@pass_ctx
def events_emit(obj: CliContext, event_type: str, severity: str, message: str, source: str,
                task_id: str | None, worker_id: str | None, correlation_id: str | None,
                data_json: str | None, as_json: bool) -> None:
    """Append one event in the standard envelope; prints its event_id."""
    obj.home.require()
    data = None
    if data_json is not None:
        try:
            data = orjson.loads(data_json)
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"--data: invalid JSON: {exc.msg}") from None
    event = emit(obj.home, event_type, severity=severity, message=message, source=source,
                 task_id=task_id, worker_id=worker_id, correlation_id=correlation_id,
                 data=data)
    if as_json:
        print_json(event)
    else:
        click.echo(event["event_id"])


def _event_matches(e: dict[str, Any], types: tuple[str, ...], min_severity: str | None,
                   task_id: str | None, worker_id: str | None, correlation: str | None,
                   since: str | None) -> bool:
    if types and e.get("type") not in types:
        return False
    if min_severity and SEVERITIES.index(e.get("severity", "info")) < \
            SEVERITIES.index(min_severity):
        return False
    if task_id and e.get("task_id") != task_id:
        return False
    if worker_id and e.get("worker_id") != worker_id:
        return False
    if correlation and e.get("correlation_id") != correlation:
        return False
    return not (since and (e.get("timestamp") or "") < since)


def _format_event(e: dict[str, Any]) -> str:
    """One event as a line of text: control characters escaped (a message can never
    drive the terminal), secrets masked (lines written by older versions or by hand)."""
    ids = " ".join(f"{k}={e[k]}" for k in ("task_id", "worker_id") if e.get(k))
    return printable(f"{e.get('timestamp')} {e.get('severity', '?'):<8} {e.get('type')}"
                     f"  {redact(e.get('message', ''))}  {ids}").rstrip()


@events.command("tail")
@click.option("-n", "--lines", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events (Ctrl-C stops).")
@click.option("--type", "types", multiple=True, help="Only these types (repeatable).")
@click.option("--severity", type=click.Choice(SEVERITIES), help="At least this severity.")
@click.option("--task", "task_id", type=TASK_ID)
@click.option("--worker", "worker_id", type=WORKER_ID)
@click.option("--correlation")
@click.option("--since", help="Timestamp, or -SECONDS for 'that long ago'.")
@json_option
@pass_ctx
def events_tail(obj: CliContext, lines: int, follow: bool, types: tuple[str, ...],
                severity: str | None, task_id: str | None, worker_id: str | None,
                correlation: str | None, since: str | None, as_json: bool) -> None:
    """Print the last events (newest last), optionally filtered and followed."""
    home = obj.home.require()
    if since and since.startswith("-"):
        since = clock.iso(clock.now() - float(since[1:].rstrip("s")))

    def keep(e: dict[str, Any]) -> bool:
        return _event_matches(e, types, severity, task_id, worker_id, correlation, since)

    filtered = any((types, severity, task_id, worker_id, correlation, since))
    path = home.events_file
    # A follower notes where the file ends *before* reading the window, and then prints
    # from there: a line appended in between is printed once, not lost or doubled.
    st = path.stat() if follow and path.exists() else None
    position, inode = (st.st_size, st.st_ino) if st else (0, None)
    # Filtering reads further back; the file is read backwards, not loaded whole.
    bad: list[int] = []  # torn or garbage lines skipped: reported on stderr
    window = tail_jsonl(path, lines * 50 if filtered else lines,
                        end=position if st is not None else None, bad=bad)
    shown = [e for e in window if keep(e)][-lines:]
    # JSON escapes control characters by itself; both forms are redacted on display.
    emit_line = (lambda e: sys.stdout.write(orjson.dumps(redact(e)).decode() + "\n")) \
        if as_json else (lambda e: click.echo(_format_event(e)))

    def report_bad() -> None:
        if bad:
            click.echo(f"harness: skipped {len(bad)} torn or unparseable line(s) of {path} "
                       "(see `harness doctor`)", err=True)
            bad.clear()

    if as_json and not follow:
        print_json([redact(e) for e in shown])
        report_bad()
        return
    for e in shown:
        emit_line(e)
    report_bad()
    if not follow:
        return
    sys.stdout.flush()
    last_id: str | None = window[-1].get("event_id") if window else None
    skip_to: str | None = None  # after a rotation: the kept lines were printed already
    from .wakeup import stop_signals, watch_changes

    # Woken by inotify on coordination/ (appends included) and by Ctrl-C/SIGTERM; the
    # 30 s timeout is only a safety net for a filesystem without inotify.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with stop_signals(wake_w) as stopped, \
                watch_changes(str(home.coordination), wake_w) as watching:
            while not stopped:
                st = path.stat() if path.exists() else None
                size = st.st_size if st else 0
                if st is not None and (st.st_ino != inode or size < position):
                    # Rotated by the janitor: the new file starts with the newest lines of
                    # the old one (events_keep_lines); resume after the last event read.
                    inode, position, skip_to = st.st_ino, 0, last_id
                if size > position:
                    parsed, position = read_appended(path, position, size, bad)
                    report_bad()
                    if skip_to is not None:
                        ids = [e.get("event_id") for e in parsed]
                        if skip_to in ids:
                            parsed = parsed[ids.index(skip_to) + 1:]
                        skip_to = None
                    for e in parsed:
                        last_id = e.get("event_id") or last_id
                        if keep(e):
                            emit_line(e)
                    sys.stdout.flush()
                select.select([wake_r], [], [], 30.0 if watching else 0.5)
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 4096):
                        pass
    except KeyboardInterrupt:  # before the handlers were installed
        return
    finally:
        os.close(wake_r)
        os.close(wake_w)


# ---------------------------------------------------------------------------- doctor
@cli.command()
@click.option("--repair", is_flag=True, help="Fix what can be fixed safely (quarantine "
              "corrupt files, restore the last good queue, reclaim orphans, re-ingest inbox).")
@json_option
@pass_ctx
def doctor(obj: CliContext, repair: bool, as_json: bool) -> None:
    """Check every invariant of the home (an fsck). Exit 0 when no errors remain, 1 else.

    Warnings are states a crash legitimately leaves (the supervisor or --repair clears
    them); errors are broken invariants.
    """
    from coordination.doctor import check

    report = check(obj.home, repair=repair)
    if as_json:
        print_json(report.as_dict())
    else:
        for f in report.findings:
            mark = " (repaired)" if f.repaired else ""
            click.echo(f"{f.level:<7} {f.code}: {f.message}{mark}")
        verdict = "clean" if report.clean else ("ok (warnings)" if report.ok else "ERRORS")
        click.echo(f"doctor: {verdict}: {len(report.open('error'))} error(s), "
                   f"{len(report.open('warning'))} warning(s)")
    if not report.ok:
        sys.exit(1)


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
    try:
        check_arguments(sys.argv[1:])
        cli(standalone_mode=True)
    except HarnessError as exc:  # raised outside a command (e.g. while parsing)
        click.echo(f"harness: {exc}", err=True)
        sys.exit(exc.exit_code)


__all__ = ["EXIT_USAGE", "STATUSES", "cli", "main"]
