"""A throwaway PostgreSQL cluster for the postgres queue backend's tests.

:func:`start_cluster` runs ``initdb`` into a fresh temp dir and ``pg_ctl start`` on a free
loopback port (trust authentication, 127.0.0.1 only, fsync off: nothing here must survive
a power loss); :meth:`Cluster.stop` stops it and removes the directory. PostgreSQL refuses
to run as root, so as root the binaries run as the ``postgres`` user (``runuser``) and the
directory belongs to it.

Each test gets its own database, a copy of :data:`TEMPLATE` (the harness schema already
migrated into it), so tests are independent and a database costs one ``CREATE DATABASE``.

``HARNESS_TEST_DATABASE_URL`` (a URL of an existing server whose role may create
databases) makes the tests use that server instead of starting one.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import skip_reason

SKIP_REASON = skip_reason("PostgreSQL")  # "needs PostgreSQL (apt install postgresql)"
TEMPLATE = "harness_template"
RUN_AS = "postgres"


def pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding initdb and pg_ctl (Debian puts them
    there, not on PATH), else the directory of ``initdb`` on PATH; None when neither."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if
                   Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    """A running server: ``url(dbname)`` names one of its databases."""

    base_url: str  # without a database name
    admin_db: str = "postgres"
    datadir: Path | None = None
    bindir: Path | None = None
    options: str = ""  # the server options pg_ctl start was given
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def url(self, dbname: str) -> str:
        return f"{self.base_url}/{dbname}"

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction in the admin database."""
        import psycopg

        with psycopg.connect(self.url(self.admin_db), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, template: str | None = TEMPLATE) -> str:
        """A new database (a copy of ``template``; None: an empty one); returns its URL."""
        name = f"h{os.getpid()}_{next(self._names)}"
        tmpl = f" TEMPLATE {template}" if template else ""
        self.admin(f"CREATE DATABASE {name}{tmpl}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server (fast: sessions are disconnected) and start it again on the same
        port, after ``down_s`` seconds without a server; only a cluster this module
        started."""
        assert self.datadir is not None and self.bindir is not None
        if not down_s:
            _run_pg([str(self.bindir / "pg_ctl"), "restart", "-D", str(self.datadir), "-m",
                     "fast", "-w", "-t", "60"])
            return
        _run_pg([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", "fast",
                 "-w", "-t", "60"])
        time.sleep(down_s)
        _run_pg([str(self.bindir / "pg_ctl"), "start", "-D", str(self.datadir), "-w", "-t",
                 "60", "-l", str(self.datadir.parent / "server.log"), "-o", self.options])

    def stop(self) -> None:
        if self.datadir is None or self.bindir is None:
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            _run_pg([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.datadir), "-m",
                     "immediate", "-w"])
        shutil.rmtree(self.datadir.parent, ignore_errors=True)
        self.datadir = None


def _as_owner() -> list[str]:
    return ["runuser", "-u", RUN_AS, "--"] if os.geteuid() == 0 else []


def _run_pg(argv: list[str]) -> None:
    subprocess.run([*_as_owner(), *argv], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)


def start_cluster() -> Cluster:
    """initdb + pg_ctl start (see the module docstring). Raises RuntimeError with the
    server's log when it does not come up."""
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError(SKIP_REASON)
    top = Path(tempfile.mkdtemp(prefix="harness-pg-"))
    datadir = top / "data"
    if os.geteuid() == 0:
        owner = pwd.getpwnam(RUN_AS)
        os.chown(top, owner.pw_uid, owner.pw_gid)
    _run_pg([str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--no-sync", "--no-instructions"])
    port = _free_port()
    options = (f"-p {port} -k {top} -c listen_addresses=127.0.0.1 -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    log = top / "server.log"
    try:
        _run_pg([str(bindir / "pg_ctl"), "start", "-D", str(datadir), "-w", "-t", "60",
                 "-l", str(log), "-o", options])
    except subprocess.CalledProcessError as exc:
        text = log.read_text(errors="replace") if log.exists() else ""
        shutil.rmtree(top, ignore_errors=True)
        raise RuntimeError(f"pg_ctl start failed: {exc.stderr!r}\n{text}") from exc
    return Cluster(f"postgresql://postgres@127.0.0.1:{port}", datadir=datadir, bindir=bindir,
                   options=options)


def existing_cluster(url: str) -> Cluster:
    """A server given by ``HARNESS_TEST_DATABASE_URL`` (its database is the admin one)."""
    base, _, dbname = url.rpartition("/")
    return Cluster(base, admin_db=dbname or "postgres")


def prepare_template(cluster: Cluster) -> None:
    """(Re)create :data:`TEMPLATE` with the harness schema migrated into it."""
    from coordination.queue.postgres.schema import migrate

    cluster.admin(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
    cluster.admin(f"CREATE DATABASE {TEMPLATE}")
    migrate(cluster.url(TEMPLATE))


_shared: Cluster | None = None


def shared_cluster() -> Cluster:
    """The one cluster of this test process, started (and its template prepared) on first
    use and stopped at exit; ``pytest.skip`` with :data:`SKIP_REASON` where no PostgreSQL
    binaries exist (and no HARNESS_TEST_DATABASE_URL names a server)."""
    global _shared
    if _shared is None:
        import atexit

        import pytest

        url = os.environ.get("HARNESS_TEST_DATABASE_URL")
        if url:
            cluster = existing_cluster(url)
        elif pg_bindir() is None:
            pytest.skip(SKIP_REASON)
        else:
            cluster = start_cluster()
            atexit.register(cluster.stop)
        prepare_template(cluster)
        _shared = cluster
    return _shared


def stop_shared_cluster() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None
