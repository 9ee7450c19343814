"""Shared test helpers: initialised homes (and one whose numbers are known:
:func:`build_known_home`), file readers, and child processes that are always killed and
reaped.

Import as ``from helpers import ...`` (pytest puts tests/ on sys.path via its conftest).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from coordination import clock
from coordination.config import init_home
from coordination.config_keys import SYSTEM_KEYS
from coordination.jsonl import read_jsonl
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import complete_spec, new_spec, write_spec
from coordination.store import read_json, replace_json

TESTS_DIR = Path(__file__).resolve().parent
PROCS_DIR = TESTS_DIR / "procs"
REPO_ROOT = TESTS_DIR.parent

#: A fixed instant for tests that inject time (2023-11-14T22:13:20Z).
T0 = 1_700_000_000.0

T = TypeVar("T")
_SYSTEM_KEY_NAMES = frozenset(k.name for k in SYSTEM_KEYS)


# ---------------------------------------------------------------------------- tools
#: How to get each external tool some tests need (the Debian package, or pip for our own
#: entry point): the one wording of a skip for a missing tool is :func:`skip_reason`
#: ("needs jq (apt install jq)"); .ci/run installs the packages.
TOOL_INSTALL: dict[str, str] = {
    "bash": "apt install bash", "chromium": "apt install chromium",
    "flock": "apt install util-linux", "jq": "apt install jq",
    "logrotate": "apt install logrotate", "mount": "apt install mount",
    "shellcheck": "apt install shellcheck", "strace": "apt install strace",
    "systemctl": "apt install systemd", "systemd": "apt install systemd",
    "systemd-analyze": "apt install systemd", "systemd-run": "apt install systemd",
    "systemd-socket-activate": "apt install systemd",
    "chromedriver": "apt install chromium-driver",
    "harness": "pip install -e '.[test]' in this checkout's .venv",
    # Not on PATH (Debian keeps initdb and pg_ctl in /usr/lib/postgresql/N/bin):
    # tests/pg_cluster.py looks for them there.
    "PostgreSQL": "apt install postgresql",
}


def skip_reason(*tools: str) -> str:
    """``needs TOOL (HOW TO GET IT)`` for each tool, joined by ``; ``."""
    return "; ".join(f"needs {t} ({TOOL_INSTALL[t]})" for t in tools)


def missing_tools(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def needs(*tools: str) -> pytest.MarkDecorator:
    """A skipif marker: skip unless every tool is on PATH, with :func:`skip_reason`."""
    missing = missing_tools(*tools)
    return pytest.mark.skipif(bool(missing), reason=skip_reason(*(missing or tools)))


# ---------------------------------------------------------------------------- homes
def make_home(tmp_path: Path | str, name: str = "home", **system_overrides: Any) -> Home:
    """An initialised home at ``tmp_path/name`` with system.json defaults plus overrides.

    e.g. ``make_home(tmp_path, retry_backoff_base_s=0, durability="none")``.
    """
    unknown = set(system_overrides) - _SYSTEM_KEY_NAMES
    if unknown:
        raise ValueError(f"unknown system key(s) {sorted(unknown)}")
    home = Home(Path(tmp_path) / name)
    init_home(home, **system_overrides)
    return home


def set_system(home: Home, **overrides: Any) -> None:
    """Change keys of an existing home's system.json (published by rename)."""
    unknown = set(overrides) - _SYSTEM_KEY_NAMES
    if unknown:
        raise ValueError(f"unknown system key(s) {sorted(unknown)}")
    cfg = read_json(home.system_config)
    cfg.update(overrides)
    replace_json(home.system_config, cfg, pretty=True)


def present(value: T | None) -> T:
    """``value``, asserted not None (a task the test knows is live, a claim it knows
    succeeds): the typed form of ``assert x is not None``."""
    assert value is not None
    return value


def req(**fields: Any) -> dict[str, Any]:
    """A minimal valid task request (argv ``["true"]``) plus ``fields``."""
    out: dict[str, Any] = {"command": ["true"]}
    out.update(fields)
    return out


# ---------------------------------------------------------------------------- readers
def queue_on_disk(home: Home) -> dict[str, dict[str, Any]]:
    """The live queue as the files hold it, by task id: what another process reads (a
    fresh queue instance brings task-queue.json up to date, as 1 s of quiet would), then
    task-queue.json parsed with the stdlib json module ({} when absent)."""
    from coordination.queue import FileQueue

    queue = FileQueue(home)
    queue.sync()
    queue.close()
    try:
        raw = json.loads(home.queue_file.read_bytes())
    except FileNotFoundError:
        return {}
    return {t["task_id"]: t for t in raw["tasks"]}


def history(home: Home) -> list[dict[str, Any]]:
    return read_jsonl(home.history_file).records


def final_records(home: Home) -> dict[str, list[dict[str, Any]]]:
    """Final history records grouped by task id."""
    out: dict[str, list[dict[str, Any]]] = {}
    for record in history(home):
        if record.get("final"):
            out.setdefault(record["task_id"], []).append(record)
    return out


def events(home: Home, event_type: str | None = None) -> list[dict[str, Any]]:
    records = read_jsonl(home.events_file).records
    return [e for e in records if event_type is None or e.get("type") == event_type]


def event_counts(home: Home, event_type: str) -> Counter[str]:
    """How many events of ``event_type`` name each task id."""
    return Counter(e["task_id"] for e in events(home, event_type))


def dead_letter_ids(home: Home) -> set[str]:
    return {p.stem for p in home.dead_letters.glob("*.json") if not p.name.startswith(".")}


def temp_files(folder: Path) -> list[str]:
    """Hidden publish-by-rename temp files (``.NAME.tmp-...``) in ``folder``."""
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and ".tmp" in n)


# ---------------------------------------------------------------------------- processes
class Child:
    """One spawned process; stdout and stderr go to files (no pipe can fill up)."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.name = name
        self.popen = popen
        self.out = out
        self.err = err

    @property
    def pid(self) -> int:
        return self.popen.pid

    def lines(self) -> list[str]:
        """Complete (newline-terminated) stdout lines so far; a torn last line is dropped."""
        try:
            data = self.out.read_bytes()
        except FileNotFoundError:
            return []
        text = data.decode(errors="replace")
        complete = text.split("\n")[:-1]
        return [line for line in complete if line]

    def stderr(self) -> str:
        try:
            return self.err.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_line(self, prefix: str, timeout: float = 30.0) -> str:
        """Block until a stdout line starting with ``prefix`` appears."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if line.startswith(prefix):
                    return line
            if self.popen.poll() is not None:
                # One more look: the line may have landed just before exit.
                for line in self.lines():
                    if line.startswith(prefix):
                        return line
                raise AssertionError(f"{self.name} exited with {self.popen.returncode} before "
                                     f"printing {prefix!r}; stderr:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} printed no {prefix!r} line within {timeout}s;"
                                     f" stderr:\n{self.stderr()}")
            time.sleep(0.01)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s; stderr:\n"
                                 f"{self.stderr()}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the child's whole process group (it leads its own session)."""
        if self.popen.poll() is None:
            # Not reaped yet, so its pid (and group id) cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)


class ProcGroup:
    """Spawns children and guarantees every one is killed and reaped on :meth:`close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self._seq = 0

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Child:
        self._seq += 1
        stem = f"{self._seq:04d}-{name}"
        out, err = self.workdir / f"{stem}.out", self.workdir / f"{stem}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                     env=env, cwd=cwd, start_new_session=True)
        child = Child(name, popen, out, err)
        self.children.append(child)
        return child

    def python(self, name: str, script: str, *args: str | Path, **kw: Any) -> Child:
        """Run ``tests/procs/<script>`` with this interpreter."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        return self.spawn(name, [sys.executable, str(PROCS_DIR / script), *map(str, args)],
                          env=env, **kw)

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for child in self.children:
            child.kill(sig)

    def reap(self, children: list[Child] | None = None, timeout: float = 30.0) -> None:
        for child in children if children is not None else self.children:
            child.wait(timeout)

    def close(self) -> None:
        """Kill every child still running and wait for all of them (idempotent)."""
        self.kill_all(signal.SIGKILL)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(30)

    def __enter__(self) -> ProcGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def proc_group(workdir: Path) -> Iterator[ProcGroup]:
    group = ProcGroup(workdir)
    try:
        yield group
    finally:
        group.close()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (so no such process exists)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL)
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------- waiting
def wait_until(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
               interval: float = 0.01) -> Any:
    """Call ``cond`` until it returns something truthy and return that; AssertionError
    naming ``what`` after ``timeout`` seconds (a long default only costs time on failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


#: What a daemon started by a test must not inherit from a test run inside systemd or an
#: operator's shell: it would notify the wrong manager or pick the wrong home.
_DAEMON_ENV_DROP = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                    "HARNESS_INSTANCE", "HARNESS_HOME")


def daemon_env(**extra: str) -> dict[str, str]:
    """This process's environment without systemd's and harness's own variables."""
    env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ENV_DROP}
    env.update(extra)
    return env


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return False
    return data[data.rfind(b")") + 2:].split()[0] not in (b"Z", b"X")


def set_subreaper(on: bool) -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER); False where it is unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(36, 1 if on else 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def reap_zombie_children(timeout: float = 30.0) -> None:
    """Reap zombie children (orphans adopted as subreaper) until none is left."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            zombies = [c.pid for c in psutil.Process().children()
                       if c.status() == psutil.STATUS_ZOMBIE]
        except psutil.Error:
            zombies = []
        for pid in zombies:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if not zombies:
            break
        time.sleep(0.05)


def write_host_limits_dropin(unit_dir: Path) -> Path:
    """The ``kernel-protections`` drop-in of ``harness systemd install --print-dropin`` for
    every harness service in ``unit_dir``: for a manager that cannot apply
    ProtectKernelTunables/ProtectKernelLogs (status 226/NAMESPACE) but the rest of the
    sandbox. Returns the file written."""
    from daemons.systemd_units import DROPINS

    folder = unit_dir / "harness-.service.d"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kernel-protections.conf"
    path.write_text(DROPINS["kernel-protections"])
    return path


# ---------------------------------------------------------------------------- a known home
@dataclass
class Known:
    """A home whose snapshot at ``now`` is known (see :func:`build_known_home`)."""

    home: Home
    base: float
    now: float
    failed_dead: str     # critical task, failed without retry (dead letter), 6 s run
    done_fast: str       # high, completed after 30 s (tokens 100)
    done_slow: str       # high, completed after 60 s (tokens 250)
    retried: str         # medium, failed after 90 s, queued again
    running: str         # medium, running on worker-busy
    low: str             # low, never claimed
    busy_worker: str
    stalled_worker: str
    idle_worker: str


def build_known_home(tmp_path: Path, name: str = "home", base: float | None = None,
                     **overrides: Any) -> Known:
    """Six tasks enqueued at ``base``; claims at base+10..14; finishes at +16, +41, +72,
    +103; snapshot instant ``now`` = base+120. Attempt durations 6, 30, 60, 90 s; waits
    10, 11, 12, 13 s; 2 completed, 2 failed (1 in the last minute each); 2 queued,
    1 running; 1 dead letter; 3 active workers (1 idle, 1 busy, 1 stalled); 2 completed
    worker specs (idle, crashed); max_queue_depth 1, so backpressure is on."""
    base = time.time() - 120 if base is None else base
    settings: dict[str, Any] = {"max_queue_depth": 1, "retry_backoff_base_s": 2,
                                "durability": "none"}
    settings.update(overrides)
    home = make_home(tmp_path, name, **settings)
    q = TaskQueue(home)
    q.enqueue_batch([req(description="crit", priority="critical", max_attempts=1),
                     req(description="high-1", priority="high"),
                     req(description="high-2", priority="high"),
                     req(description="med-1", priority="medium"),
                     req(description="med-2", priority="medium"),
                     req(description="low-1", priority="low")], force=True, now=base)
    claimed = [q.claim(f"worker-w{i}", now=base + 9 + i) for i in range(1, 6)]
    ids = [c["task_id"] for c in claimed if c is not None]
    assert len(ids) == 5
    q.fail(ids[0], "worker-w1", error="boom", retry=False, result={"tokens_used": 7},
           now=base + 16)
    q.complete(ids[1], "worker-w2", result={"tokens_used": 100}, now=base + 41)
    q.complete(ids[2], "worker-w3", result={"tokens_used": 250}, now=base + 72)
    q.fail(ids[3], "worker-w4", error="flaky", retry=True, now=base + 103)
    low = next(t["task_id"] for t in q.live_tasks() if t["priority"] == "low")
    now = base + 120
    busy = new_spec("worker-busy", "busy", base)
    busy.update({"state": "busy", "current_task_id": ids[4],
                 "task_started_at": clock.iso(base + 14), "heartbeat_at": clock.iso(now - 5),
                 "progress": 3})
    stalled = new_spec("worker-stalled", "stalled", base)
    stalled.update({"state": "busy", "current_task_id": "t-gone",
                    "task_started_at": clock.iso(base), "heartbeat_at": clock.iso(now - 200)})
    idle = new_spec("worker-idle", "idle", base)
    idle.update({"state": "idle", "heartbeat_at": clock.iso(now - 1)})
    for spec in (busy, stalled, idle):
        write_spec(home, spec, create=True)
    for worker_id, reason in (("worker-old-1", "idle"), ("worker-old-2", "crashed")):
        write_spec(home, new_spec(worker_id, "old", base), create=True)
        complete_spec(home, worker_id, reason, base + 50)
    return Known(home, base, now, ids[0], ids[1], ids[2], ids[3], ids[4], low,
                 "worker-busy", "worker-stalled", "worker-idle")
