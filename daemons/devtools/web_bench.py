"""``harness bench --only web``: the dashboard's server time and the cost of idle streams.

One run builds a large home (:func:`daemons.devtools.observability_bench.make_large_home`: 10,000
live tasks, 100,000 history records, 50 workers, two hours of snapshots; ``--quick``: a
fifth of the tasks and history), starts ``harness web`` on it as a real process, and
measures

- ``web_overview``: the wall time of ``GET /`` (the whole overview page, rendered afresh
  each time: full pages are never cached), one sample per request over loopback HTTP;
- ``web_overview_cpu``: the server process's CPU time for that request, the steadier
  figure on a busy machine;
- ``web_idle_sse_cpu_50``: the CPU the server process (every thread) uses while 50
  clients hold ``/stream`` open and nothing changes, in % of one core, one sample per
  window (5 s; quick 2 s), from the scheduler's nanosecond counters.

Figures are reported, never asserted (docs/performance.md).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from .bench_support import Figure, child_env, harness_cmd
from .observability_bench import make_large_home

SSE_CLIENTS = 50


def _start(home: Path) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen([*harness_cmd(), "web", "--home", str(home),
                             "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(),
                            start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("harness web: serving"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"harness web did not start: {line.strip()!r}")
    port = int(line.split(" at http://127.0.0.1:", 1)[1].split("/", 1)[0])
    return proc, port


def _get(port: int, path: str) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}")
    finally:
        conn.close()
    return (time.perf_counter() - start) * 1000


def _open_stream(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    data = b""
    while b"event: hello" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the event stream closed before its hello")
        data += chunk
    return sock


def _cpu_seconds(process: psutil.Process) -> float:
    """CPU time of every thread of ``process``: from the scheduler's nanosecond counters
    (``/proc/PID/task/*/schedstat``) where there are any, else psutil's 10 ms ticks."""
    total, found = 0, False
    try:
        for task in os.listdir(f"/proc/{process.pid}/task"):
            try:
                with open(f"/proc/{process.pid}/task/{task}/schedstat", "rb") as fh:
                    total += int(fh.read().split()[0])
                found = True
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                continue
    except FileNotFoundError:
        pass
    if found:
        return total / 1e9
    times = process.cpu_times()
    return float(times.user + times.system)


def run(root: Path, quick: bool) -> dict[str, Figure]:
    scale = 5 if quick else 1
    home = make_large_home(root, history=100_000 // scale, live=10_000 // scale,
                           events=20_000, snapshots=120)
    proc, port = _start(home.root)
    streams: list[socket.socket] = []
    try:
        server = psutil.Process(proc.pid)
        _get(port, "/")  # the first request parses the queue once; the figure is warm
        overview: list[float] = []
        overview_cpu: list[float] = []
        for _ in range(5 if quick else 10):
            cpu_before = _cpu_seconds(server)
            overview.append(_get(port, "/"))
            overview_cpu.append(1000 * (_cpu_seconds(server) - cpu_before))
        streams = [_open_stream(port) for _ in range(SSE_CLIENTS)]
        time.sleep(0.5)
        windows = []
        for _ in range(3):
            before, start = _cpu_seconds(server), time.perf_counter()
            time.sleep(2.0 if quick else 5.0)
            used, seconds = _cpu_seconds(server) - before, time.perf_counter() - start
            windows.append(100.0 * used / seconds)
        if proc.poll() is not None:
            raise RuntimeError(f"harness web exited with {proc.returncode}")
        return {"web_overview": overview, "web_overview_cpu": overview_cpu,
                "web_idle_sse_cpu_50": windows}
    finally:
        for sock in streams:
            sock.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
