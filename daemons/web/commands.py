"""``harness web``: the live dashboard and JSON API (docs/web.md). Registered by
daemons/cli.py (``register(cli)``); the web modules are imported only when it runs."""

from __future__ import annotations

from pathlib import Path

import click

from ..context import home_option, resolve_home


@click.command("web")
@click.option("--listen", default="127.0.0.1:8765", show_default=True,
              help="HOST:PORT to serve on ([::1]:PORT for IPv6, port 0: any free one). A "
                   "non-loopback address is refused unless a web token is configured. "
                   "Ignored when systemd passes a socket (harness-web.socket).")
@click.option("--allow-host", "allow_hosts", multiple=True,
              help="Also accept this Host header (a name the dashboard is reached by; "
                   "loopback names and the bound address are always accepted). Repeatable.")
@click.option("--log-level", type=click.Choice(("critical", "error", "warning", "info",
                                                "debug")), default="warning",
              show_default=True, help="uvicorn's log level (the journal, with systemd).")
@home_option
def web(listen: str, allow_hosts: tuple[str, ...], log_level: str,
        home_dir: Path | None) -> None:
    """Serve the live web dashboard and the JSON API of a home.

    \b
    Read-only unless a web token is configured: $HARNESS_WEB_TOKEN, else the file
    coordination/config/web-token (mode 0600; at least 16 characters). Writes then need
    it: `Authorization: Bearer TOKEN` for /api/, the token field for the pages' forms.
    Needs the web extra: pip install -e '.[web]'.
    Examples:
      harness web                           # http://127.0.0.1:8765/
      HARNESS_WEB_TOKEN=$(cat tok) harness web --listen 0.0.0.0:8765 --allow-host ops.example
    """
    from .server import serve

    code = serve(resolve_home(home_dir), listen, allow_hosts=allow_hosts, log_level=log_level)
    if code:
        raise click.exceptions.Exit(code)


def register(group: click.Group) -> None:
    group.add_command(web)
