"""The scaling policy: how many workers there should be, and starting or draining them.

:func:`decide_scale` (pure) turns runnable queue depth and worker counts into a target;
:class:`Scaling` applies it through the actuator: scale-up starts instances, scale-down
drains *idle* workers only (``control.json`` ``drain.instances``), so a busy worker is
never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from coordination import clock
from coordination.control import update_control
from coordination.errors import HarnessError
from coordination.specs import WorkerSpec

from .state import SupervisorState, _emit, _ts


def decide_scale(queued: int, running_workers: int, busy_workers: int, cfg: Mapping[str, Any],
                 last_scale_at: float | None, now: float) -> int:
    """The number of workers there should be. Pure: no I/O, no clock.

    - Never below ``min_workers`` nor above ``min(max_workers, max_concurrent_workers)``.
      Above the cap: back to the cap at once. Below the floor: the whole rule below applies
      at once (the floor, or more for a queued burst). Both ignore the cool-down.
    - Otherwise nothing changes within ``scale_cooldown_s`` of the last scale operation.
    - Scale up while ``queued / workers`` exceeds ``scale_up_threshold``: straight to the
      size at which the ratio is back at the threshold (a burst is met in one step).
    - Refill the warm pool: at least ``warm_pool`` idle workers beside the busy ones.
    - Scale down while the ratio is below ``scale_down_threshold`` (and the warm pool is
      full): to the busy workers plus the warm pool, but not so far that the ratio would
      exceed the up threshold again (hysteresis).
    """
    cap = max(0, min(int(cfg["max_workers"]), int(cfg["max_concurrent_workers"])))
    floor = min(int(cfg["min_workers"]), cap)
    running = max(0, int(running_workers))
    busy = max(0, min(int(busy_workers), running))
    queued = max(0, int(queued))
    if running > cap:
        return cap
    cooldown = float(cfg["scale_cooldown_s"])
    if running >= floor and last_scale_at is not None and now - last_scale_at < cooldown:
        return running
    up = float(cfg["scale_up_threshold"])
    down = float(cfg["scale_down_threshold"])
    warm = int(cfg["warm_pool"])
    ratio = queued / running if running else (math.inf if queued else 0.0)
    for_ratio = math.ceil(queued / up) if up > 0 else busy + queued
    want = running
    if queued and ratio > up:
        want = max(running + 1, for_ratio)
    if running - busy < warm:
        want = max(want, busy + warm)
    elif ratio < down:
        want = min(want, max(busy + warm, for_ratio))
    return max(floor, min(cap, want))


@dataclass
class WorkerView:
    """A worker as the scaler sees it."""

    instance: str
    worker_id: str | None
    state: str  # starting | idle | busy | draining | stopping
    managed: bool
    started_at: str | None = None

    @property
    def available(self) -> bool:
        return self.state in ("starting", "idle", "busy")


def _instance_key(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _free_instances(count: int, used: Iterable[str]) -> list[str]:
    taken = set(used)
    out: list[str] = []
    n = 1
    while len(out) < count:
        if str(n) not in taken:
            out.append(str(n))
        n += 1
    return out


class Scaling(SupervisorState):
    """The supervisor's part that sizes the fleet (:func:`decide_scale`, the actuator)."""

    def _workers(self, specs: list[WorkerSpec], control: dict[str, Any]) -> list[WorkerView]:
        managed = self.actuator.instances() if self.actuator is not None else {}
        drain = control.get("drain") or {}
        drain_all = drain.get("all")
        drains = drain.get("instances") or {}
        views: list[WorkerView] = []
        with_spec: set[str] = set()
        for spec in specs:
            instance = str(spec.get("instance"))
            started = spec.get("started_at") or ""
            state = str(spec.get("state") or "starting")
            req = [ts for ts in (drain_all, drains.get(instance)) if isinstance(ts, str)]
            if any(ts > started for ts in req) and state in ("idle", "busy", "starting"):
                state = "draining"
            views.append(WorkerView(instance, str(spec["worker_id"]), state,
                                    instance in managed, started))
            with_spec.add(instance)
        for name, inst in managed.items():
            if name in with_spec:
                continue
            views.append(WorkerView(name, None, "starting" if inst.state != "stopping"
                                    else "stopping", True))
        return views

    def _autoscale(self, now: float, cfg: Mapping[str, Any], specs: list[WorkerSpec],
                   runnable: int, control: dict[str, Any],
                   report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        try:
            views = self._workers(specs, control)
        except (HarnessError, OSError, RuntimeError) as exc:
            report["actions"].append(f"cannot list workers: {exc}")
            return {"error": str(exc)}, None
        available = [v for v in views if v.available]
        running = len(available)
        busy = sum(1 for v in available if v.state == "busy")
        idle = [v for v in available if v.state == "idle"]
        workers = {"running": running, "busy": busy, "idle": len(idle),
                   "starting": sum(1 for v in available if v.state == "starting"),
                   "draining": sum(1 for v in views if v.state in ("draining", "stopping")),
                   "instances": sorted({v.instance for v in views}, key=_instance_key)}
        if self.actuator is None:
            return workers, None
        last = _ts(self.state.get("last_scale_at"))
        target = decide_scale(runnable, running, busy, cfg, last, now)
        scale: dict[str, Any] = {"target": target, "from": running, "action": None,
                                 "applied": self.apply_scale}
        if target > running:
            total = len(views)
            room = int(cfg["max_concurrent_workers"]) - total
            count = max(0, min(target - running, room))
            used = {v.instance for v in views}
            names = _free_instances(count, used)
            scale.update(action="scale_up", to=running + count, instances=names)
            if count and self.apply_scale:
                started = self._start(names, report)
                scale["instances"] = started
                scale["to"] = running + len(started)
                if started:
                    self.state["last_scale_at"] = clock.iso(now)
                    _emit(self.home, "scale_up",
                          f"workers {running} -> {running + len(started)} ({runnable} runnable "
                          f"queued, {busy} busy)", now=now,
                          data={"from": running, "to": running + len(started), "target": target,
                                "queued": runnable, "busy": busy, "instances": started,
                                "actuator": self.actuator.name})
                    report["actions"].append(f"scale_up {running} -> {running + len(started)}"
                                             f" (instances {', '.join(started)})")
        elif target < running:
            # Managed instances first (ours to start again), highest instance number first.
            victims = sorted(idle, key=lambda v: (v.managed, _instance_key(v.instance)),
                             reverse=True)[:running - target]
            names = [v.instance for v in victims]
            scale.update(action="scale_down", to=running - len(names), instances=names)
            if names and self.apply_scale:
                self._drain(names, now, views)
                self.state["last_scale_at"] = clock.iso(now)
                _emit(self.home, "scale_down",
                      f"workers {running} -> {running - len(names)} (draining idle "
                      f"instance(s) {', '.join(names)})", now=now,
                      data={"from": running, "to": running - len(names), "target": target,
                            "queued": runnable, "busy": busy, "instances": names,
                            "actuator": self.actuator.name})
                report["actions"].append(f"scale_down {running} -> {running - len(names)} "
                                         f"(draining {', '.join(names)})")
        return workers, scale

    def _start(self, names: list[str], report: dict[str, Any]) -> list[str]:
        assert self.actuator is not None
        started = []
        for name in names:
            try:
                self.actuator.start(name)
            except (OSError, RuntimeError, ValueError) as exc:
                report["actions"].append(f"cannot start worker {name}: {exc}")
                # Retried every pass; reported once a minute (or when the error changes).
                last = self._errors.get("scale_failed")
                mono = time.monotonic()
                if last is None or last[0] != str(exc) or mono - last[1] >= 60:
                    self._errors["scale_failed"] = (str(exc), mono)
                    _emit(self.home, "scale_failed",
                          f"cannot start worker instance {name}: {exc}", severity="error",
                          data={"instance": name, "error": str(exc),
                                "actuator": self.actuator.name})
                break
            started.append(name)
        return started

    def _drain(self, names: list[str], now: float, views: list[WorkerView]) -> None:
        """Drain requests for idle instances (the worker exits with ``drained``); stale
        requests for instances no longer running are dropped in the same write."""
        stamp = clock.iso(now)
        alive = {v.instance for v in views}

        def change(state: dict[str, Any]) -> None:
            drain = state.setdefault("drain", {"all": None, "instances": {}})
            instances = drain.setdefault("instances", {})
            for name in list(instances):
                if name not in alive:
                    instances.pop(name, None)
            for name in names:
                instances[name] = stamp

        update_control(self.home, change, now=now)
