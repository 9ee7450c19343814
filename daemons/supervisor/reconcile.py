"""One supervisor pass: :meth:`Supervisor.reconcile`, and the idle-stop one-shot.

:meth:`Supervisor.reconcile` is the whole loop body: one pass at ``now`` (reap, ingest,
reclaim, stalls, backpressure, circuits, scaling, health, then save the state) that
returns a report (a dict). Tests drive it directly with an injected ``now`` and a fake
actuator. Its parts: :mod:`.reclaim`, :mod:`.health`, :mod:`.policy`, :mod:`.state`.
"""

from __future__ import annotations

from typing import Any

from coordination import clock
from coordination.control import read_control
from coordination.errors import HarnessError, LockTimeout, TemporaryFailure
from coordination.locks import lock_for
from coordination.paths import Home
from coordination.specs import quarantine_unusable, read_specs

from .actuators import Actuator, ProcessActuator
from .health import HealthChecks
from .policy import Scaling, _instance_key, decide_scale
from .reclaim import _same_host, death_proof, reclaim_pass
from .state import _emit, _ts, log


class Supervisor(HealthChecks, Scaling):
    """One home's supervisor. :meth:`reconcile` is a full pass; everything it needs to
    remember is in ``self.state`` and saved to ``supervisor-state.json`` after each pass.

    ``actuator`` None: no scaling (reclaim, stalls, health, circuits only).
    ``overrides``: system.json values to use instead of the file's (``harness up`` sets
    min_workers this way without editing the config). ``apply_scale`` False computes the
    scaling decision but starts and drains nothing."""

    def reconcile(self, now: float) -> dict[str, Any]:
        """One pass at ``now``: reap, ingest, reclaim, stalls, backpressure, circuits,
        scaling, health; then save the state. Returns what it saw and did."""
        cfg = self.config()
        self.passes += 1
        report: dict[str, Any] = {"at": clock.iso(now), "actions": []}
        if self.actuator is not None:
            report["exited"] = [{"instance": i, "status": s} for i, s in self.actuator.poll()]
        report["ingested"] = self._ingest(now)
        try:
            unusable = quarantine_unusable(self.home, now)
        except (HarnessError, OSError) as exc:  # e.g. a busy specs lock: next pass
            unusable = []
            report["actions"].append(f"could not quarantine unusable worker specs: {exc}")
        for path, problem in unusable:
            # A spec that can never prove its worker dead would count forever: set aside.
            report["actions"].append(f"quarantined the unusable worker spec {path.name}")
            _emit(self.home, "worker_spec_quarantined", f"unusable worker spec moved to "
                  f"{path}: {problem}", severity="warning",
                  data={"path": str(path), "problem": problem})
        specs = [s.spec for s in read_specs(self.home) if s.spec is not None]
        reclaim = reclaim_pass(self.home, now, queue=self.queue, specs=specs,
                               heartbeat_timeout_s=float(cfg["heartbeat_timeout_s"]))
        dead = {d["worker_id"] for d in reclaim["dead_workers"]}
        specs = [s for s in specs if s["worker_id"] not in dead]
        report["reclaimed"] = reclaim["reclaimed"]
        report["dead_workers"] = reclaim["dead_workers"]
        report["next_lease_expiry"] = reclaim["next_lease_expiry"]
        for item in reclaim["reclaimed"]:
            report["actions"].append(f"reclaimed {item['task_id']} from {item['worker_id']}: "
                                     f"{item['proof']} -> {item['status']}")
        report["stalled"] = self._stalls(now, cfg, specs)
        stalled_ids = {s["worker_id"] for s in report["stalled"] if s.get("fenced")}
        specs = [s for s in specs if s["worker_id"] not in stalled_ids]
        self.specs = specs
        control = read_control(self.home)
        stats = self.queue.stats(now)
        queued, runnable = stats["by_status"]["queued"], stats["runnable"]
        report["queue"] = {"queued": queued, "runnable": runnable,
                           "running": stats["by_status"]["running"]}
        report["backpressure"] = self._backpressure(now, cfg, queued, report)
        self.history.refresh(now - max(float(cfg["health_window_s"]),
                                       float(cfg["circuit_window_s"])))
        report["circuits"] = self._circuits(now, cfg, control, report)
        report["workers"], report["scale"] = self._autoscale(now, cfg, specs, runnable,
                                                             control, report)
        report["health"] = self._health(now, cfg, report)
        self._save(now, cfg)
        return report

    def _ingest(self, now: float) -> int:
        """Admit this host's inbox requests (the port takes no lock when there are none)."""
        try:
            return self.queue.ingest(now=now)
        except TemporaryFailure as exc:
            log.warning("ingest deferred: %s", exc)
            return 0

    def watched_pids(self) -> list[tuple[int, float | None]]:
        """Processes whose death should wake the loop: live workers on this host."""
        out: list[tuple[int, float | None]] = []
        for spec in self.specs:
            if _same_host(spec):
                start = spec.get("process_start_time")
                out.append((int(spec["pid"]), float(start)
                            if isinstance(start, int | float) else None))
        if isinstance(self.actuator, ProcessActuator):
            known = {pid for pid, _ in out}
            out += [(pid, None) for pid in self.actuator.pids().values() if pid not in known]
        return out


def scale_down_once(home: Home, now: float, *, actuator: Actuator | None = None,
                    dry_run: bool = False) -> dict[str, Any]:
    """One scale-down pass (the idle-stop timer): drain idle workers above what
    :func:`decide_scale` wants, never scaling up. Skipped while a supervisor runs (it scales
    itself); uses and updates the same state file, so the cool-down is shared."""
    lock = lock_for(home.supervisor_lock)
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        return {"skipped": "a supervisor is running on this home; it scales down itself"}
    try:
        sup = Supervisor(home, actuator, apply_scale=not dry_run)
        cfg = sup.config()
        specs = [s.spec for s in read_specs(home) if s.spec is not None]
        hb = float(cfg["heartbeat_timeout_s"])
        specs = [s for s in specs if death_proof(s, now, hb) is None]
        control = read_control(home)
        runnable = sup.queue.stats(now)["runnable"]
        report: dict[str, Any] = {"actions": []}
        views = sup._workers(specs, control)
        available = [v for v in views if v.available]
        running = len(available)
        busy = sum(1 for v in available if v.state == "busy")
        target = decide_scale(runnable, running, busy, cfg, _ts(sup.state.get("last_scale_at")),
                              now)
        idle = [v for v in available if v.state == "idle"]
        victims = sorted(idle, key=lambda v: _instance_key(v.instance),
                         reverse=True)[:max(0, running - target)]
        names = [v.instance for v in victims]
        out = {"running": running, "busy": busy, "idle": len(idle), "target": target,
               "drained": names if not dry_run else [], "would_drain": names}
        if names and not dry_run:
            sup._drain(names, now, views)
            sup.state["last_scale_at"] = clock.iso(now)
            _emit(home, "scale_down", f"workers {running} -> {running - len(names)} (idle "
                  f"stop: draining instance(s) {', '.join(names)})", now=now,
                  data={"from": running, "to": running - len(names), "target": target,
                        "queued": runnable, "busy": busy, "instances": names,
                        "actuator": "idle-stop"})
            sup._save(now, cfg)
        out.update(report)
        return out
    finally:
        lock.release()
