"""`harness bench --database-url`: the postgres benches run, report well-formed rows and
leave no database behind. No speed is asserted (figures vary by machine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import psycopg
from pg_cluster import Cluster
from test_bench import bench_env

from daemons.devtools import bench as bench_mod


def test_postgres_benches_run_only_with_a_server() -> None:
    names = {b.name for b in bench_mod.select((), quick=True)}
    assert not any(n.startswith("pg_") for n in names)
    with_db = {b.name for b in bench_mod.select((), quick=True, database=True)}
    assert {"pg_claim_complete_1", "pg_dispatch", "pg_throughput"} <= with_db
    assert "pg_claim_complete_100000" not in with_db  # full runs only (100,000 tasks)
    assert "pg_peers" in {b.name for b in bench_mod.select((), True, True, True)}


def test_postgres_benches_report_rows_and_drop_their_databases(
        pg_cluster: Cluster, procs: Any, tmp_path: Path) -> None:
    admin = pg_cluster.url(pg_cluster.admin_db)
    child = procs.spawn("bench", [sys.executable, "-m", "daemons", "bench", "--quick",
                                  "--repeat", "1", "--json", "--database-url", admin,
                                  "--only", "pg_claim_complete_1", "--only", "pg_dispatch"],
                        env=bench_env(tmp_path))
    assert child.wait(240) == 0, child.stderr()
    rows = {r["name"]: r for r in json.loads(child.out.read_text())}
    assert set(rows) == {"pg_claim_complete_1", "pg_dispatch_latency",
                         "pg_dispatch_latency_after_commit"}
    for row in rows.values():
        assert "error" not in row and row["median"] > 0, row
        assert row["min"] <= row["median"] <= row["max"]
    assert rows["pg_dispatch_latency"]["n"] == 50
    assert rows["pg_dispatch_latency_after_commit"]["median"] <= \
        rows["pg_dispatch_latency"]["median"]
    with psycopg.connect(admin) as conn:
        left = conn.execute("SELECT datname FROM pg_database "
                            "WHERE datname LIKE 'harness_bench_%'").fetchall()
    assert left == []
