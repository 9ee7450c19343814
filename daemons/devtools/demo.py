"""``harness demo``: initialise a home, enqueue a small workload, run it in the foreground.

The README's first command (``harness --home ./harness-home demo``). It needs nothing but
the package: the workload is ``sh -c`` one-liners, the workers are this interpreter. The
workload shows the main features: priorities, a task that fails once and succeeds on
attempt 2 (``$HARNESS_ATTEMPT``), a dependency, and a result file with ``tokens_used``.
A status line is printed every second; the command exits 0 once every demo task finished
(1 if one failed for good), or keeps running with ``--keep-running`` until Ctrl-C.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordination import clock
from coordination.config import init_home
from coordination.paths import Home
from coordination.queue import open_queue

from ..supervisor.loop import Tick
from ..supervisor.up import Outcomes, command_prefix, run_up, worker_counts

DEMO_WORKERS = 3


def _sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def demo_requests(correlation_id: str, now: float) -> list[dict[str, Any]]:
    """Twelve small tasks of mixed priorities (0.5-2 s each)."""
    plain = [("critical", 0.5, "hotfix the login page"), ("high", 1.0, "resize thumbnails"),
             ("high", 1.5, "rebuild the search index"), ("medium", 0.8, "lint the repository"),
             ("medium", 2.0, "run the slow test suite"), ("medium", 1.2, "render the docs"),
             ("low", 0.6, "tidy old branches"), ("low", 1.8, "compress the archives"),
             ("low", 0.7, "refresh the sitemap")]
    reqs: list[dict[str, Any]] = []
    for index, (priority, secs, what) in enumerate(plain, start=1):
        reqs.append({
            "description": f"demo {index}: {what}", "priority": priority,
            "command": _sh(f'echo "demo task {index}: {what} ({secs}s, attempt '
                           f'$HARNESS_ATTEMPT)"; sleep {secs}; echo "done: {what}"'),
            "correlation_id": correlation_id})
    reqs.append({
        "description": "demo 10: flaky step (fails on attempt 1, succeeds on attempt 2)",
        "priority": "high", "max_attempts": 3, "correlation_id": correlation_id,
        "command": _sh('echo "flaky step, attempt $HARNESS_ATTEMPT"; sleep 0.5; '
                       'if [ "$HARNESS_ATTEMPT" -lt 2 ]; then '
                       'echo "failing on purpose, the retry will pass" >&2; exit 3; fi; '
                       'echo "passed on attempt $HARNESS_ATTEMPT"')})
    build = clock.new_task_id(now)
    reqs.append({
        "task_id": build, "description": "demo 11: build (writes a result file)",
        "priority": "medium", "correlation_id": correlation_id,
        "command": _sh('echo "building"; sleep 1; '
                       'printf \'{"tokens_used": 42, "artifact": "demo.tar"}\\n\' '
                       '> "$HARNESS_RESULT_FILE"; echo "built"')})
    reqs.append({
        "description": "demo 12: deploy (depends on the build)", "priority": "critical",
        "depends_on": [build], "correlation_id": correlation_id,
        "command": _sh('echo "deploying the build"; sleep 0.5; echo "deployed"')})
    return reqs


def enqueue_demo(home: Home, now: float | None = None) -> tuple[str, list[str]]:
    """Enqueue the demo workload in one commit; returns (correlation id, task ids)."""
    ts = clock.now() if now is None else now
    correlation_id = f"demo-{clock.compact(ts)}"
    results = open_queue(home).enqueue_batch(demo_requests(correlation_id, ts), force=True,
                                            now=ts)
    return correlation_id, [r.task["task_id"] for r in results]


def hints(home: Home) -> list[str]:
    prog, where = command_prefix(home)
    h = f"{prog} --home {where}"
    coord = f"{where}/coordination"

    def rel(path: Path) -> str:
        return f"{where}/{path.relative_to(home.root).as_posix()}"

    return [
        "watch it from another terminal:",
        f"  {h} status                 # queue, workers, health",
        f"  {h} dashboard              # live view",
        f"  {h} events tail -f         # every event as it happens",
        f"  jq -c '.tasks[] | {{task_id, status, priority, attempts, worker_id}}' "
        f"{coord}/task-queue.json",
        f"  jq -c 'select(.final) | {{task_id, outcome, attempts}}' {coord}/task-history.jsonl",
        f"  jq -c 'select(.type | test(\"scale|reclaim|retry\")) | [.timestamp, .type, "
        f".message]' {coord}/dashboard-events.jsonl",
        f"  jq . {rel(home.health_file)}",
        f"task output: {rel(home.task_logs)}/<task_id>.log; worker logs: "
        f"{rel(home.worker_logs)}/",
    ]


def run_demo(home: Home, *, workers: int = DEMO_WORKERS, keep_running: bool = False,
             out: Callable[[str], None] | None = None, status_every_s: float = 1.0) -> int:
    say = out or (lambda line: print(line, flush=True))
    written = init_home(home, force=False)  # what `harness init` does
    say(f"harness demo: home {home.root}"
        + (" (initialised)" if written else " (existing home, config kept)"))
    correlation_id, ids = enqueue_demo(home)
    say(f"enqueued {len(ids)} demo tasks (correlation id {correlation_id}); running "
        f"{workers} workers")
    for line in hints(home):
        say(line)
    progress = Outcomes(home, ids)
    last: dict[str, Any] = {}
    started = time.monotonic()
    announced = [False]

    def status_line(now: float) -> None:
        progress.refresh()
        q = last.get("queue") or {}
        _, busy, idle, starting = worker_counts(last)
        elapsed = time.monotonic() - started
        say(f"[{elapsed:5.1f}s] queue: {q.get('queued', 0)} queued, {q.get('running', 0)} "
            f"running | workers: {busy} busy, {idle} idle"
            f"{', ' + str(starting) + ' starting' if starting else ''} | "
            f"demo: {progress.count('completed')} completed, {progress.count('failed')} "
            f"failed, {len(ids) - len(progress.outcomes)} to go | "
            f"{(last.get('health') or {}).get('health', '?')}")

    def on_pass(report: dict[str, Any]) -> bool:
        last.clear()
        last.update(report)
        progress.refresh()
        # A task's history record is written just before the queue commits its end, so a
        # pass can see every outcome while the queue still lists the last task running:
        # wait for the pass that sees the queue settled too (it comes on that commit).
        if not progress.finished or (report.get("queue") or {}).get("running"):
            return False
        if keep_running:
            if not announced[0]:
                announced[0] = True
                status_line(clock.now())
                say("demo workload finished; still running (Ctrl-C to stop)")
            return False
        status_line(clock.now())
        return True

    code = run_up(home, workers=workers, on_pass=on_pass, out=say,
                  extra_ticks=[Tick("status", status_every_s, status_line)], verbose=True)
    progress.refresh()
    failed = sorted(t for t, s in progress.outcomes.items() if s != "completed")
    if not progress.finished:
        say(f"demo stopped before the workload finished ({len(progress.outcomes)}/{len(ids)}"
            " tasks done)")
        return (code or 0) if keep_running else 1
    if failed:
        say(f"demo finished with {len(failed)} task(s) not completed: {', '.join(failed)}")
        return 1
    say(f"demo finished: all {len(ids)} tasks completed. Try "
        f"`{' --home '.join(command_prefix(home))} task show {ids[-1]} --history`")
    return code
