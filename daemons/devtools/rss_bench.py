"""Peak resident memory of one-shot commands for ``harness bench`` (rows ``rss_*``), read
from each child's own rusage by a small probe process."""

from __future__ import annotations

import subprocess
import sys
from contextlib import closing
from pathlib import Path

from coordination.events import emit
from coordination.queue import open_queue

from .bench_support import Figure, check_exit, child_env, fill, harness_cmd, make_home

#: Spawns argv[1:], waits for it with wait4 and prints its exit status and ru_maxrss (KiB).
_RSS_PROBE = """
import os, sys
devnull = os.open(os.devnull, os.O_WRONLY)
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ,
                     file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1)])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def run_with_peak_rss(argv: list[str], env: dict[str, str]) -> tuple[int, int]:
    """Run ``argv`` (stdout and stderr discarded); return (exit status, its peak RSS in
    KiB), read from its own rusage by a small ``python -S`` probe process. Not from this
    process: Linux carries the parent's RSS high-water mark into a child's ru_maxrss
    across fork/vfork + exec, and this process can be large."""
    proc = subprocess.run([sys.executable, "-S", "-c", _RSS_PROBE, *argv], env=env,
                          stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, check=False)
    check_exit(proc, "the RSS probe")
    code, kib = proc.stdout.split()[-2:]
    return int(code), int(kib)


def peak_rss_mib(argv: list[str], env: dict[str, str]) -> float:
    code, kib = run_with_peak_rss(argv, env)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv[-3:])} exited with {code}")
    return kib / 1024


def oneshot_rss(root: Path, quick: bool) -> dict[str, Figure]:
    """Peak RSS (MiB) of `janitor run` and `metrics snapshot` on a small home, and of
    `harness --version` (the CLI's baseline)."""
    home = make_home(root)
    with closing(open_queue(home, shared=False)) as queue:
        fill(queue, 100)
    for i in range(50):
        emit(home, "bench_event", message=f"event {i}", source="bench")
    harness = harness_cmd()
    env = child_env()
    base = [*harness, "--home", str(home.root)]
    return {"rss_janitor_run": peak_rss_mib([*base, "janitor", "run"], env),
            "rss_metrics_snapshot": peak_rss_mib([*base, "metrics", "snapshot"], env),
            "rss_cli_baseline": peak_rss_mib([*harness, "--version"], env)}
