"""``harness events ...``: emit an event, and print (``tail``) or follow (``tail -f``) the
events file. Registered on the CLI by :func:`register` (see daemons/cli.py)."""

from __future__ import annotations

import contextlib
import os
import select
import sys
from typing import Any

import click
import orjson

from coordination import clock
from coordination.errors import UsageError
from coordination.events import SEVERITIES, emit
from coordination.jsonl import read_appended, tail_jsonl
from coordination.redact import printable, redact

from ..context import TASK_ID, WORKER_ID, CliContext, json_option, pass_ctx, print_json


@click.group()
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
    from ..wakeup import stop_signals, watch_changes

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


def register(group: click.Group) -> None:
    group.add_command(events)
