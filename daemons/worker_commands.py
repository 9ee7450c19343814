"""CLI commands of the worker side: ``worker run``, ``drain``, ``pause``, ``resume`` and
``systemd install``. :func:`register` adds them to the top-level ``harness`` group."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from coordination import clock
from coordination.config import load_worker_types
from coordination.control import update_control
from coordination.errors import UsageError
from coordination.events import emit
from coordination.ids import check_id

from .context import (
    WORKER_TYPE,
    IdParam,
    add_commands,
    home_option,
    json_option,
    print_json,
    resolve_home,
)

INSTANCE = IdParam("worker instance")

SOURCE = "cli"




def _positive(value: float | None, name: str) -> float | None:
    if value is not None and value < 0:
        raise UsageError(f"{name} must be >= 0, got {value}")
    return value


# ---------------------------------------------------------------------------- worker
@click.group("worker")
def worker_group() -> None:
    """Run a worker (normally started by systemd as harness-worker@ID.service)."""


@worker_group.command("run")
@click.option("--instance", default=None, type=INSTANCE,
              help="Instance id. Default: $HARNESS_INSTANCE, else the systemd unit's "
              "instance name, else 0.")
@click.option("--types", default=None, help="Comma-separated worker types to claim "
              "(default: every type).")
@click.option("--idle-exit", "idle_exit", type=float, default=None,
              help="Exit (exit_reason idle) after this many idle seconds; 0: never. "
              "Default: system.json idle_exit_s.")
@click.option("--max-tasks", type=click.IntRange(min=1), default=None,
              help="Exit (max_tasks) after running this many tasks.")
@click.option("--max-uptime", type=float, default=None,
              help="Exit (max_uptime) once up this many seconds (after the current task).")
@click.option("--once", is_flag=True, help="Run at most one task, then exit.")
@home_option
def worker_run(instance: str | None, types: str | None, idle_exit: float | None,
               max_tasks: int | None, max_uptime: float | None, once: bool,
               home_dir: Path | None) -> None:
    """Claim and run tasks until told to stop.

    \b
    Registers coordination/worker-specs/active/<worker_id>.json, waits for work with
    inotify (no polling), runs each task in its own process group and records its outcome.
    Exit reasons (in the completed spec): idle, max_tasks, max_uptime, drained, signal,
    once, error. Exit status 0 except for error (1).
    SIGTERM/SIGINT: finish the current task within stop_grace_s, else hand it back.
    SIGHUP: re-read the config.
    """
    from .worker import WorkerOptions, default_instance, run_worker, systemd_unit

    home = resolve_home(home_dir).require()
    type_list = [t.strip() for t in types.split(",") if t.strip()] if types else None
    if types is not None and not type_list:
        raise UsageError("--types: give at least one worker type")
    for name in type_list or ():
        check_id(name, "worker type", "--types")
    options = WorkerOptions(
        instance=check_id(instance or default_instance(), "worker instance",
                          "--instance (or $HARNESS_INSTANCE)"), types=type_list,
        idle_exit_s=_positive(idle_exit, "--idle-exit"), max_tasks=max_tasks,
        max_uptime_s=_positive(max_uptime, "--max-uptime"), once=once,
        unit=systemd_unit())
    code = run_worker(home, options)
    if code:
        raise click.exceptions.Exit(code)


# ---------------------------------------------------------------------------- control
@click.command("drain")
@click.option("--instance", default=None, type=INSTANCE,
              help="Drain only this instance (default: all).")
@json_option
@home_option
def drain(instance: str | None, as_json: bool, home_dir: Path | None) -> None:
    """Ask running workers to finish their current task and exit (exit_reason drained).

    Applies to workers started before this request; workers started later (e.g. restarted
    by systemd) are not affected.
    """
    home = resolve_home(home_dir).require()
    now = clock.now()
    stamp = clock.iso(now)

    def change(state: dict[str, Any]) -> None:
        drain_state = state.setdefault("drain", {"all": None, "instances": {}})
        if instance is None:
            drain_state["all"] = stamp
        else:
            drain_state.setdefault("instances", {})[instance] = stamp

    update_control(home, change, now=now)
    target = "all workers" if instance is None else f"instance {instance}"
    emit(home, "drain_requested", source=SOURCE, message=f"drain requested for {target}",
         data={"instance": instance, "requested_at": stamp})
    if as_json:
        print_json({"drain": "all" if instance is None else instance, "requested_at": stamp})
    else:
        click.echo(f"drain requested for {target} at {stamp}")


@click.command("pause")
@click.option("--type", "worker_type", required=True, type=WORKER_TYPE,
              help="Worker type to pause.")
@click.option("--for", "duration", type=float, default=None,
              help="Pause for this many seconds (default: until `harness resume`).")
@click.option("--reason", default="", help="Why (shown in control.json and the event).")
@json_option
@home_option
def pause(worker_type: str, duration: float | None, reason: str, as_json: bool,
          home_dir: Path | None) -> None:
    """Stop claims of one worker type (running tasks continue)."""
    home = resolve_home(home_dir).require()
    known = load_worker_types(home)
    if worker_type not in known:
        raise UsageError(f"unknown worker type {worker_type!r}; known: "
                         f"{', '.join(sorted(known))}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise UsageError(f"--for must be > 0 seconds, got {duration}")
    now = clock.now()
    info = {"since": clock.iso(now),
            "until": None if duration is None else clock.iso(now + duration),
            "reason": reason or None}

    def change(state: dict[str, Any]) -> None:
        state.setdefault("paused_types", {})[worker_type] = info

    update_control(home, change, now=now)
    emit(home, "worker_type_paused", source=SOURCE,
         message=f"type {worker_type} paused" + (f": {reason}" if reason else ""),
         data={"worker_type": worker_type, **info})
    if as_json:
        print_json({"worker_type": worker_type, **info})
    else:
        until = f" until {info['until']}" if info["until"] else " until resumed"
        click.echo(f"paused {worker_type}{until}")


@click.command("resume")
@click.option("--type", "worker_type", required=True, type=WORKER_TYPE,
              help="Worker type to resume.")
@json_option
@home_option
def resume(worker_type: str, as_json: bool, home_dir: Path | None) -> None:
    """Let workers claim a paused worker type again."""
    home = resolve_home(home_dir).require()
    found: list[bool] = []

    def change(state: dict[str, Any]) -> None:
        found.append(state.setdefault("paused_types", {}).pop(worker_type, None) is not None)

    update_control(home, change)
    was_paused = bool(found and found[0])
    if was_paused:
        emit(home, "worker_type_resumed", source=SOURCE, message=f"type {worker_type} resumed",
             data={"worker_type": worker_type})
    if as_json:
        print_json({"worker_type": worker_type, "was_paused": was_paused})
    else:
        click.echo(f"resumed {worker_type}" if was_paused
                   else f"{worker_type} was not paused")


# ---------------------------------------------------------------------------- systemd
@click.group("systemd")
def systemd_group() -> None:
    """Install the systemd units (harness-worker@.service, harness.target, ...)."""


@systemd_group.command("install")
@click.option("--user", "scope", flag_value="user", help="Install for the user manager "
              "($XDG_CONFIG_HOME/systemd/user).")
@click.option("--system", "scope", flag_value="system", help="Install for the system "
              "manager (/etc/systemd/system).")
@click.option("--dry-run", is_flag=True, help="Print the rendered units; write nothing.")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the units here instead of the scope's default directory.")
@click.option("--harness-bin", default=None, help="Command that runs harness in ExecStart "
              "(default: `harness` on PATH, else `<python> -m daemons`).")
@click.option("--no-sandbox", is_flag=True, help="Drop the hardening lines (ProtectSystem, "
              "ProtectHome, PrivateTmp, ...) for hosts whose manager cannot set up mount "
              "namespaces (some containers). Each dropped line is noted in the unit.")
@click.option("--no-reload", is_flag=True, help="Do not run `systemctl daemon-reload`.")
@json_option
@home_option
def systemd_install(scope: str | None, dry_run: bool, unit_dir: Path | None,
                    harness_bin: str | None, no_sandbox: bool, no_reload: bool,
                    as_json: bool, home_dir: Path | None) -> None:
    """Render the units with the real ExecStart and home, write them, daemon-reload.

    \b
    @HARNESS_BIN@ becomes the harness command and @HARNESS_HOME@ the home in every
    *.service, *.target and *.timer under systemd/. The home must exist (its path is a
    ReadWritePaths= of the sandbox). A home under /tmp or /var/tmp cannot be combined with
    PrivateTmp=yes (the service would see an empty private /tmp): PrivateTmp is then turned
    off with a warning and a comment in the unit.
    """
    from .systemd_units import install_units

    if scope is None:
        raise UsageError("give --user or --system")
    home = resolve_home(home_dir)
    report = install_units(home.root, scope=scope, dry_run=dry_run, unit_dir=unit_dir,
                           harness_bin=harness_bin, sandbox=not no_sandbox,
                           reload=not no_reload)
    for warning in report.warnings:
        click.echo(f"harness: warning: {warning}", err=True)
    if as_json:
        print_json(report.as_dict(with_text=dry_run))
        return
    if dry_run:
        for unit in report.units:
            click.echo(f"# ---- {unit.name} -> {report.unit_dir / unit.name}")
            click.echo(unit.text, nl=False)
        return
    for unit in report.units:
        click.echo(f"wrote {report.unit_dir / unit.name}")
    if report.reloaded:
        click.echo(f"ran {' '.join(report.reload_cmd)}")


def register(group: click.Group) -> None:
    """Add the worker-side commands to ``group`` (the top-level ``harness`` group)."""
    add_commands(group, (worker_group, drain, pause, resume, systemd_group))
