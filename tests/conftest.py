"""Fixtures shared by the coordination tests (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ProcGroup, make_home, reap_zombie_children, set_subreaper
from pg_cluster import Cluster, shared_cluster, stop_shared_cluster
from user_manager import UserManager, boot_manager, install_fleet

from coordination.paths import Home

# Files a test writes by hand stand for what harness writes: private, as the CLI makes
# them whatever the caller's umask (tests of the umask itself set their own).
os.umask(0o077)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """An initialised home with the default system config."""
    return make_home(tmp_path)


@pytest.fixture
def home_factory(tmp_path: Path) -> Callable[..., Home]:
    """``home_factory(**system_overrides)``: a fresh initialised home per call."""
    counter = iter(range(1, 1_000_000))

    def make(**overrides: Any) -> Home:
        return make_home(tmp_path, f"home{next(counter)}", **overrides)

    return make


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcGroup]:
    """Spawn children with ``procs.python(...)``/``procs.spawn(...)``; all are killed and
    reaped at teardown, whatever the test did."""
    group = ProcGroup(tmp_path / "procs")
    try:
        yield group
    finally:
        group.close()


@pytest.fixture
def adopt_orphans() -> Iterator[None]:
    """Make this test process the subreaper of its descendants while the test runs, so the
    task processes a killed worker leaves behind are reparented to us (not to an init that
    may never reap them) and reaped at teardown. Request it before ``procs``."""
    set_subreaper(True)
    try:
        yield
    finally:
        set_subreaper(False)
        reap_zombie_children()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL server for the session (tests/pg_cluster.py); skips where
    no PostgreSQL binaries exist."""
    try:
        yield shared_cluster()
    finally:
        stop_shared_cluster()


@pytest.fixture
def pg_database(pg_cluster: Cluster) -> Iterator[Callable[..., str]]:
    """``pg_database()``: the URL of a new database with the harness schema (a copy of the
    template; ``pg_database(template=None)``: an empty one), dropped after the test."""
    made: list[str] = []

    def make(template: str | None = "harness_template") -> str:
        made.append(pg_cluster.create_database(template))
        return made[-1]

    yield make
    for url in made:
        pg_cluster.drop_database(url)


@pytest.fixture
def pg_home_factory(tmp_path: Path, pg_database: Callable[..., str]) -> Callable[..., Home]:
    """``pg_home_factory(**system_overrides)``: a fresh initialised postgres home over a
    fresh database per call."""
    counter = iter(range(1, 1_000_000))

    def make(**overrides: Any) -> Home:
        return make_home(tmp_path, f"pghome{next(counter)}", queue_backend="postgres",
                         database_url=pg_database(), **overrides)

    return make


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserManager]:
    """A private ``systemd --user`` manager for the module (tests/user_manager.py); skips
    where systemd cannot run here."""
    yield from boot_manager(tmp_path_factory)


@pytest.fixture(scope="module")
def fleet(manager: UserManager) -> UserManager:
    """``manager`` with the units installed, sandboxed where the host allows it."""
    return install_fleet(manager)
