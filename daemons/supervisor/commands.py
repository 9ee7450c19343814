"""CLI commands of the supervisor side: ``supervisor run|reclaim|scale-down-once|status``,
``up`` and ``demo``. :func:`register` adds them to the top-level ``harness`` group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from coordination import clock
from coordination.errors import CorruptFileError, UsageError
from coordination.store import read_json

from ..context import add_commands, home_option, json_option, print_json, resolve_home


# ---------------------------------------------------------------------------- supervisor
@click.group("supervisor")
def supervisor_group() -> None:
    """Reclaim orphaned tasks, stop stalled ones, autoscale workers, publish health."""


@supervisor_group.command("run")
@click.option("--once", is_flag=True, help="One reconcile pass, print its report, exit. "
              "With the process actuator it starts no worker (a one-shot cannot supervise "
              "children): the scaling decision is only reported.")
@click.option("--actuator", type=click.Choice(("auto", "systemd", "process")), default=None,
              help="How workers are started and stopped. Default: system.json `actuator`.")
@click.option("--no-scale", is_flag=True, help="Start and stop no worker: reclaim, stalls, "
              "health and circuits only (the fleet is sized elsewhere).")
@json_option
@home_option
def supervisor_run(once: bool, actuator: str | None, no_scale: bool, as_json: bool,
                   home_dir: Path | None) -> None:
    """Run the supervisor (normally as harness-supervisor.service, Type=notify).

    \b
    Wakes on inotify (queue, inbox, control, config), on a worker's death (pidfd) and at
    least every supervisor_tick_s. Each pass: ingest the inbox, reclaim tasks of dead
    workers, stop stalled ones, autoscale, update backpressure, circuits and
    coordination/health.json. State survives restarts in coordination/supervisor-state.json.
    SIGTERM/SIGINT: stop (process-actuator workers are drained first). SIGHUP: re-read config.
    Exit 75 when another supervisor already runs on this home.
    """
    from .loop import run_supervisor, status_text

    home = resolve_home(home_dir).require()
    reports: list[dict[str, Any]] = []

    def keep(report: dict[str, Any]) -> bool:
        if once:
            reports.append(report)
        return False

    code = run_supervisor(home, actuator_name=actuator, once=once, on_pass=keep,
                          verbose=not (once and as_json), scale=not no_scale)
    if once and reports:
        if as_json:
            print_json(reports[0])
        else:
            click.echo(status_text(reports[0]))
            scale = reports[0].get("scale") or {}
            if scale.get("action"):
                click.echo(f"scale: {scale['action']} {scale.get('from')} -> "
                           f"{scale.get('to')} (target {scale.get('target')})"
                           + ("" if scale.get("applied") else "; not applied: --once does not "
                              "start worker processes (use the systemd actuator or `harness "
                              "up`)"))
    if code:
        raise click.exceptions.Exit(code)


@supervisor_group.command("reclaim")
@click.option("--dry-run", is_flag=True, help="Only say what would be reclaimed.")
@json_option
@home_option
def supervisor_reclaim(dry_run: bool, as_json: bool, home_dir: Path | None) -> None:
    """One orphan-reclaim pass (safe beside a running supervisor).

    \b
    A worker is dead on proof: pid gone (or a zombie), pid reused, or heartbeat older than
    heartbeat_timeout_s. A frozen one (stale heartbeat, pid alive with its recorded start
    time, on this host) gets SIGKILL, with its tasks' process groups, before its task is
    requeued. Its running task goes back to the queue with the attempt counted, or to the
    dead letters when its attempts are spent; task processes it left on this host are
    killed and its spec moves to completed (exit_reason crashed, crash_proof). A task of
    any host whose lease expired (lease_until past: its worker stopped heartbeating) is
    requeued the same way; another host's task whose lease holds is never touched. --dry-run
    signals and changes nothing.
    """
    from .reclaim import reclaim_pass

    home = resolve_home(home_dir).require()
    out = reclaim_pass(home, clock.now(), dry_run=dry_run)
    out["dry_run"] = dry_run
    if as_json:
        print_json(out)
        return
    verb = "would reclaim" if dry_run else "reclaimed"
    for item in out["reclaimed"]:
        click.echo(f"{verb} {item['task_id']} from {item['worker_id']} ({item['proof']})"
                   + ("" if dry_run else f" -> {item['status']}"))
    for item in out["dead_workers"]:
        done = "would complete" if dry_run else ("completed" if item["completed"] else "left")
        click.echo(f"dead worker {item['worker_id']} ({item['proof']}): spec {done}")
    if out["orphans_killed"]:
        click.echo(f"killed orphaned task process group(s) {out['orphans_killed']}")
    click.echo(f"{len(out['reclaimed'])} task(s) {verb}, {len(out['dead_workers'])} dead "
               "worker(s)")


@supervisor_group.command("scale-down-once")
@click.option("--dry-run", is_flag=True, help="Only say which idle workers would be drained.")
@json_option
@home_option
def supervisor_scale_down_once(dry_run: bool, as_json: bool, home_dir: Path | None) -> None:
    """One scale-down pass (harness-idle-stop.timer): drain idle workers above what the
    scaling rules want (min_workers, warm_pool, cool-down). Never starts a worker; does
    nothing while a supervisor runs (it scales down itself)."""
    from .reconcile import scale_down_once

    home = resolve_home(home_dir).require()
    out = scale_down_once(home, clock.now(), dry_run=dry_run)
    if as_json:
        print_json(out)
        return
    if "skipped" in out:
        click.echo(f"skipped: {out['skipped']}")
        return
    names = out["would_drain"]
    verb = "would drain" if dry_run else "draining"
    click.echo(f"workers {out['running']} (busy {out['busy']}, idle {out['idle']}), target "
               f"{out['target']}: " + (f"{verb} instance(s) {', '.join(names)}" if names
                                       else "nothing to stop"))


@supervisor_group.command("status")
@json_option
@home_option
def supervisor_status(as_json: bool, home_dir: Path | None) -> None:
    """Print coordination/health.json and the supervisor's saved state."""
    home = resolve_home(home_dir).require()
    doc: dict[str, Any] = {}
    for key, path in (("health", home.health_file), ("state", home.supervisor_state_file)):
        try:
            doc[key] = read_json(path)
        except FileNotFoundError:
            doc[key] = None
        except CorruptFileError as exc:
            doc[key] = {"error": str(exc)}
    if as_json:
        print_json(doc)
        return
    health, state = doc["health"] or {}, doc["state"] or {}
    if not health:
        click.echo("no health.json yet: is the supervisor running?")
    else:
        rate = health.get("success_rate")
        click.echo(f"health {health.get('health')} (updated {health.get('updated_at')}): "
                   f"success rate {'-' if rate is None else f'{rate:.0%}'}, stalled "
                   f"{len(health.get('stalled_workers') or [])}, backpressure "
                   f"{'on' if health.get('backpressure') else 'off'}")
        for reason in health.get("reasons") or []:
            click.echo(f"  reason: {reason}")
        for wtype, info in (health.get("circuits") or {}).items():
            click.echo(f"  circuit open: {wtype} until {info.get('until')}")
    if state:
        click.echo(f"last scale {state.get('last_scale_at') or 'never'}; state saved "
                   f"{state.get('updated_at')}")


# ---------------------------------------------------------------------------- up, demo
@click.command("up")
@click.option("--workers", "-w", type=click.IntRange(min=0), default=2, show_default=True,
              help="Workers to run: exactly this many, unless --max-workers allows more.")
@click.option("--max-workers", type=click.IntRange(min=0), default=None,
              help="Let the supervisor scale up to this many under load (default: "
              "--workers, so the fleet stays at --workers).")
@click.option("--demo", "with_demo", is_flag=True, help="Also enqueue the demo workload "
              "(see `harness demo`); creates the home first if needed, as `demo` does.")
@click.option("--progress/--no-progress", default=None,
              help="Print a status line (queued, running, done, failed, workers) every "
              "few seconds. Default: only when stdout is a terminal.")
@home_option
def up(workers: int, max_workers: int | None, with_demo: bool, progress: bool | None,
       home_dir: Path | None) -> None:
    """Run the whole system in the foreground (no systemd needed).

    \b
    Supervisor with the process actuator (workers are children, one process group each),
    plus the janitor and metrics ticks. Ctrl-C or SIGTERM drains: running tasks finish or
    are handed back (a second Ctrl-C hurries, a third kills), and no process is left behind.
    On exit it prints what was done, what is still queued and what to run next.
      harness up --workers 2
      harness --home ./harness-home up --demo
    """
    import sys

    from ..devtools.demo import enqueue_demo
    from .up import PROGRESS_EVERY_S, run_up

    home = resolve_home(home_dir)
    if with_demo:
        from coordination.config import init_home

        if home.root.exists() and not home.root.is_dir():
            raise UsageError(f"{home.root} exists and is not a directory")
        if init_home(home, force=False):
            click.echo(f"initialised home {home.root}")
    home.require()
    if max_workers is not None and max_workers < workers:
        raise UsageError(f"--max-workers ({max_workers}) must be >= --workers ({workers})")
    if with_demo:
        correlation_id, ids = enqueue_demo(home)
        click.echo(f"enqueued {len(ids)} demo tasks (correlation id {correlation_id})")
    show = sys.stdout.isatty() if progress is None else progress
    code = run_up(home, workers=workers, max_workers=max_workers,
                  progress_every_s=PROGRESS_EVERY_S if show else None, summary=True)
    if code:
        raise click.exceptions.Exit(code)


@click.command("demo")
@click.option("--workers", "-w", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--keep-running", is_flag=True, help="Keep running after the workload is "
              "done (Ctrl-C stops).")
@home_option
def demo(workers: int, keep_running: bool, home_dir: Path | None) -> None:
    """Initialise the home if needed, enqueue a demo workload and run it in the foreground.

    \b
    12 short tasks of mixed priorities (one fails once, then passes on its retry; one
    depends on another), run by 3 workers. Prints a status line every second and how to
    watch from another terminal; exits 0 once the workload is finished.
      harness --home ./harness-home demo
    """
    from ..devtools.demo import run_demo

    home = resolve_home(home_dir)
    if home.root.exists() and not home.root.is_dir():
        raise UsageError(f"{home.root} exists and is not a directory")
    code = run_demo(home, workers=workers, keep_running=keep_running)
    if code:
        raise click.exceptions.Exit(code)


def register(group: click.Group) -> None:
    """Add the supervisor-side commands to ``group`` (the top-level ``harness`` group)."""
    add_commands(group, (supervisor_group, up, demo))
