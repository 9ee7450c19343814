"""``harness doctor [--repair]``: the fsck of a home (coordination/doctor.py).
Registered on the CLI by :func:`register` (see daemons/cli.py)."""

from __future__ import annotations

import sys

import click

from ..context import CliContext, json_option, pass_ctx, print_json


@click.command()
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


def register(group: click.Group) -> None:
    group.add_command(doctor)
