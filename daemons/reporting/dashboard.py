"""``harness dashboard``: a live terminal dashboard drawn with rich.

One frame shows health and backpressure, queue depth by priority, the workers with their
task and heartbeat age, a throughput sparkline from the newest metrics snapshots, and the
newest events (everything redacted). ``--once`` prints a single frame.

The live mode redraws when anything under coordination/ changes (watchdog's inotify
observer writes a byte into a self-pipe; bursts are coalesced) and at least every
``interval`` seconds (the fallback when inotify is unavailable, and what keeps ages
current). Keys are read from /dev/tty in cbreak mode (no mouse, no special terminal
features, so it works over SSH): ``q`` quits, ``r`` redraws; Ctrl-C, SIGTERM and SIGHUP quit
too. The terminal mode, the cursor and the main screen are always restored.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from coordination import clock
from coordination.errors import HarnessError
from coordination.events import recent_events
from coordination.metrics import recent_snapshots
from coordination.paths import Home
from coordination.redact import redact

from ..wakeup import stop_signals, watch_changes
from .status import collect_status

SPARK_UTF8 = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-=+*#@"
SNAPSHOT_POINTS = 60
EVENT_ROWS = 10
#: Lines of a live frame besides the worker and event rows (header, queue, tables' heads).
FIXED_LINES = 30
HEALTH_STYLE = {"healthy": "bold green", "degraded": "bold yellow", "unhealthy": "bold red"}
SEVERITY_STYLE = {"debug": "dim", "info": "", "warning": "yellow", "error": "red",
                  "critical": "bold red"}
#: watchdog event types that mean a file really changed (not merely opened or read).


def sparkline(values: list[float | None], chars: str = SPARK_UTF8) -> str:
    """One character per value, scaled to the largest; None is a gap."""
    known = [v for v in values if v is not None]
    top = max(known, default=0.0)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif top <= 0:
            out.append(chars[0])
        else:
            out.append(chars[min(len(chars) - 1, int(v / top * (len(chars) - 1) + 0.5))])
    return "".join(out)


def gather(home: Home, now: float | None = None) -> dict[str, Any]:
    """Everything one frame shows (bounded reads; redacted)."""
    data: dict[str, Any] = {"home": str(home.root), "error": None}
    try:
        data["status"] = collect_status(home, now)
    except HarnessError as exc:
        data["status"] = None
        data["error"] = str(exc)
    data["snapshots"] = recent_snapshots(home, SNAPSHOT_POINTS)
    data["events"] = recent_events(home, EVENT_ROWS)
    return redact(data)  # type: ignore[no-any-return]


def _t(value: Any, style: str = "") -> Text:
    """A cell as plain Text: file contents are never parsed as rich markup (a message
    holding "[redacted]" or "[bold]" is shown as it is)."""
    return Text(str(value), style=style)


def _age(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _queue_table(s: dict[str, Any]) -> Table:
    q = s["queue"]
    table = Table(title="Queue", box=box.SIMPLE_HEAD, expand=True, title_justify="left")
    table.add_column("priority", min_width=8, no_wrap=True)
    table.add_column("queued", justify="right", min_width=6, no_wrap=True)
    table.add_column("running", justify="right", min_width=7, no_wrap=True)
    for p, counts in q["by_priority"].items():
        table.add_row(_t(p), _t(counts["queued"]), _t(counts["running"]))
    table.add_row(Text("total", style="bold"), Text(str(q["queued"]), style="bold"),
                  Text(str(q["running"]), style="bold"))
    table.caption = _t(f"oldest queued {_age(q['oldest_queued_age_s'])} · dead letters "
                     f"{q['dead_letters']} · inbox {q['inbox_pending']}")
    table.caption_justify = "left"
    return table


def _throughput_panel(s: dict[str, Any], snapshots: list[dict[str, Any]], chars: str,
                      points: int) -> Table:
    snapshots = sorted(snapshots, key=lambda x: str(x.get("timestamp")))[-points:]
    done = [_num((x.get("throughput") or {}).get("completed_per_min_1m")) for x in snapshots]
    failed = [_num((x.get("throughput") or {}).get("failed_per_min_1m")) for x in snapshots]
    depth = [_num((x.get("queue") or {}).get("queued")) for x in snapshots]
    grid = Table(title=f"Throughput ({len(snapshots)} snapshots)", box=box.SIMPLE_HEAD,
                 title_justify="left", expand=True)
    grid.add_column("series")
    grid.add_column("trend", no_wrap=True, ratio=1)
    grid.add_column("now", justify="right")
    grid.add_row(_t("done/min"), _t(sparkline(done, chars), "green"),
                 _t(_fmt(done[-1] if done else None)))
    grid.add_row(_t("failed/min"), _t(sparkline(failed, chars), "red"),
                 _t(_fmt(failed[-1] if failed else None)))
    grid.add_row(_t("queued"), _t(sparkline(depth, chars), "cyan"),
                 _t(_fmt(depth[-1] if depth else None)))
    tp, d = s["throughput"], s["durations"]
    rate = s.get("success_rate")
    grid.caption = _t(f"last minute: {tp['completed_1m']} done, {tp['failed_1m']} failed · "
                    f"success {'-' if rate is None else f'{rate:.0%}'} · p50 "
                    f"{_fmt(d['task_p50_s'])}s p95 {_fmt(d['task_p95_s'])}s")
    grid.caption_justify = "left"
    return grid


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _fmt(v: Any) -> str:
    if not isinstance(v, int | float):
        return "-"
    return f"{v:g}" if float(v).is_integer() else f"{v:.1f}"


def _workers_table(s: dict[str, Any], max_rows: int | None = None) -> Table:
    wc = s["worker_counts"]
    workers = sorted(s["workers"], key=lambda w: (not w.get("stalled"), w["state"] != "busy",
                                                  str(w["worker_id"])))
    hidden = 0
    if max_rows is not None and len(workers) > max_rows:
        hidden = len(workers) - (max_rows - 1)
        workers = workers[:max_rows - 1]
    table = Table(title=_t(f"Workers: {wc['active']} active, {wc['busy']} busy, "
                           f"{wc['idle']} idle, {wc['stalled']} stalled"),
                  box=box.SIMPLE_HEAD, title_justify="left", expand=True)
    table.add_column("worker", no_wrap=True, overflow="fold")
    table.add_column("state")
    table.add_column("task", no_wrap=True, overflow="fold")
    table.add_column("heartbeat", justify="right")
    table.add_column("running", justify="right")
    table.add_column("done/failed", justify="right")
    table.add_column("note", no_wrap=True, overflow="ellipsis")
    for w in workers:
        style = "bold red" if w.get("stalled") else ("green" if w["state"] == "busy" else "")
        table.add_row(_t(w["worker_id"], style), _t(w["state"]),
                      _t(w.get("current_task_id") or "-"),
                      _t(_age(w.get("heartbeat_age_s"))), _t(_age(w.get("task_age_s"))),
                      _t(f"{w.get('tasks_done') or 0}/{w.get('tasks_failed') or 0}"),
                      _t(w.get("stall_reason") or w.get("error") or "", "red"))
    if hidden:
        table.add_row(_t(f"... {hidden} more (harness status)", "dim"), *[_t("")] * 6)
    if not s["workers"]:
        table.add_row(_t("(no active workers)"), *[_t("")] * 6)
    return table


def _events_table(events: list[dict[str, Any]]) -> Table:
    table = Table(title="Recent events", box=box.SIMPLE_HEAD, title_justify="left",
                  expand=True)
    table.add_column("time", no_wrap=True)
    table.add_column("severity")
    table.add_column("type")
    table.add_column("task", no_wrap=True, overflow="ellipsis", max_width=36)
    table.add_column("message", overflow="fold")
    for e in events:
        stamp = str(e.get("timestamp") or "")
        severity = str(e.get("severity"))
        table.add_row(_t(stamp[11:19] or stamp), _t(severity, SEVERITY_STYLE.get(severity, "")),
                      _t(e.get("type")), _t(e.get("task_id") or "-"),
                      _t(str(e.get("message") or "")[:200]))
    if not events:
        table.add_row(_t(""), _t(""), _t("(no events)"), _t(""), _t(""))
    return table


def render_frame(data: dict[str, Any], *, ascii_only: bool = False,
                 live: bool = False, interval: float = 5.0, width: int = 120,
                 height: int | None = None) -> RenderableType:
    """The whole dashboard as one rich renderable, ``width`` columns wide. With ``height``
    (live mode: the screen), worker and event rows are cut to fit, stalled and busy
    workers first; without it every worker is listed."""
    s = data.get("status")
    now = clock.iso(clock.now())
    if s is None:
        return Panel(Text(f"harness dashboard - {data['home']}\n\n{data.get('error')}",
                          style="red"), title="harness dashboard")
    h = s["health"]
    header = Text()
    header.append("harness dashboard ", style="bold")
    header.append(f"{data['home']}  {now}\n")
    header.append("health: ")
    header.append(h["state"].upper(), style=HEALTH_STYLE.get(h["state"], "bold"))
    header.append(f" ({h['source']})")
    if h["reasons"]:
        header.append(" - " + "; ".join(h["reasons"]))
    header.append("   backpressure: ")
    header.append("ON" if s["backpressure"] else "off",
                  style="bold red" if s["backpressure"] else "green")
    header.append(f" (queued {s['queue']['queued']} / max {s['queue']['max_queue_depth']})")
    paused = ", ".join(sorted(s["paused_types"])) or "none"
    header.append(f"   paused: {paused}")
    top = Table.grid(expand=True, padding=(0, 2))
    top.add_column(ratio=2)
    top.add_column(ratio=3)
    points = max(8, width * 3 // 5 - 32)  # what fits in the trend column
    top.add_row(_queue_table(s), _throughput_panel(s, data.get("snapshots") or [],
                                                   SPARK_ASCII if ascii_only else SPARK_UTF8,
                                                   points))
    events = data["events"]
    max_workers = None
    if height is not None:
        budget = max(6, height - FIXED_LINES)
        event_rows = min(EVENT_ROWS, max(2, budget // 3))
        events = events[-event_rows:]
        max_workers = max(2, budget - event_rows)
    parts: list[RenderableType] = [Panel(header, box=box.ASCII if ascii_only else box.ROUNDED),
                                   top, _workers_table(s, max_workers), _events_table(events)]
    if live:
        parts.append(Text(f"q quit · r redraw · redraws on file changes and every "
                          f"{interval:g}s", style="dim"))
    return Group(*parts)


def _console(width: int | None, color: bool, file: Any = None) -> Console:
    no_color = not color or bool(os.environ.get("NO_COLOR"))
    return Console(file=file, width=width, no_color=no_color, highlight=False,
                   emoji=False, color_system=None if no_color else "auto")


def print_once(home: Home, *, width: int | None = None, color: bool = True) -> None:
    """Print one frame to stdout (``harness dashboard --once``)."""
    if width is None:
        width = shutil.get_terminal_size((120, 40)).columns if sys.stdout.isatty() else \
            int(os.environ.get("COLUMNS") or 120)
    console = _console(width, color and sys.stdout.isatty())
    ascii_only = not (console.encoding or "").lower().startswith("utf")
    console.print(render_frame(gather(home), ascii_only=ascii_only, width=console.width))


# ---------------------------------------------------------------------------- live mode
@contextlib.contextmanager
def _cbreak_tty() -> Iterator[int | None]:
    """A descriptor of the controlling terminal in cbreak mode (None without one); the
    previous mode is restored on exit whatever happens."""
    fd: int | None = None
    owned = False
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
        owned = True
    except OSError:
        if sys.stdin.isatty():
            fd = sys.stdin.fileno()
    if fd is None:
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        if owned:
            os.close(fd)


def run_live(home: Home, *, interval: float = 5.0, color: bool = True,
             debounce: float = 0.25) -> None:
    """Run until q, Ctrl-C, SIGTERM or SIGHUP; restores the terminal on the way out."""
    from rich.live import Live

    console = _console(None, color)
    ascii_only = not (console.encoding or "").lower().startswith("utf")

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with stop_signals(wake_w) as stopped, _cbreak_tty() as key_fd, \
                watch_changes(str(home.coordination), wake_w) as watching, \
                Live(console=console, screen=True, auto_refresh=False,
                     redirect_stdout=False, redirect_stderr=False) as live:
            every = interval if watching else min(interval, 2.0)

            def draw() -> None:
                live.update(render_frame(gather(home), ascii_only=ascii_only, live=True,
                                         interval=every, width=console.width,
                                         height=console.height), refresh=True)

            draw()
            watched = [fd for fd in (key_fd, wake_r) if fd is not None]
            next_draw = time.monotonic() + every
            while not stopped:
                timeout = max(0.0, next_draw - time.monotonic())
                ready, _, _ = select.select(watched, [], [], timeout)
                if stopped:
                    break
                redraw = not ready
                if key_fd is not None and key_fd in ready:
                    keys = os.read(key_fd, 64)
                    if not keys or any(k in keys for k in (b"q", b"Q", b"\x03", b"\x04")):
                        break
                    redraw = redraw or b"r" in keys or b"R" in keys or b"\x0c" in keys
                if wake_r in ready:
                    time.sleep(debounce)  # coalesce a burst of writes into one redraw
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 4096):
                            pass
                    redraw = True
                if redraw:
                    draw()
                    next_draw = time.monotonic() + every
    except KeyboardInterrupt:  # SIGINT before the handler was installed
        pass
    finally:
        os.close(wake_r)
        os.close(wake_w)


__all__ = ["gather", "print_once", "render_frame", "run_live", "sparkline"]
