"""CLI commands of the worker side: ``worker run``, ``drain``, ``pause``, ``resume`` and
``systemd install``. :func:`register` adds them to the top-level ``harness`` group."""

from __future__ import annotations

from pathlib import Path

import click

from coordination.control import pause_type, request_drain, resume_type
from coordination.errors import UsageError
from coordination.ids import check_id

from ..context import (
    WORKER_TYPE,
    IdParam,
    add_commands,
    home_option,
    json_option,
    print_json,
    resolve_home,
)
from ..systemd_units import DROPINS

INSTANCE = IdParam("worker instance")

SOURCE = "cli"


def _one_type(positional: str | None, option: str | None) -> str:
    """The worker type of ``pause``/``resume``: given as an argument (the README's form)
    or with ``--type``, exactly once."""
    if positional and option:
        raise UsageError("give the worker type as an argument or with --type, not both")
    chosen = positional or option
    if not chosen:
        raise UsageError("give the worker type: `harness pause TYPE` (or --type TYPE)")
    return chosen


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
    from .loop import run_worker
    from .options import WorkerOptions, default_instance, systemd_unit

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
    out = request_drain(home, instance, source=SOURCE)
    if as_json:
        print_json(out)
    else:
        target = "all workers" if instance is None else f"instance {instance}"
        click.echo(f"drain requested for {target} at {out['requested_at']}")


@click.command("pause")
@click.argument("type_arg", metavar="[TYPE]", required=False, type=WORKER_TYPE)
@click.option("--type", "worker_type", type=WORKER_TYPE,
              help="Worker type to pause (or give it as TYPE).")
@click.option("--for", "duration", type=float, default=None,
              help="Pause for this many seconds (default: until `harness resume`).")
@click.option("--reason", default="", help="Why (shown in control.json and the event).")
@json_option
@home_option
def pause(type_arg: str | None, worker_type: str | None, duration: float | None, reason: str,
          as_json: bool, home_dir: Path | None) -> None:
    """Stop claims of one worker type (running tasks continue).

    \b
      harness pause analysis --for 600 --reason 'API quota'
      harness pause --type analysis
    """
    worker_type = _one_type(type_arg, worker_type)
    home = resolve_home(home_dir).require()
    info = pause_type(home, worker_type, duration=duration, reason=reason, source=SOURCE)
    if as_json:
        print_json(info)
    else:
        until = f" until {info['until']}" if info["until"] else " until resumed"
        click.echo(f"paused {worker_type}{until}")


@click.command("resume")
@click.argument("type_arg", metavar="[TYPE]", required=False, type=WORKER_TYPE)
@click.option("--type", "worker_type", type=WORKER_TYPE,
              help="Worker type to resume (or give it as TYPE).")
@json_option
@home_option
def resume(type_arg: str | None, worker_type: str | None, as_json: bool,
           home_dir: Path | None) -> None:
    """Let workers claim a paused worker type again (`harness resume TYPE`)."""
    worker_type = _one_type(type_arg, worker_type)
    out = resume_type(resolve_home(home_dir).require(), worker_type, source=SOURCE)
    if as_json:
        print_json(out)
    else:
        click.echo(f"resumed {worker_type}" if out["was_paused"]
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
@click.option("--service-user", default="harness", show_default=True, help="--system: the "
              "unprivileged user the units run as (User=); created with `useradd --system` "
              "when missing, and given the home.")
@click.option("--service-group", default=None, help="--system: its group (Group=; default: "
              "the user's own group). Created with `groupadd --system` when missing.")
@click.option("--no-create-user", is_flag=True, help="--system: neither create the service "
              "user nor chown the home (they are managed elsewhere).")
@click.option("--polkit-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/etc/polkit-1/rules.d"), show_default=True, help="--system: "
              "where to write the polkit rule that lets the service user start, stop and "
              "kill harness-worker@ units (and nothing else).")
@click.option("--no-polkit", is_flag=True, help="--system: write no polkit rule.")
@click.option("--print-dropin", "print_dropin", type=click.Choice(sorted(DROPINS)),
              default=None, help="Print a drop-in that loosens the worker sandbox for a "
              "worker type that needs it (docs/security.md) and exit; writes nothing.")
@json_option
@home_option
def systemd_install(scope: str | None, dry_run: bool, unit_dir: Path | None,
                    harness_bin: str | None, no_sandbox: bool, no_reload: bool,
                    service_user: str, service_group: str | None, no_create_user: bool,
                    polkit_dir: Path, no_polkit: bool, print_dropin: str | None,
                    as_json: bool, home_dir: Path | None) -> None:
    """Render the units with the real ExecStart and home, write them, daemon-reload.

    \b
    @HARNESS_BIN@ becomes the harness command and @HARNESS_HOME@ the home in every
    *.service, *.target and *.timer under systemd/. The home must exist (its path is a
    ReadWritePaths= of the sandbox). A home under /tmp or /var/tmp cannot be combined with
    PrivateTmp=yes (the service would see an empty private /tmp): PrivateTmp is then turned
    off with a warning and a comment in the unit.

    \b
    The services are sandboxed (systemd/sandbox.inc, docs/security.md). --system runs them
    as the unprivileged --service-user, never root: created when missing, and the home is
    chowned to it. --user units run as the user of that manager.
    """
    from ..systemd_units import install_units

    if print_dropin is not None:
        click.echo(DROPINS[print_dropin], nl=False)
        return
    if scope is None:
        raise UsageError("give --user or --system")
    home = resolve_home(home_dir)
    report = install_units(home.root, scope=scope, dry_run=dry_run, unit_dir=unit_dir,
                           harness_bin=harness_bin, sandbox=not no_sandbox,
                           reload=not no_reload, service_user=service_user,
                           service_group=service_group, create_user=not no_create_user,
                           polkit_dir=None if no_polkit else polkit_dir)
    for warning in report.warnings:
        click.echo(f"harness: warning: {warning}", err=True)
    for action in report.user_actions:
        click.echo(f"{'would run' if dry_run else 'ran'}: {action}", err=dry_run)
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
