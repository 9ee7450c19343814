"""``harness supervisor run``: the loop around :meth:`~.reconcile.Supervisor.reconcile`.

:func:`run_supervisor` waits on a :class:`~daemons.wakeup.Wakeup` (inotify on coordination/
and the inbox, signals) with the timeout ``supervisor_tick_s``, and on a
:class:`~.pidwatch.PidWatcher` (a pidfd per worker process: the loop wakes the instant a
worker dies, which inotify cannot see). Signal handlers only set flags. It holds
``locks/supervisor.lock`` for its life, runs the side jobs of ``harness up``
(:class:`Tick`) and, with a process actuator, stops the workers it started (and those it
adopted) when it stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import psutil

from coordination import clock
from coordination.config import ConfigWatch, keep_last_good, load_system
from coordination.errors import EXIT_USAGE, ConfigError, HarnessError, LockTimeout, TemporaryFailure
from coordination.locks import lock_for
from coordination.paths import Home
from coordination.queue import open_queue
from coordination.specs import read_specs

from ..notify import Notifier
from ..process_groups import reap_orphans
from ..wakeup import Wakeup
from .actuators import Actuator, ProcessActuator, make_actuator
from .pidwatch import PidWatcher
from .reclaim import _same_host
from .reconcile import Supervisor
from .state import _emit

CONFIG_RETRY_S = 2.0  # a supervisor started on a bad config re-reads it this often
#: The loop wakes this long after the next lease may expire (timestamps have ms precision).
LEASE_WAKE_LATE_S = 0.005


@dataclass
class Tick:
    """A periodic side job of the loop (janitor, metrics snapshot, status line)."""

    name: str
    every_s: float
    func: Callable[[float], Any]
    next_at: float = 0.0  # monotonic
    errors: int = 0


@dataclass
class _Flags:
    stop: int = 0
    reload: bool = False
    signals: list[int] = field(default_factory=list)


def status_text(report: Mapping[str, Any]) -> str:
    """The one-line STATUS= shown by ``systemctl status``."""
    q = report.get("queue") or {}
    w = report.get("workers") or {}
    health = (report.get("health") or {}).get("health", "?")
    return (f"{health}; queued {q.get('queued', 0)} (runnable {q.get('runnable', 0)}), "
            f"running {q.get('running', 0)}; workers {w.get('running', 0)} "
            f"(busy {w.get('busy', 0)}, idle {w.get('idle', 0)})"
            + ("; BACKPRESSURE" if report.get("backpressure") else ""))


def kill_descendants(timeout: float = 5.0) -> list[int]:
    """SIGKILL every remaining descendant (orphaned task processes adopted while we were a
    subreaper) and reap them; returns their pids."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=timeout)
    reap_orphans(())
    return [p.pid for p in procs]


def run_supervisor(home: Home, *, actuator: Actuator | None = None,
                   actuator_name: str | None = None,
                   overrides: Mapping[str, Any] | None = None, once: bool = False,
                   ticks: Iterable[Tick] = (), on_pass: Callable[[dict[str, Any]], bool] | None
                   = None, out: Callable[[str], None] | None = None,
                   stop_workers: bool = True, adopt_orphans: bool = False,
                   verbose: bool = True, scale: bool = True) -> int:
    """Run the supervisor loop until SIGTERM/SIGINT (or ``once`` pass, or ``on_pass``
    returning True). Returns the exit status.

    Holds ``locks/supervisor.lock`` for its life: a second supervisor on the same home
    exits 75. With a process actuator, stopping drains the workers: SIGTERM (they finish or
    hand back their task within stop_grace_s), a second signal ends their grace, a third
    kills them; no child outlives the loop. ``adopt_orphans`` makes this process the
    subreaper of its descendants, so task processes of a crashed worker are reaped and,
    at exit, killed. ``scale`` False runs without an actuator (reclaim, stalls, health and
    circuits only: the fleet is sized by someone else).
    """
    say = out or (lambda line: print(line, flush=True))
    home.require()
    lock = lock_for(home.supervisor_lock)
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        raise TemporaryFailure(f"another supervisor is running on {home.root} (it holds "
                               f"{home.supervisor_lock})") from None
    flags = _Flags()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        flags.stop += 1
        flags.signals.append(signum)

    def on_reload(signum: int, frame: FrameType | None) -> None:
        flags.reload = True

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop),
                 (signal.SIGHUP, on_reload))}
    notifier = Notifier()
    wakeup = Wakeup(home)
    watcher = PidWatcher(wakeup.set)
    sup: Supervisor | None = None
    ticks = list(ticks)
    keep_before = keep_last_good()  # restored when the loop ends (see the finally)
    try:
        if adopt_orphans:
            from ..process_groups import become_subreaper

            become_subreaper()
        wakeup.start()
        watcher.start()
        # A bad system.json never stops the supervisor: it runs on the last good values
        # and reports config_invalid; started with a bad file, it waits for a good one.
        config_watch = ConfigWatch()
        while True:
            _emit_config_events(home, config_watch)
            try:
                cfg = dict(load_system(home).values)
                break
            except ConfigError as exc:
                say(f"supervisor: waiting for a valid config: {exc}")
                if flags.stop or once:
                    return EXIT_USAGE
                wakeup.wait(CONFIG_RETRY_S)
                wakeup.clear()
        cfg.update(overrides or {})
        wakeup.follow_queue(open_queue(home))  # the config names the backend: after it
        wakeup.keep_view(open_queue(home))  # this host's jq view, <= 1 s stale
        if actuator is None and scale:
            actuator = make_actuator(home, cfg, name=actuator_name)
        apply_scale = not (once and isinstance(actuator, ProcessActuator))
        sup = Supervisor(home, actuator, overrides=overrides, apply_scale=apply_scale)
        if verbose:
            say(f"supervisor pid {os.getpid()} on {home.root}: actuator "
                f"{actuator.name if actuator is not None else 'none (no scaling)'}, "
                f"pid watcher {'pidfd' if watcher.available else 'off (tick only)'}")
        ready = False
        watchdog_at = 0.0
        while True:
            wakeup.clear()
            if flags.reload:
                flags.reload = False
                _emit(home, "supervisor_reloaded", "configuration re-read (SIGHUP)")
            if flags.stop:
                break
            now = clock.now()
            _emit_config_events(home, config_watch)
            try:
                report = sup.reconcile(now)
            except HarnessError as exc:  # busy lock, bad config edit, disk full: retry
                say(f"supervisor: pass failed, retrying next tick: {exc}")
                report = {"error": str(exc)}
            if verbose:
                for line in report.get("actions", []):
                    say(f"supervisor: {line}")
            if not ready:
                notifier.ready(status=status_text(report))
                ready = True
            else:
                notifier.status(status_text(report))
            watcher.watch(sup.watched_pids())
            if adopt_orphans:
                known = actuator.pids().values() if isinstance(actuator, ProcessActuator) \
                    else ()
                reap_orphans(known)
            if on_pass is not None and on_pass(report):
                break
            mono = time.monotonic()
            for tick in ticks:
                if mono >= tick.next_at:
                    tick.next_at = mono + tick.every_s
                    try:
                        tick.func(now)
                    except Exception as exc:  # a side job never stops the loop
                        tick.errors += 1
                        say(f"supervisor: {tick.name} failed: {type(exc).__name__}: {exc}")
            if once:
                break
            interval = notifier.watchdog_interval_s
            if interval is not None and time.monotonic() >= watchdog_at:
                notifier.watchdog()
                watchdog_at = time.monotonic() + interval
            waits = [float(sup.config()["supervisor_tick_s"])]
            waits += [t.next_at - time.monotonic() for t in ticks]
            expiry = report.get("next_lease_expiry")
            if expiry:  # just past it: expired_leases compares lease_until < now
                waits.append(clock.parse_iso(expiry) + LEASE_WAKE_LATE_S - clock.now())
            if interval is not None:
                waits.append(watchdog_at - time.monotonic())
            wakeup.wait(max(0.0, min(waits)))
        notifier.stopping(status="stopping")
        if stop_workers and isinstance(actuator, ProcessActuator) and actuator.children:
            _stop_children(actuator, sup.config(), flags, say)
        if stop_workers and adopt_orphans and isinstance(actuator, ProcessActuator):
            _stop_adopted(home, actuator, sup.config(), flags, say, watcher, wakeup)
        return 0
    finally:
        try:
            if isinstance(actuator, ProcessActuator) and stop_workers:
                actuator.close(0)
            if adopt_orphans:
                kill_descendants()
        finally:
            watcher.stop()
            wakeup.stop()
            notifier.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            keep_last_good(keep_before)
            lock.release()


def adopted_workers(home: Home, own: Iterable[int]) -> list[tuple[str, psutil.Process]]:
    """Live workers of ``home`` on this host that are neither ours (``own`` pids) nor
    systemd's (a spec with a ``unit``): those a previous ``harness up`` left behind, which
    this one counted in its fleet. Only a worker proven to be the process of its spec (pid
    and start time) is listed: a reused pid is never signalled."""
    mine = set(own) | {os.getpid()}
    out = []
    for read in read_specs(home):
        spec = read.spec
        if not spec or not _same_host(spec) or spec.get("unit") or spec["pid"] in mine:
            continue
        recorded = spec.get("process_start_time")
        if not isinstance(recorded, int | float) or isinstance(recorded, bool):
            continue
        try:
            proc = psutil.Process(spec["pid"])
            if abs(proc.create_time() - recorded) > 0.05 or \
                    proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        out.append((str(spec.get("worker_id")), proc))
    return out


def _stop_adopted(home: Home, actuator: ProcessActuator, cfg: Mapping[str, Any],
                  flags: _Flags, say: Callable[[str], None], watcher: PidWatcher,
                  wakeup: Wakeup) -> None:
    """``harness up`` stops the workers it adopted as it stops its own children: SIGTERM
    (they hand back their task), each further SIGINT/SIGTERM hurries them, SIGKILL after
    the grace. Woken by the pid watcher when one exits."""
    adopted = adopted_workers(home, actuator.pids().values())
    if not adopted:
        return
    grace = float(cfg["stop_grace_s"]) + float(cfg["kill_grace_s"]) + 5.0
    say(f"stopping {len(adopted)} adopted worker(s) ({', '.join(w for w, _ in adopted)}): "
        f"running tasks finish or are handed back (up to {grace:.0f}s)")

    def signal_all(sig: int) -> None:
        for _, proc in adopted:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    def alive() -> list[tuple[str, psutil.Process]]:
        out = []
        for worker_id, proc in adopted:
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append((worker_id, proc))
        return out

    signal_all(signal.SIGTERM)
    seen = flags.stop
    deadline = time.monotonic() + grace
    while True:
        wakeup.clear()
        adopted = alive()
        if not adopted or time.monotonic() >= deadline or seen >= 3:
            break
        if flags.stop > seen:
            seen = flags.stop
            if seen >= 3:
                break
            signal_all(signal.SIGTERM)  # a second signal ends their stop grace
        watcher.watch((proc.pid, None) for _, proc in adopted)
        wakeup.wait(min(1.0, max(0.0, deadline - time.monotonic())))
    if adopted:
        say(f"killing {len(adopted)} adopted worker(s) that did not stop")
        signal_all(signal.SIGKILL)


def _emit_config_events(home: Home, watch: ConfigWatch) -> None:
    """config_invalid / config_valid on a change of the config's validity."""
    for event in watch.check(home):
        _emit(home, event["type"], event["message"], severity=event["severity"],
              data=event["data"])


def _stop_children(actuator: ProcessActuator, cfg: Mapping[str, Any], flags: _Flags,
                   say: Callable[[str], None]) -> None:
    """Drain our worker children: SIGTERM; each further SIGINT/SIGTERM hurries them."""
    grace = float(cfg["stop_grace_s"]) + float(cfg["kill_grace_s"]) + 5.0
    say(f"stopping {len(actuator.children)} worker(s): running tasks finish or are handed "
        f"back (up to {grace:.0f}s; Ctrl-C again to hurry, a third time to kill)")
    actuator.terminate_all()
    seen = flags.stop
    deadline = time.monotonic() + grace
    while actuator.children and time.monotonic() < deadline:
        if flags.stop > seen:
            seen = flags.stop
            if seen >= 3:
                break
            actuator.terminate_all()  # a second signal ends the workers' stop grace
        actuator.wait_all(0.1)
    if actuator.children:
        say(f"killing {len(actuator.children)} worker(s) that did not stop")
        for name in list(actuator.children):
            actuator.kill(name)
        actuator.wait_all(10.0)
