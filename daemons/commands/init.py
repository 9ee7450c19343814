"""``harness init``: create (or complete) a home and pick its queue backend.
Registered on the CLI by :func:`register` (see daemons/cli.py)."""

from __future__ import annotations

import os
from typing import Any

import click

from coordination.config import init_home
from coordination.errors import UsageError
from coordination.paths import Home

from ..context import CliContext, json_option, pass_ctx, print_json


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    import grp

    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except (KeyError, ValueError, OverflowError):
        raise UsageError(f"--group: no such group {name!r}") from None


@click.command()
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
    coordination/dashboard-events.jsonl and (through the queue) its jq view.

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
    queue = obj.queue()
    if queue.ensure_published():
        written.append(str(queue.view_file))
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


def register(group: click.Group) -> None:
    group.add_command(init)
