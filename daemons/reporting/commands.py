"""Observability commands: ``harness metrics``, ``status``, ``check``, ``dashboard``,
``timeline`` and ``report`` (docs/observability.md).

Registered by daemons/cli.py (``register(cli)``). Every command also accepts ``--home``
after its name (``harness metrics snapshot --home DIR``, as the systemd unit runs it).
Heavy modules (the queue, rich, the report) are imported inside the commands so that the
CLI's start-up cost stays small for every other command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from coordination.errors import EXIT_USAGE, ConfigError, HarnessError, UsageError
from coordination.redact import printable

from ..context import (
    TASK_ID,
    CliContext,
    home_option,
    json_option,
    pass_ctx,
    print_json,
    resolve_home,
)

#: Monitoring-plugin exit codes of ``harness check``.
CHECK_OK, CHECK_WARNING, CHECK_CRITICAL, CHECK_UNKNOWN = 0, 1, 2, 3




def format_age(seconds: Any) -> str:
    """A short age: 42s, 15m, 3.5h, 2.0d; "-" when unknown."""
    if not isinstance(seconds, int | float):
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.0%}"


def _secs(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.1f}s"


# ---------------------------------------------------------------------------- metrics
@click.group()
def metrics() -> None:
    """Metrics snapshots (coordination/metrics-snapshots.jsonl) and Prometheus output."""


@metrics.command("snapshot")
@home_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing.")
@json_option
@pass_ctx
def metrics_snapshot(obj: CliContext, home_dir: Path | None, quiet: bool,
                     as_json: bool) -> None:
    """Append one snapshot line (under locks/metrics.lock) and refresh the textfile.

    Run every minute by systemd/harness-metrics.timer (or etc/cron.d/harness).
    """
    from coordination.metrics import take_snapshot

    from .prometheus import publish_textfile

    home = resolve_home(home_dir)
    from coordination.config import daemon_run

    with daemon_run(home.require(), "metrics"):  # an invalid config: the last good values
        snap = take_snapshot(home)
        textfile = publish_textfile(home, snap)
    if as_json:
        print_json(snap)
    elif not quiet:
        q, w, tp = snap["queue"], snap["workers"], snap["throughput"]
        click.echo(f"{snap['timestamp']} health={snap['health']['state']} "
                   f"queued={q['queued']} running={q['running']} workers={w['active']} "
                   f"busy={w['busy']} stalled={w['stalled']} "
                   f"done/min={tp['completed_per_min_1m']:g} "
                   f"failed/min={tp['failed_per_min_1m']:g}"
                   + (f" textfile={textfile}" if textfile else ""))


@metrics.command("show")
@home_option
@click.option("--format", "fmt", type=click.Choice(("prometheus", "json")),
              default="prometheus", show_default=True)
@click.option("--textfile/--no-textfile", default=True, show_default=True,
              help="Also publish the exposition at metrics_textfile when it is configured.")
@json_option
@pass_ctx
def metrics_show(obj: CliContext, home_dir: Path | None, fmt: str, textfile: bool,
                 as_json: bool) -> None:
    """Print the current metrics (not appended): Prometheus text or the snapshot as JSON
    (--json is --format json).

    Counters continue from the last stored snapshot's cursor (cheap); without any
    snapshot they are counted over the whole live history file once.
    """
    from coordination.metrics import build_snapshot

    from .prometheus import publish_textfile, render

    home = resolve_home(home_dir)
    snap = build_snapshot(home)
    text = render(snap)
    if textfile:
        publish_textfile(home, snap)
    if as_json or fmt == "json":
        print_json(snap)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


# ---------------------------------------------------------------------------- status
def _queue_of(home: Any) -> Any:
    from coordination.queue import open_queue

    return open_queue(home)


def format_status(s: dict[str, Any]) -> list[str]:
    """The text form of ``harness status`` (one glance)."""
    h = s["health"]
    lines = [f"harness {s['home']}  {s['timestamp']}",
             f"health: {h['state'].upper()} ({h['source']})"
             + (f" - {'; '.join(h['reasons'])}" if h["reasons"] else "")]
    q = s["queue"]
    lines.append(
        f"queue: {q['queued']} queued, {q['running']} running, {q['dead_letters']} dead "
        f"letter(s), inbox {q['inbox_pending']}; oldest queued "
        f"{format_age(q['oldest_queued_age_s'])}"
        f"; backpressure {'ON' if s['backpressure'] else 'off'} (max {q['max_queue_depth']})")
    lines.append("  " + "  ".join(f"{p} {c['queued']}/{c['running']}"
                                  for p, c in q["by_priority"].items()) + "  (queued/running)")
    svc = s["service"]
    lines.append(f"supervisor: {svc['supervisor']}"
                 + (f" (health.json {format_age(svc['health_age_s'])} old)"
                    if svc["health_age_s"] is not None else " (no health.json)"))
    if not svc["served"]:
        lines.append(f"NOTHING SERVES THE QUEUE: {svc['waiting']} task(s) waiting, no live "
                     f"worker, supervisor {svc['supervisor']}. To start: {svc['hint']}")
    wc = s["worker_counts"]
    lines.append(f"workers: {wc['active']} active (busy {wc['busy']}, idle {wc['idle']}, "
                 f"draining {wc['draining']}), {wc['stalled']} stalled, "
                 f"{wc.get('dead', 0)} dead")
    for w in s["workers"]:
        if w.get("state") == "dead":
            flag = (f"  DEAD: {w.get('dead_reason')} (spec says {w.get('spec_state')}; "
                    "the supervisor reclaims its task)")
        elif w.get("stalled"):
            flag = f"  STALLED: {w['stall_reason']}"
        else:
            flag = ""
        lines.append(f"  {w['worker_id']:<40} {w['state']!s:<9} "
                     f"{w.get('current_task_id') or '-':<36} "
                     f"hb {format_age(w.get('heartbeat_age_s'))} ago{flag}")
    tp, d = s["throughput"], s["durations"]
    lines.append(f"throughput: {tp['completed_1m']} completed, {tp['failed_1m']} failed in the "
                 f"last minute; success {_pct(s['success_rate'])} over "
                 f"{tp['completed_window'] + tp['failed_window']} attempt(s); duration p50 "
                 f"{_secs(d['task_p50_s'])} p95 {_secs(d['task_p95_s'])}; wait p95 "
                 f"{_secs(d['wait_p95_s'])}")
    paused = s["paused_types"]
    lines.append("paused types: " + (", ".join(
        f"{t} (until {(i or {}).get('until') or 'resumed'}"
        f"{'; ' + str((i or {}).get('reason')) if (i or {}).get('reason') else ''})"
        for t, i in paused.items()) if paused else "none"))
    if s["circuits"]:
        lines.append("circuits: " + ", ".join(
            f"{t} {(c or {}).get('state')} until {(c or {}).get('until')}"
            for t, c in s["circuits"].items()))
    lines.append("last alerts:" if s["alerts"] else "last alerts: none")
    for e in s["alerts"]:
        lines.append(f"  {e.get('timestamp')} {e.get('severity', ''):<8} {e.get('type')}  "
                     f"{(e.get('message') or '')[:120]}")
    return lines


@click.command()
@home_option
@click.option("--alerts", default=5, show_default=True, type=click.IntRange(0, 100),
              help="How many recent warning+ events to show.")
@json_option
@pass_ctx
def status(obj: CliContext, home_dir: Path | None, alerts: int, as_json: bool) -> None:
    """One-glance summary: health, queue, workers, backpressure, paused types, alerts.

    Fast on a large home: history and events are read backwards and bounded. Requests
    create-task.sh left in the inbox are admitted first when the queue lock is free (else
    they show as `inbox N`). When tasks wait and nothing serves them, it says what to run.
    """
    from ..context import ingest_if_free
    from .status import collect_status

    home = resolve_home(home_dir).require()
    queue = _queue_of(home)
    ingest_if_free(queue)  # create-task.sh's requests count as queued at once
    summary = collect_status(home, alerts=alerts, queue=queue)
    if as_json:
        print_json(summary)
    else:
        # alert messages and pause reasons are free text: control characters shown escaped
        click.echo("\n".join(printable(line) for line in format_status(summary)))


# ---------------------------------------------------------------------------- check
@click.command()
@home_option
@click.option("--no-alerts", is_flag=True,
              help="Evaluate only: do not update check-state.json or emit events.")
@json_option
@pass_ctx
def check(obj: CliContext, home_dir: Path | None, no_alerts: bool, as_json: bool) -> None:
    """Threshold check for cron and monitoring (Nagios/Icinga plugin conventions).

    \b
    Thresholds: check_* keys of system.json as [warning, critical].
    Exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (unreadable or corrupt home).
    The first line is the summary with perfdata after '|'. A newly crossed threshold
    emits one performance_alert event; a cleared one emits performance_recovered.
    """
    from .checks import run_check

    home = resolve_home(home_dir)
    try:
        if no_alerts:
            from coordination.config import load_system
            from coordination.metrics import observe, snapshot_from

            from .checks import check_summary, evaluate_checks

            home.require()
            results = evaluate_checks(snapshot_from(observe(home)), load_system(home))
            state, code, line = check_summary(results)
            out: dict[str, Any] = {"status": state, "exit_code": code, "summary": line,
                                   "checks": results, "alerts": [], "recoveries": [],
                                   "notes": []}
        else:
            out = run_check(home).as_dict()
    except Exception as exc:  # any failure to read the home is UNKNOWN, never a traceback
        message = (str(exc) if isinstance(exc, HarnessError | OSError)
                   else f"{type(exc).__name__}: {exc}").replace("\n", " ")
        # An invalid config is known to be bad: the daemons run on stale values
        # (config_invalid) until it is fixed. That is CRITICAL, not UNKNOWN.
        state, code = (("CRITICAL", CHECK_CRITICAL) if isinstance(exc, ConfigError)
                       else ("UNKNOWN", CHECK_UNKNOWN))
        if as_json:
            print_json({"status": state, "exit_code": code,
                        "summary": f"HARNESS {state} - {message}", "checks": [],
                        "alerts": [], "recoveries": [], "notes": []})
        else:
            click.echo(f"HARNESS {state} - {message}")
        sys.exit(code)
    if as_json:
        print_json(out)
    else:
        click.echo(out["summary"])
        for r in out["checks"]:
            value = "-" if r["value"] is None else f"{r['value']:g}"
            cmp = "<=" if r["lower_is_worse"] else ">="
            click.echo(f"{r['name']}: {r['level'].upper()} {value}{r['unit']} "
                       f"(warning {cmp} {r['warning']:g}, critical {cmp} {r['critical']:g})"
                       + (f" [{r['detail']}]" if r["detail"] else ""))
        for e in out["alerts"] + out["recoveries"]:
            click.echo(f"emitted {e['type']}: {e['message']}")
        for note in out["notes"]:
            click.echo(f"note: {note}")
    sys.exit(out["exit_code"])


# ---------------------------------------------------------------------------- dashboard
@click.command()
@home_option
@click.option("--once", is_flag=True, help="Print one frame and exit (for tests and `watch`).")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(0.2, 3600),
              help="Redraw at least this often (file changes redraw at once).")
@click.option("--width", type=click.IntRange(40, 1000), help="Frame width for --once "
              "(default: the terminal's, else 120).")
@click.option("--no-color", is_flag=True, help="Plain text (also when NO_COLOR is set).")
@pass_ctx
def dashboard(obj: CliContext, home_dir: Path | None, once: bool, interval: float,
              width: int | None, no_color: bool) -> None:
    """Live terminal dashboard: queue, workers, throughput, events, health.

    Redraws when coordination/ changes (inotify) and every --interval seconds. Keys:
    q quit, r redraw; Ctrl-C also quits. Plain terminal, no mouse: works over SSH.
    """
    from . import dashboard as dash

    home = resolve_home(home_dir).require()
    if once:
        dash.print_once(home, width=width, color=not no_color)
        return
    if not sys.stdout.isatty():
        raise UsageError("the live dashboard needs a terminal; use --once (e.g. with watch)")
    dash.run_live(home, interval=interval, color=not no_color)


# ---------------------------------------------------------------------------- timeline
def format_timeline(t: dict[str, Any]) -> list[str]:
    head = f"task {t['task_id']}" if t["task_id"] else f"correlation {t['correlation_id']}"
    lines = [f"timeline of {head}: {len(t['task_ids'])} task(s), "
             f"{len(t['workers'])} worker(s), {len(t['entries'])} entries"]
    multi = len(t["task_ids"]) > 1
    for e in t["entries"]:
        who = " ".join(x for x in ((e["task_id"] if multi else None), e["worker_id"]) if x)
        lines.append(f"{e['timestamp'] or '?':<24} {e['kind']:<7} {e['summary']}"
                     + (f"  [{who}]" if who else ""))
        if e["kind"] == "log":
            lines.extend(f"    | {line}" for line in (e["data"] or {}).get("lines", []))
    # Event messages and task output may hold terminal escape sequences: shown escaped.
    return [printable(line) for line in lines]


@click.command()
@click.argument("task_id", required=False, type=TASK_ID)
@click.option("--correlation", "correlation_id", help="Every task of this correlation id.")
@click.option("--log-lines", default=20, show_default=True, type=click.IntRange(0, 10000),
              help="Lines of each task log to include.")
@click.option("--archives", is_flag=True, help="Also read rotated *.jsonl.gz archives.")
@home_option
@json_option
@pass_ctx
def timeline(obj: CliContext, task_id: str | None, correlation_id: str | None,
             log_lines: int, archives: bool, home_dir: Path | None, as_json: bool) -> None:
    """Incident timeline: history, events, workers and log tail of a task, in time order.

    \b
    harness timeline t-20250101T120000000-0123456789
    harness timeline --correlation deploy-42 --json
    """
    from .timeline import build_timeline

    if (task_id is None) == (correlation_id is None):
        raise UsageError("give a TASK_ID or --correlation ID (one of them)")
    result = build_timeline(resolve_home(home_dir), task_id, correlation_id,
                            log_lines=log_lines, archives=archives)
    if as_json:
        print_json(result)
    else:
        click.echo("\n".join(format_timeline(result)))


# ---------------------------------------------------------------------------- report
@click.command()
@home_option
@click.option("--html", "html_file", help="Write a self-contained HTML page here ('-': "
              "stdout).")
@click.option("--limit", default=1440, show_default=True, type=click.IntRange(2, 100000),
              help="Newest snapshots to chart (1440: a day of minutes).")
@json_option
@pass_ctx
def report(obj: CliContext, home_dir: Path | None, html_file: str | None, limit: int,
           as_json: bool) -> None:
    """Report over the metrics snapshots: text summary (--json: as data), or --html with
    inline SVG charts."""
    from . import report as rep

    home = resolve_home(home_dir).require()
    if as_json and html_file is None:
        print_json(rep.summary_report(home, limit=limit))
        return
    if html_file is None:
        click.echo(rep.text_report(home, limit=limit))
        return
    page = rep.html_report(home, limit=limit)
    if html_file == "-":
        sys.stdout.write(page)
        sys.stdout.flush()
        return
    from coordination.store import replace_bytes

    target = Path(html_file)
    replace_bytes(target, page.encode(), "none")
    click.echo(f"wrote {target} ({len(page.encode())} bytes)")


def register(group: click.Group) -> None:
    group.add_command(metrics)
    group.add_command(status)
    group.add_command(check)
    group.add_command(dashboard)
    group.add_command(timeline)
    group.add_command(report)


__all__ = ["CHECK_CRITICAL", "CHECK_OK", "CHECK_UNKNOWN", "CHECK_WARNING", "EXIT_USAGE",
           "register"]
