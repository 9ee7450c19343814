"""``harness bench --database-url URL``: the postgres queue backend's figures
(docs/multi-host.md, "Capacity").

Every run works in a database of its own, created on the server that URL names
(``CREATE DATABASE``: the URL's role needs CREATEDB), migrated, and dropped afterwards, so
a bench never touches an existing harness database. The URL's own database is only used
to create and drop those. Without a URL these benches do not run (there is no server of
our own to start: the tests' throwaway cluster is test code).

- claim + complete with 0 and 100,000 tasks queued (the backlog must not raise the cost:
  the issue's target is at most 1.5x);
- dispatch latency over LISTEN/NOTIFY on one idle worker;
- end-to-end ``true`` tasks/s with 2 and 4 workers spread over 2 simulated hosts (two
  homes, ``HARNESS_HOST_ID``, one database), beside the file backend's rows;
- a PostgreSQL-based peer (pgqueuer) doing the same ``true`` tasks, when it is installed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_URL = "HARNESS_BENCH_DATABASE_URL"
_names = itertools.count(1)


def bench_url() -> str:
    """The server the postgres benches use (``--database-url``); RuntimeError when none."""
    url = os.environ.get(ENV_URL)
    if not url:
        raise RuntimeError(f"needs a PostgreSQL server: harness bench --database-url URL "
                           f"(or ${ENV_URL})")
    return url


@contextlib.contextmanager
def scratch_database(*, migrated: bool = True) -> Iterator[str]:
    """A new database on the bench server (with the harness schema unless not
    ``migrated``), dropped on exit; yields its URL."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    from coordination.queue.postgres.schema import migrate

    admin = bench_url()
    name = f"harness_bench_{os.getpid()}_{next(_names)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(admin, dbname=name)
    try:
        if migrated:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def overrides(url: str) -> dict[str, Any]:
    """system.json keys of a postgres home over ``url``."""
    return {"queue_backend": "postgres", "database_url": url}


def claim_complete(root: Path, quick: bool, backlog: int) -> float:
    """ms per claim + complete with ``backlog`` tasks queued. The refill enqueue that keeps
    the backlog constant is not timed: on postgres an enqueue counts the queued rows for
    ``max_queue_depth`` (O(backlog)), which is the enqueue's cost, not the claim's."""
    from .queue_bench import claim_complete

    with scratch_database() as url:
        return claim_complete(root, quick, backlog, time_refill=False, **overrides(url))


def dispatch(root: Path, quick: bool) -> dict[str, list[float]]:
    from .worker_bench import dispatch_samples

    with scratch_database() as url:
        from_call, from_commit = dispatch_samples(root, 50 if quick else 200, "fsync",
                                                  **overrides(url))
    return {"pg_dispatch_latency": from_call, "pg_dispatch_latency_after_commit": from_commit}


def throughput(root: Path, quick: bool) -> dict[str, float]:
    """2 and 4 workers over 2 simulated hosts sharing one database."""
    from .worker_bench import measure_throughput

    tasks = 100 if quick else 500
    out = {}
    for workers in (2, 4):
        with scratch_database() as url:
            out[f"pg_throughput_{workers}w_2h"] = measure_throughput(
                root / f"w{workers}", workers, tasks, "fsync", hosts=2,
                **overrides(url))["tasks_per_s"]
    return out


# ---------------------------------------------------------------------------- the peer
#: One pgqueuer worker process: an entrypoint that runs ``true``, one job at a time (its
#: own limit: pgqueuer's minimum in flight per worker is 2, the semaphore keeps it to 1,
#: as a harness worker runs one task).
_PGQ_WORKER = '''
import asyncio, sys
import psycopg
from pgqueuer import PsycopgDriver, QueueManager
from pgqueuer.queries import Queries

async def main(dsn):
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    qm = QueueManager(Queries(PsycopgDriver(conn)))
    one = asyncio.Semaphore(1)

    @qm.entrypoint("run_true")
    async def run_true(job):
        async with one:
            proc = await asyncio.create_subprocess_exec("true")
            await proc.wait()

    print("ready", flush=True)
    await qm.run(batch_size=1, max_concurrent_tasks=2)

asyncio.run(main(sys.argv[1]))
'''


def pgqueuer_throughput(root: Path, workers: int, tasks: int) -> float:
    """Tasks per second of pgqueuer (same server, its own database) with ``workers``
    worker processes running ``true`` jobs: from the batch enqueue until its queue is
    empty. RuntimeError when pgqueuer is not installed (the bench extra)."""
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        raise RuntimeError("pgqueuer is not installed (pip install -e '.[bench]')") from None
    import asyncio
    import subprocess
    import sys
    import time

    import psycopg
    from pgqueuer import PsycopgDriver
    from pgqueuer.queries import Queries

    root.mkdir(parents=True, exist_ok=True)
    with scratch_database(migrated=False) as url:
        async def connect() -> tuple[psycopg.AsyncConnection[Any], Queries]:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
            return conn, Queries(PsycopgDriver(conn))

        async def install() -> None:
            conn, queries = await connect()
            async with conn:
                await queries.install()

        asyncio.run(install())
        procs = [subprocess.Popen([sys.executable, "-c", _PGQ_WORKER, url],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True) for _ in range(workers)]
        try:
            for proc in procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != b"ready":
                    err = (proc.stderr.read() if proc.stderr else b"").decode()[-300:]
                    raise RuntimeError(f"pgqueuer worker failed: {err}")
            time.sleep(0.5)  # let each worker LISTEN before the batch lands

            async def measure() -> float:
                conn, queries = await connect()
                async with conn:
                    t0 = time.monotonic()
                    await queries.enqueue(["run_true"] * tasks, [None] * tasks, [0] * tasks)
                    deadline = t0 + 600
                    while sum(s.count for s in await queries.queue_size()):
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"pgqueuer: {tasks} jobs not done in 600 s")
                        for proc in procs:
                            if proc.poll() is not None:
                                err = (proc.stderr.read() if proc.stderr else b"").decode()
                                raise RuntimeError(f"pgqueuer worker exited with "
                                                   f"{proc.returncode}: {err[-300:]}")
                        await asyncio.sleep(0.005)  # pgqueuer has no "all done" wake-up
                    return tasks / (time.monotonic() - t0)

            return round(asyncio.run(measure()), 1)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()


def peer(root: Path, quick: bool) -> dict[str, float]:
    """harness on postgres beside pgqueuer, same server, same workload, same run."""
    from .worker_bench import measure_throughput

    with scratch_database() as url:
        ours = measure_throughput(root / "harness", 2, 600, "fsync", hosts=2,
                                  **overrides(url))["tasks_per_s"]
    return {"pg_throughput_2w_600": ours,
            "peer_pgqueuer_2w_600": pgqueuer_throughput(root / "pgq", 2, 600)}
