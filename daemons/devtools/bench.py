"""``harness bench``: measure the coordination layer on throwaway homes.

Every benchmark runs ``repeats`` times, each run on a fresh home in a new temporary
directory (deleted afterwards). A run returns one figure per row it reports; a row's
``median``, ``min`` and ``max`` are over its runs. Latency rows (``dispatch_*``,
``reclaim_latency``, ``emit_event_sh_latency``, the ``idle_cpu_*`` windows) take many
samples within one run instead:
their median/min/max and ``p50``/``p95``/``p99`` are over every sample of every run.
``harness bench --list`` names every row; docs/performance.md explains them.

Guarantees: figures are printed, never asserted (no threshold anywhere); a benchmark that
fails (a missing ``jq``, a worker that does not start) yields rows with an ``error`` key and
the others still run; every process a benchmark starts is stopped before the next one runs.
The measurements live beside it: the queue's own costs (daemons/devtools/queue_bench.py),
one module per daemon measured (worker_bench.py, supervisor_bench.py, janitor_bench.py,
web_bench.py), the one-shot commands' memory (rss_bench.py), the host's floors
(floors.py), the peer queue (peer_bench.py) and PostgreSQL's rows (pg_bench.py); this
module is the registry of rows, the runner and the output. docs/performance.md has the
figures of one machine.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from coordination.metrics import percentile

from ..context import json_option, print_json
from .bench_support import Figure
from .queue_bench import (
    calls,
    claim_complete,
    emit_event_latency,
    enqueue_batch,
    enqueue_batch_cli,
    enqueue_singles,
    events_python,
    jq_length,
)
from .rss_bench import oneshot_rss


@dataclass(frozen=True)
class Metric:
    """One row of the output."""

    name: str
    unit: str  # "ms/op", "ms" (per sample) or a rate, e.g. "tasks/s"
    doc: str


@dataclass(frozen=True)
class Bench:
    """A benchmark: ``run(root, quick)`` works at ``root`` (not yet created, in a fresh
    temporary directory) and returns ``{metric name: figure}``. ``repeats`` overrides the
    default number of runs (quick, full), e.g. for benches that sample many times within
    one run."""

    name: str
    groups: tuple[str, ...]
    metrics: tuple[Metric, ...]
    run: Callable[[Path, bool], dict[str, Figure]]
    repeats: tuple[int, int] | None = None
    peer: bool = False  # runs a peer queue (huey): only with --peers
    full_only: bool = False  # too slow for --quick (100,000-task homes) unless named in --only
    postgres: bool = False  # needs a PostgreSQL server: only with --database-url

    def names(self) -> tuple[str, ...]:
        return (*self.groups, self.name, *(m.name for m in self.metrics))


def _web(root: Path, quick: bool) -> dict[str, Figure]:
    from .web_bench import run  # needs the web extra; imported only when this bench runs

    return run(root, quick)


# ---------------------------------------------------------------------------- daemons
def _dispatch(durability: str, suffix: str) -> Callable[[Path, bool], dict[str, Figure]]:
    def run(root: Path, quick: bool) -> dict[str, Figure]:
        from .worker_bench import dispatch_samples

        from_call, from_commit = dispatch_samples(root, 50 if quick else 200, durability)
        return {f"dispatch_latency{suffix}": from_call,
                f"dispatch_latency{suffix}_after_commit": from_commit}
    return run


def _dispatch_floor(root: Path, quick: bool) -> dict[str, Figure]:
    from .floors import dispatch_floor

    return {"dispatch_floor": dispatch_floor(root, 50 if quick else 200)}


def _throughput_floor(root: Path, quick: bool) -> dict[str, Figure]:
    from .floors import throughput_floor

    return {"throughput_floor_2w_600": throughput_floor(root, 2, 600)}


def _throughput(root: Path, quick: bool) -> dict[str, Figure]:
    from .worker_bench import measure_throughput, spawn_ceiling

    spawns, tasks = (200, 100) if quick else (1000, 500)
    out: dict[str, Figure] = {
        "spawn_ceiling": spawn_ceiling(spawns, "subprocess"),
        "spawn_ceiling_posix_spawn": spawn_ceiling(spawns, "posix_spawn")}
    for workers in (1, 2, 4):
        out[f"throughput_{workers}w"] = measure_throughput(
            root, workers, tasks, "fsync")["tasks_per_s"]
    out["throughput_2w_nofsync"] = measure_throughput(root, 2, tasks, "none")["tasks_per_s"]
    return out


def _idle(root: Path, quick: bool) -> dict[str, Figure]:
    from .supervisor_bench import sample_idle

    windows, window_s, warmup = (3, 1.0, 1.0) if quick else (6, 10.0, 5.0)
    got = sample_idle(windows, window_s, warmup_s=warmup, workdir=root.parent)
    sup, wrk = got["supervisor_cpu_percent"], got["worker_cpu_percent"]
    return {"idle_cpu_supervisor": sup, "idle_cpu_worker": wrk,
            "idle_cpu_total": [a + b for a, b in zip(sup, wrk, strict=True)],
            "rss_supervisor": got["supervisor_rss_mib"], "rss_worker": got["worker_rss_mib"]}


def _reclaim(root: Path, quick: bool) -> dict[str, Figure]:
    """Makes this process a child subreaper (the killed workers' tasks are reaped here), so
    it is the last bench in table order."""
    from .supervisor_bench import measure_reclaim_latency

    got = measure_reclaim_latency(5 if quick else 20, workdir=root.parent)
    return {"reclaim_latency": [s * 1000 for s in got["samples_s"]]}


def _host_reclaim(root: Path, quick: bool) -> dict[str, Figure]:
    """A dead host's task reclaimed on its lease by another host's supervisor."""
    from .supervisor_bench import measure_host_reclaim_latency

    got = measure_host_reclaim_latency(2 if quick else 5, workdir=root.parent)
    return {"reclaim_dead_host": [s * 1000 for s in got["samples_s"]]}


def _worker_rss_backlog(root: Path, quick: bool) -> float:
    from .worker_bench import idle_rss_with_backlog

    return idle_rss_with_backlog(root, 100_000)


def _peers(root: Path, quick: bool) -> dict[str, Figure]:
    """600 ``true`` tasks on 2 workers: harness (fsync) and huey SqliteHuey (2 process
    workers; as configured by default, and with its ``fsync=True``, SQLite's
    synchronous=FULL, the durability harness's fsync gives), one after the other in the
    same run."""
    from .peer_bench import peer_throughput
    from .worker_bench import measure_throughput

    ours = measure_throughput(root, 2, 600, "fsync")["tasks_per_s"]
    theirs = peer_throughput(root.parent / "peer", 2, 600)
    theirs_durable = peer_throughput(root.parent / "peer-fsync", 2, 600, fsync=True)
    return {"throughput_2w_600": ours, "peer_huey_2w_600": theirs,
            "peer_huey_2w_600_fsync": theirs_durable}


# ---------------------------------------------------------------------------- registry
def _one(name: str, groups: tuple[str, ...], unit: str, doc: str,
         fn: Callable[[Path, bool], float]) -> Bench:
    return Bench(name, groups, (Metric(name, unit, doc),), lambda r, q: {name: fn(r, q)})


def _pg(name: str, groups: tuple[str, ...], unit: str, doc: str,
        fn: Callable[[Path, bool], float]) -> Bench:
    return dataclasses.replace(_one(name, groups, unit, doc, fn), postgres=True)


def _pg_bench() -> Any:
    from . import pg_bench  # needs the postgres extra; imported only when its benches run

    return pg_bench


_DIST = (1, 1)  # many samples within one run
BENCHES: tuple[Bench, ...] = (
    _one("enqueue_empty", ("enqueue",), "ms/op",
         "single enqueue (Python API) into an empty queue",
         lambda r, q: enqueue_singles(r, q, 0)),
    _one("enqueue_backlog_2000", ("enqueue",), "ms/op", "single enqueue into 2,000 queued",
         lambda r, q: enqueue_singles(r, q, 2000)),
    _one("enqueue_backlog_10000", ("enqueue",), "ms/op", "single enqueue into 10,000 queued",
         lambda r, q: enqueue_singles(r, q, 10000)),
    dataclasses.replace(_one(
        "enqueue_backlog_100000", ("enqueue",), "ms/op", "single enqueue into 100,000 queued",
        lambda r, q: enqueue_singles(r, q, 100_000)), full_only=True, repeats=(1, 3)),
    _one("enqueue_batch", ("enqueue",), "tasks/s", "one enqueue_batch (Python API)",
         lambda r, q: enqueue_batch(r, q, 0)),
    _one("enqueue_batch_backlog_10000", ("enqueue",), "tasks/s",
         "one enqueue_batch into 10,000 queued", lambda r, q: enqueue_batch(r, q, 10000)),
    _one("enqueue_batch_cli", ("enqueue",), "tasks/s",
         "`harness task add --from-file PATH`, one process", enqueue_batch_cli),
    _one("enqueue_cli", ("enqueue", "calls"), "tasks/s",
         "`harness task add`, one process per task, one bash loop",
         calls("cli:task", (5, 30))),
    _one("enqueue_cli_backlog_10000", ("enqueue",), "tasks/s",
         "`harness task add` per task into 10,000 queued",
         calls("cli:task", (5, 30), backlog=10000)),
    _one("enqueue_cli_x4", ("enqueue", "calls"), "tasks/s",
         "`harness task add`, 4 bash loops in parallel", calls("cli:task", (2, 15), 4)),
    _one("enqueue_create_task_sh", ("enqueue", "calls"), "tasks/s",
         "scripts/create-task.sh per task, one bash loop (inbox only)",
         calls("create-task.sh", (20, 200))),
    _one("enqueue_create_task_sh_x4", ("enqueue", "calls"), "tasks/s",
         "scripts/create-task.sh, 4 bash loops in parallel",
         calls("create-task.sh", (10, 100), 4)),
    _one("claim_complete_100", ("claim",), "ms/op", "claim + complete with 100 live tasks",
         lambda r, q: claim_complete(r, q, 100)),
    _one("claim_complete_1000", ("claim",), "ms/op", "claim + complete with 1,000 live",
         lambda r, q: claim_complete(r, q, 1000)),
    _one("claim_complete_10000", ("claim",), "ms/op", "claim + complete with 10,000 live",
         lambda r, q: claim_complete(r, q, 10000)),
    dataclasses.replace(_one(
        "claim_complete_100000", ("claim",), "ms/op", "claim + complete with 100,000 live",
        lambda r, q: claim_complete(r, q, 100_000)), full_only=True, repeats=(1, 3)),
    _one("events_python", ("events",), "events/s", "coordination.events.emit",
         events_python),
    _one("events_emit_event_sh", ("events", "calls"), "events/s",
         "scripts/emit-event.sh per event, one bash loop", calls("emit-event.sh", (50, 200))),
    _one("events_emit_event_sh_x4", ("events", "calls"), "events/s",
         "scripts/emit-event.sh, 4 bash loops in parallel",
         calls("emit-event.sh", (25, 100), 4)),
    Bench("emit_event_sh_latency", ("events", "calls"), (
        Metric("emit_event_sh_latency", "ms", "one scripts/emit-event.sh call, timed in bash"),
    ), lambda r, q: {"emit_event_sh_latency": emit_event_latency(r, q)}, _DIST),
    _one("events_cli", ("events", "calls"), "events/s",
         "`harness events emit` per event, one bash loop", calls("cli:events", (5, 30))),
    _one("events_cli_x4", ("events", "calls"), "events/s",
         "`harness events emit`, 4 bash loops in parallel", calls("cli:events", (2, 15), 4)),
    Bench("dispatch", ("dispatch",), (
        Metric("dispatch_latency", "ms", "enqueue call -> task process started, idle worker"),
        Metric("dispatch_latency_after_commit", "ms", "enqueue returned -> task started"),
    ), _dispatch("fsync", ""), _DIST),
    Bench("dispatch_nofsync", ("dispatch",), (
        Metric("dispatch_latency_nofsync", "ms", "the same with durability none"),
        Metric("dispatch_latency_nofsync_after_commit", "ms", "the same, from the return"),
    ), _dispatch("none", "_nofsync"), _DIST),
    Bench("dispatch_floor", ("dispatch", "floors"), (
        Metric("dispatch_floor", "ms", "the host's floor under dispatch_latency, no queue: "
               "line + fdatasync -> inotify -> folder, log, date (devtools/floors.py)"),
    ), _dispatch_floor, _DIST),
    Bench("throughput", ("throughput",), (
        Metric("spawn_ceiling", "procs/s", "subprocess.run(['true']) in a loop"),
        Metric("spawn_ceiling_posix_spawn", "procs/s", "os.posix_spawn + waitpid of true"),
        Metric("throughput_1w", "tasks/s", "`true` tasks end to end, 1 worker"),
        Metric("throughput_2w", "tasks/s", "`true` tasks end to end, 2 workers"),
        Metric("throughput_4w", "tasks/s", "`true` tasks end to end, 4 workers"),
        Metric("throughput_2w_nofsync", "tasks/s", "2 workers, durability none"),
    ), _throughput, (2, 3)),
    Bench("idle", ("idle", "rss"), (
        Metric("idle_cpu_supervisor", "%core", "idle supervisor, per window"),
        Metric("idle_cpu_worker", "%core", "its idle worker, per window"),
        Metric("idle_cpu_total", "%core", "supervisor + worker, per window"),
        Metric("rss_supervisor", "MiB", "idle supervisor resident set"),
        Metric("rss_worker", "MiB", "idle worker resident set"),
    ), _idle, _DIST),
    Bench("rss_worker_backlog", ("rss",), (
        Metric("rss_worker_100000", "MiB", "idle worker (its type paused), 100,000 queued"),
    ), lambda r, q: {"rss_worker_100000": _worker_rss_backlog(r, q)}, (1, 1), full_only=True),
    Bench("jq_length", ("jq",), (
        Metric("jq_length_10000", "ms", "jq '.tasks | length' task-queue.json, 10,000 queued"),
    ), lambda r, q: {"jq_length_10000": jq_length(r, q)}, _DIST),
    Bench("rss_oneshot", ("rss",), (
        Metric("rss_janitor_run", "MiB", "peak RSS of `harness janitor run`"),
        Metric("rss_metrics_snapshot", "MiB", "peak RSS of `harness metrics snapshot`"),
        Metric("rss_cli_baseline", "MiB", "peak RSS of `harness --version`"),
    ), oneshot_rss),
    Bench("reclaim", ("reclaim",), (
        Metric("reclaim_latency", "ms", "SIGKILL of a busy worker -> its task queued again"),
    ), _reclaim, _DIST),
    Bench("reclaim_dead_host", ("reclaim",), (
        Metric("reclaim_dead_host", "ms", "SIGKILL of a host (worker + task) -> its task "
               "queued again by another host's supervisor, on the lease (timeout 5 s)"),
    ), _host_reclaim, _DIST),
    Bench("throughput_floor", ("throughput", "peers", "floors"), (
        Metric("throughput_floor_2w_600", "tasks/s", "the host's floor under "
               "throughput_2w_600: 2 workers, one fdatasync'd append, folder, log, true"),
    ), _throughput_floor, (1, 3)),
    Bench("peers", ("peers",), (
        Metric("throughput_2w_600", "tasks/s", "600 `true` tasks, 2 workers, fsync (harness)"),
        Metric("peer_huey_2w_600", "tasks/s", "the same on huey SqliteHuey, 2 process workers"),
        Metric("peer_huey_2w_600_fsync", "tasks/s", "the same with huey's fsync=True "
                                                    "(SQLite synchronous=FULL)"),
    ), _peers, (1, 3), peer=True),
    Bench("web", ("web",), (
        Metric("web_overview", "ms", "harness web: GET / with 10,000 live tasks and 100,000 "
                                     "history records (quick: a fifth)"),
        Metric("web_overview_cpu", "ms", "server CPU time of that GET / (user + system)"),
        Metric("web_idle_sse_cpu_50", "%core", "harness web process with 50 idle event "
                                              "streams open, per window"),
    ), lambda r, q: _web(r, q), _DIST),
    # The postgres backend (daemons/devtools/pg_bench.py): only with --database-url.
    _pg("pg_claim_complete_1", ("postgres", "claim"), "ms/op",
        "postgres: claim + complete with 1 queued (the refill enqueue untimed)",
        lambda r, q: _pg_bench().claim_complete(r, q, 1)),
    dataclasses.replace(_pg(
        "pg_claim_complete_100000", ("postgres", "claim"), "ms/op",
        "postgres: claim + complete with 100,000 queued (refill untimed)",
        lambda r, q: _pg_bench().claim_complete(r, q, 100_000)), full_only=True,
        repeats=(1, 3)),
    Bench("pg_dispatch", ("postgres", "dispatch"), (
        Metric("pg_dispatch_latency", "ms", "postgres: enqueue call -> task started, idle "
                                            "worker woken by LISTEN/NOTIFY"),
        Metric("pg_dispatch_latency_after_commit", "ms", "the same, from the return"),
    ), lambda r, q: dict(_pg_bench().dispatch(r, q)), _DIST, postgres=True),
    Bench("pg_throughput", ("postgres", "throughput"), (
        Metric("pg_throughput_2w_2h", "tasks/s", "postgres: `true` tasks end to end, 2 "
                                                 "workers on 2 simulated hosts"),
        Metric("pg_throughput_4w_2h", "tasks/s", "the same, 4 workers on 2 hosts"),
    ), lambda r, q: dict(_pg_bench().throughput(r, q)), (2, 3), postgres=True),
    Bench("pg_peers", ("postgres", "peers"), (
        Metric("pg_throughput_2w_600", "tasks/s", "600 `true` tasks, 2 workers on 2 hosts, "
                                                  "postgres (harness)"),
        Metric("peer_pgqueuer_2w_600", "tasks/s", "the same on pgqueuer, 2 worker "
                                                  "processes, same server"),
    ), lambda r, q: dict(_pg_bench().peer(r, q)), (1, 3), peer=True, postgres=True),
)

#: (row, reference row, field): the row gets ``field`` relating it to the reference when
#: both ran. "slowdown" fields are cost ratios (>1: the row is slower), "ratio"/"speedup"
#: fields divide the row's median by the reference's.
RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("enqueue_backlog_2000", "enqueue_empty", "slowdown_vs_empty"),
    ("enqueue_backlog_10000", "enqueue_empty", "slowdown_vs_empty"),
    ("enqueue_backlog_100000", "enqueue_empty", "slowdown_vs_empty"),
    ("claim_complete_10000", "claim_complete_100", "slowdown_vs_empty"),
    ("claim_complete_100000", "claim_complete_100", "slowdown_vs_empty"),
    ("pg_claim_complete_100000", "pg_claim_complete_1", "slowdown_vs_empty"),
    ("pg_throughput_2w_2h", "throughput_2w", "ratio_to_file"),
    ("pg_throughput_4w_2h", "throughput_4w", "ratio_to_file"),
    ("throughput_2w_600", "peer_huey_2w_600", "ratio_to_peer"),
    ("throughput_floor_2w_600", "peer_huey_2w_600", "ratio_to_peer"),
    ("dispatch_latency", "dispatch_floor", "ratio_to_floor"),
    ("throughput_2w_600", "throughput_floor_2w_600", "ratio_to_floor"),
    ("pg_throughput_2w_600", "peer_pgqueuer_2w_600", "ratio_to_peer"),
    ("enqueue_batch_backlog_10000", "enqueue_batch", "slowdown_vs_empty"),
    ("enqueue_cli_backlog_10000", "enqueue_cli", "slowdown_vs_empty"),
    ("enqueue_cli_x4", "enqueue_cli", "speedup_vs_sequential"),
    ("enqueue_create_task_sh_x4", "enqueue_create_task_sh", "speedup_vs_sequential"),
    ("events_emit_event_sh_x4", "events_emit_event_sh", "speedup_vs_sequential"),
    ("events_cli_x4", "events_cli", "speedup_vs_sequential"),
    *((f"throughput_{w}", "spawn_ceiling", "ratio_to_ceiling")
      for w in ("1w", "2w", "4w", "2w_nofsync")),
)


def metric_names() -> list[str]:
    return [m.name for b in BENCHES for m in b.metrics]


def select(only: tuple[str, ...], peers: bool = False, quick: bool = False,
           database: bool = False) -> list[Bench]:
    """The benches ``--only`` picks: each text that is exactly a group, bench or row name
    selects by that name; any other text selects every bench whose names contain it.
    Peer benches run only with ``peers``, postgres benches only with ``database`` (a
    server to use); with ``quick`` and no ``--only``, the benches on 100,000-task homes
    are left out."""
    exact = {n for b in BENCHES for n in b.names()}

    def picks(o: str, b: Bench) -> bool:
        return o in b.names() if o in exact else any(o in n for n in b.names())

    return [b for b in BENCHES if (peers or not b.peer) and (database or not b.postgres)
            and (any(picks(o, b) for o in only) if only else not (quick and b.full_only))]


# ---------------------------------------------------------------------------- running
def _row(bench: Bench, metric: Metric, runs: list[dict[str, Figure]],
         error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"name": metric.name, "group": bench.groups[0], "bench": bench.name,
                           "unit": metric.unit, "doc": metric.doc, "runs": len(runs)}
    values: list[float] = []
    dist = False
    for run in runs:
        figure = run.get(metric.name)
        if isinstance(figure, list):
            dist = True
            values.extend(figure)
        elif figure is not None:
            values.append(figure)
    if values:
        ordered = sorted(values)
        row.update(median=statistics.median(ordered), min=ordered[0], max=ordered[-1])
        if dist:
            row.update(n=len(ordered), p50=percentile(ordered, 0.5),
                       p95=percentile(ordered, 0.95), p99=percentile(ordered, 0.99))
    if error:
        row["error"] = error
    return row


def _relate(rows: list[dict[str, Any]]) -> None:
    by_name = {r["name"]: r for r in rows if "median" in r}
    for name, ref_name, fld in RELATIONS:
        row, ref = by_name.get(name), by_name.get(ref_name)
        if row is None or ref is None or not ref["median"] or not row["median"]:
            continue
        if fld.startswith("slowdown"):
            rate = row["unit"].endswith("/s")
            row[fld] = ref["median"] / row["median"] if rate else row["median"] / ref["median"]
        else:
            row[fld] = row["median"] / ref["median"]
        if fld == "ratio_to_ceiling":
            row["ceiling"] = ref["median"]


def run_benches(quick: bool, only: tuple[str, ...], repeat: int | None,
                progress: Callable[[str], None] | None = None,
                peers: bool = False, database: bool = False) -> list[dict[str, Any]]:
    """Run the benches :func:`select` picks (all when ``only`` is empty) and return their
    rows in table order."""
    rows: list[dict[str, Any]] = []
    for bench in select(only, peers, quick, database):
        default = bench.repeats or (3, 5)
        repeats = repeat or (default[0] if quick else default[1])
        runs: list[dict[str, Figure]] = []
        error = None
        started = time.monotonic()
        for i in range(repeats):
            if progress:
                progress(f"{bench.name} {i + 1}/{repeats}")
            with tempfile.TemporaryDirectory(prefix="harness-bench-",
                                             ignore_cleanup_errors=True) as tmp:
                try:
                    runs.append(bench.run(Path(tmp) / "home", quick))
                except Exception as exc:  # reported in the rows; the other benches run
                    error = f"{type(exc).__name__}: {exc}"
                    break
        seconds = round(time.monotonic() - started, 2)
        rows.extend(dict(_row(bench, m, runs, error), bench_seconds=seconds)
                    for m in bench.metrics)
    _relate(rows)
    return rows


# ---------------------------------------------------------------------------- output
def _fmt(value: float) -> str:
    size = abs(value)
    if size >= 1000:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


_NOTES = (("p95", "p95"), ("p99", "p99"), ("n", "n"), ("ceiling", "ceiling"),
          ("ratio_to_ceiling", "ratio"), ("slowdown_vs_empty", "slowdown"),
          ("speedup_vs_sequential", "speedup"), ("ratio_to_peer", "vs peer"),
          ("ratio_to_file", "vs file"), ("ratio_to_floor", "vs floor"))


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row under a header per group: median, min, max, unit, then notes
    (percentiles, ratios) or the error."""
    lines = [f"{'benchmark':<38} {'median':>9} {'min':>9} {'max':>9}  {'unit':<8} notes"]
    group = None
    for r in rows:
        if r["group"] != group:
            group = r["group"]
            lines.append(f"[{group}]")
        if "median" not in r:
            lines.append(f"{r['name']:<38} {'-':>9} {'-':>9} {'-':>9}  {r['unit']:<8} "
                         f"error: {r.get('error')}")
            continue
        notes = "  ".join(f"{label} {r[key] if key == 'n' else _fmt(r[key])}"
                          for key, label in _NOTES if key in r)
        if r.get("error"):
            notes += f"  error after {r['runs']} run(s): {r['error']}"
        lines.append(f"{r['name']:<38} {_fmt(r['median']):>9} {_fmt(r['min']):>9} "
                     f"{_fmt(r['max']):>9}  {r['unit']:<8} {notes}".rstrip())
    return lines


def register(group: click.Group) -> None:
    group.add_command(bench)


@click.command()
@click.option("--quick", is_flag=True,
              help="Fewer operations and repeats, and no 100,000-task homes unless named in "
                   "--only (for CI).")
@click.option("--only", multiple=True,
              help="Run the benches of this group (enqueue, calls, claim, events, "
                   "dispatch, throughput, idle, rss, jq, reclaim, web, peers, postgres, floors), "
                   "bench or row name; any other "
                   "text: those whose names contain it (repeatable).")
@click.option("--repeat", type=click.IntRange(1, 50), help="Runs per benchmark.")
@click.option("--list", "list_only", is_flag=True, help="List the rows and exit.")
@click.option("--peers", is_flag=True,
              help="Also run the same workload on a peer queue (huey SqliteHuey; needs the "
                   "bench extra: pip install -e '.[bench]').")
@click.option("--database-url", metavar="URL", envvar="HARNESS_BENCH_DATABASE_URL",
              help="Also run the postgres backend's benches (group postgres) on this server "
                   "(each run in a database of its own, created and dropped; the role needs "
                   "CREATEDB; needs the postgres extra). Default: "
                   "$HARNESS_BENCH_DATABASE_URL.")
@json_option
def bench(quick: bool, only: tuple[str, ...], repeat: int | None, list_only: bool,
          peers: bool, database_url: str | None, as_json: bool) -> None:
    """Measure enqueue, claim, event, dispatch, throughput, idle and reclaim costs on
    throwaway homes.

    Each figure is the median of repeated runs (latencies: of all samples) with min and
    max. No figure is judged; a bench that fails reports its error in its rows, the others
    still run, and the exit status is then 1 (so CI notices a bench that rotted).
    """
    if list_only:
        for b in BENCHES:
            for m in b.metrics:
                click.echo(f"{m.name:<38} {','.join(b.groups):<15} {m.unit:<8} {m.doc}")
        return
    def progress(text: str) -> None:
        click.echo(f"bench: {text}", err=True)

    if database_url:
        # read by daemons/devtools/pg_bench.py
        os.environ["HARNESS_BENCH_DATABASE_URL"] = database_url
    rows = run_benches(quick, only, repeat, progress if sys.stderr.isatty() else None, peers,
                       bool(database_url))
    if as_json:
        print_json(rows)
    else:
        for line in format_table(rows):
            click.echo(line)
    if any("error" in row for row in rows):
        sys.exit(1)
