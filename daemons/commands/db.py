"""``harness db ...``: the postgres backend's schema (docs/multi-host.md, "Schema").
Registered on the CLI by :func:`register` (see daemons/cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..context import home_option, json_option, print_json, resolve_home

_URL_HELP = ("The database (a PostgreSQL URL or conninfo). Default: $HARNESS_DATABASE_URL, "
             "else the home's system.json database_url.")


def _url(home_dir: Path | None, given: str | None) -> str:
    if given:
        return given
    from coordination.queue.postgres.connect import database_url

    return database_url(resolve_home(home_dir))


@click.group()
def db() -> None:
    """The PostgreSQL schema of queue_backend "postgres": versioned migrations.

    \b
    Exit codes: 0 ok; 1 the database's schema is newer than this harness knows
    (upgrade harness; nothing is changed); 2 no database URL; 75 the server
    cannot be reached (retry once it is up).
    """


@db.command("status")
@click.option("--database-url", "url", default=None, help=_URL_HELP)
@home_option
@json_option
def db_status(url: str | None, home_dir: Path | None, as_json: bool) -> None:
    """Show the schema version of the database, the version this harness knows and the
    migrations still to apply. Changes nothing. The URL is shown with its password
    redacted."""
    from coordination.queue.postgres.schema import status

    report = status(_url(home_dir, url))
    if as_json:
        print_json(report)
        return
    click.echo(f"database {report['database_url']}: schema version {report['version']}, "
               f"this harness knows {report['known']} ({report['state']})")
    for row in report["applied"]:
        click.echo(f"  applied {row['version']}: {row['description']} ({row['applied_at']})")
    for row in report["pending"]:
        click.echo(f"  pending {row['version']}: {row['description']}")
    if report["state"] == "newer":
        click.echo("  this harness is older than the schema: upgrade it before using it here")


@db.command("migrate")
@click.option("--database-url", "url", default=None, help=_URL_HELP)
@home_option
@json_option
def db_migrate(url: str | None, home_dir: Path | None, as_json: bool) -> None:
    """Apply the migrations the database lacks, in one transaction (all or none), under
    an advisory lock (hosts migrating at once are safe: one applies, the others find
    nothing to do). Refuses, changing nothing, a schema newer than this harness knows."""
    from coordination.queue.postgres.schema import migrate
    from coordination.redact import redact_url

    target = _url(home_dir, url)
    before, after = migrate(target)
    if as_json:
        print_json({"database_url": redact_url(target), "before": before, "after": after,
                    "applied": list(range(before + 1, after + 1))})
    elif before == after:
        click.echo(f"database {redact_url(target)}: schema version {after}, up to date")
    else:
        click.echo(f"database {redact_url(target)}: schema version {before} -> {after}")


@db.command("grants")
@click.argument("role")
@click.option("--database", "database", default=None,
              help="The database name in GRANT CONNECT. Default: the one the home's URL "
                   "names.")
@home_option
def db_grants(role: str, database: str | None, home_dir: Path | None) -> None:
    """Print the GRANT statements a least-privilege ROLE needs to run harness on a migrated
    database (no DDL: migrations run as the schema owner). Changes nothing; pipe them to
    psql as the owner (docs/multi-host.md, "A least-privilege role")."""
    from coordination.queue.postgres.schema import grants_sql

    if database is None:
        from psycopg.conninfo import conninfo_to_dict

        database = str(conninfo_to_dict(_url(home_dir, None)).get("dbname") or "")
        if not database:
            raise click.UsageError("the database URL names no database: pass --database")
    click.echo(grants_sql(role, database), nl=False)


def register(group: click.Group) -> None:
    group.add_command(db)
