"""Autoscaling: reconcile(now) with a fake actuator (decisions, cool-down, drain of idle
workers only, hard cap), then one end-to-end run with the process actuator and real
workers: a burst scales up, an empty queue scales back to min_workers."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import T0, events, req

from coordination import clock
from coordination.control import read_control
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import WorkerSpec, complete_spec, new_spec, read_specs, write_spec
from daemons.supervisor.actuators import Instance, ProcessActuator, SystemdActuator
from daemons.supervisor.reconcile import Supervisor


class FakeActuator:
    """Records what the supervisor asks; an instance is "running" once started."""

    name = "fake"

    def __init__(self) -> None:
        self.running: dict[str, Instance] = {}
        self.started: list[str] = []
        self.stopped: list[str] = []

    def instances(self) -> dict[str, Instance]:
        return dict(self.running)

    def start(self, instance: str) -> None:
        self.started.append(instance)
        self.running[instance] = Instance(instance, "starting")

    def stop(self, instance: str) -> None:
        self.stopped.append(instance)
        self.running.pop(instance, None)

    def kill(self, instance: str) -> None:
        self.running.pop(instance, None)

    def poll(self) -> list[tuple[str, int | None]]:
        return []

    def close(self, grace_s: float) -> None:
        self.running.clear()


def register(home: Home, instance: str, state: str = "idle", now: float | None = None
             ) -> WorkerSpec:
    """A live spec for ``instance`` (this test process stands in for the worker)."""
    ts = clock.now() if now is None else now
    spec = new_spec(clock.new_worker_id(instance, ts), instance, ts)
    spec["state"] = state
    if state == "busy":
        spec["current_task_id"] = f"t-fake-{instance}"
    write_spec(home, spec, create=True)
    return spec


def fake_home(home_factory: Callable[..., Home], **overrides: Any) -> Home:
    settings: dict[str, Any] = {
        "durability": "none", "min_workers": 1, "max_workers": 8,
        "max_concurrent_workers": 16, "scale_cooldown_s": 30, "warm_pool": 0,
        "heartbeat_timeout_s": 3600, "worker_stall_timeout_s": 3600}
    settings.update(overrides)
    return home_factory(**settings)


def test_burst_scales_up_within_cooldown_and_back_to_min(
        home_factory: Callable[..., Home]) -> None:
    home = fake_home(home_factory)
    act = FakeActuator()
    sup = Supervisor(home, act)
    now = clock.now()
    specs = {str(i): register(home, str(i), now=now) for i in range(1, 5)}
    for name in specs:
        act.running[name] = Instance(name, "running")
    TaskQueue(home).enqueue_batch([req(description=f"burst {i}") for i in range(40)],
                                  force=True, now=now)
    report = sup.reconcile(now)
    assert report["queue"]["runnable"] == 40
    assert report["scale"]["action"] == "scale_up"
    assert (report["scale"]["from"], report["scale"]["to"]) == (4, 8)  # capped at max
    assert act.started == ["5", "6", "7", "8"]
    [up] = events(home, "scale_up")
    assert up["data"]["from"] == 4 and up["data"]["to"] == 8
    # Within the cool-down nothing more happens, whatever the queue says.
    report = sup.reconcile(now + 1)
    assert report["workers"]["running"] == 8 and report["workers"]["starting"] == 4
    assert report["scale"]["action"] is None and act.started == ["5", "6", "7", "8"]
    # The new instances register; the queue empties.
    for name in ("5", "6", "7", "8"):
        specs[name] = register(home, name, now=now + 2)
    for task in TaskQueue(home).live_tasks():
        TaskQueue(home).cancel(task["task_id"])
    report = sup.reconcile(now + 10)
    assert report["scale"]["action"] is None  # still cooling down (30 s)
    report = sup.reconcile(now + 31)
    assert report["scale"]["action"] == "scale_down"
    assert (report["scale"]["from"], report["scale"]["to"]) == (8, 1)
    drained = read_control(home)["drain"]["instances"]
    assert sorted(drained, key=int) == ["2", "3", "4", "5", "6", "7", "8"]
    [down] = events(home, "scale_down")
    assert down["data"]["from"] == 8 and down["data"]["to"] == 1
    # Drained workers count as gone at once; nothing else is drained meanwhile.
    report = sup.reconcile(now + 32)
    assert report["workers"]["running"] == 1 and report["workers"]["draining"] == 7
    assert report["scale"]["action"] is None
    # They exit; the instance numbers are reused by the next scale-up, and the stale
    # drain requests of those instances do not apply to the new workers.
    for name in drained:
        complete_spec(home, specs[name]["worker_id"], "drained", now + 33)
        act.running.pop(name, None)
    report = sup.reconcile(now + 34)
    assert report["workers"]["running"] == 1 and report["workers"]["draining"] == 0


def test_scale_down_never_drains_a_busy_worker(home_factory: Callable[..., Home]) -> None:
    home = fake_home(home_factory, scale_cooldown_s=0)
    act = FakeActuator()
    sup = Supervisor(home, act)
    register(home, "1", "busy")
    register(home, "2", "busy")
    register(home, "3", "idle")
    register(home, "4", "busy")
    report = sup.reconcile(clock.now())
    # target = busy (3) + warm pool (0): only the idle one can go
    assert report["scale"]["target"] == 3
    assert report["scale"]["instances"] == ["3"]
    assert list(read_control(home)["drain"]["instances"]) == ["3"]


def test_warm_pool_and_hard_cap(home_factory: Callable[..., Home]) -> None:
    home = fake_home(home_factory, scale_cooldown_s=0, warm_pool=2, max_workers=10,
                     max_concurrent_workers=3)
    act = FakeActuator()
    sup = Supervisor(home, act)
    register(home, "1", "busy")
    report = sup.reconcile(clock.now())
    # busy 1 + warm 2 = 3 workers, which is also the hard cap
    assert act.started == ["2", "3"] and report["scale"]["to"] == 3
    TaskQueue(home).enqueue_batch([req() for _ in range(30)], force=True)
    report = sup.reconcile(clock.now() + 1)
    assert report["scale"]["action"] is None and len(act.started) == 2


def test_draining_workers_count_against_the_hard_cap(home_factory: Callable[..., Home]) -> None:
    home = fake_home(home_factory, scale_cooldown_s=0, max_concurrent_workers=4,
                     min_workers=0)
    act = FakeActuator()
    sup = Supervisor(home, act)
    for i in range(1, 4):
        register(home, str(i), "busy")
    from coordination.control import update_control

    update_control(home, lambda s: s["drain"].update(all=clock.iso(clock.now() + 1)))
    TaskQueue(home).enqueue_batch([req() for _ in range(20)], force=True)
    report = sup.reconcile(clock.now() + 2)
    # 3 draining + at most 1 new = the hard cap of 4
    assert report["workers"]["draining"] == 3 and act.started == ["4"]


def test_paused_and_future_tasks_are_not_demand(home_factory: Callable[..., Home]) -> None:
    home = fake_home(home_factory, scale_cooldown_s=0, min_workers=0)
    act = FakeActuator()
    sup = Supervisor(home, act)
    queue = TaskQueue(home)
    queue.enqueue_batch([req(not_before=clock.iso(T0 + 3600)) for _ in range(10)], now=T0)
    first = queue.enqueue(req(), now=T0).task["task_id"]
    queue.enqueue_batch([req(depends_on=[first]) for _ in range(10)], now=T0)
    report = sup.reconcile(T0)
    assert report["queue"] == {"queued": 21, "runnable": 1, "running": 0}
    assert report["scale"]["target"] == 1


def test_systemd_list_units_parsing() -> None:
    rows = ('[{"unit":"harness-worker@1.service","load":"loaded","active":"active",'
            '"sub":"running","description":"x"},'
            '{"unit":"harness-worker@2.service","load":"loaded","active":"activating",'
            '"sub":"start","description":"x"},'
            '{"unit":"harness-worker@3.service","load":"loaded","active":"deactivating",'
            '"sub":"stop-sigterm","description":"x"},'
            '{"unit":"harness-worker@4.service","load":"loaded","active":"failed",'
            '"sub":"failed","description":"x"},'
            '{"unit":"other.service","load":"loaded","active":"active","sub":"running",'
            '"description":"x"}]')
    parsed = SystemdActuator.parse_list_units(rows)
    assert {k: v.state for k, v in parsed.items()} == {"1": "running", "2": "starting",
                                                      "3": "stopping"}


# ---------------------------------------------------------------------------- end to end
@pytest.fixture
def process_actuator(home_factory: Callable[..., Home]) -> Iterator[tuple[Home,
                                                                          ProcessActuator]]:
    home = home_factory(durability="none", min_workers=1, max_workers=4, warm_pool=0,
                        scale_cooldown_s=0.5, scale_up_threshold=2.0,
                        scale_down_threshold=0.5, heartbeat_interval_s=0.5,
                        retry_backoff_base_s=0, stop_grace_s=1, kill_grace_s=1)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                        "HARNESS_INSTANCE")}
    act = ProcessActuator(home, environ=env)
    try:
        yield home, act
    finally:
        pgids = list(act.pids().values())
        act.close(10)
        for pgid in pgids:  # belt and braces: nothing of a worker's group survives
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)


def test_end_to_end_with_process_actuator(
        process_actuator: tuple[Home, ProcessActuator]) -> None:
    home, act = process_actuator
    sup = Supervisor(home, act)
    peak = 0

    def step() -> dict[str, Any]:
        nonlocal peak
        report = sup.reconcile(clock.now())
        peak = max(peak, len(act.children))
        return report

    deadline = time.monotonic() + 60
    while not any(s.spec and s.spec.get("state") == "idle" for s in read_specs(home)):
        step()
        assert time.monotonic() < deadline, "the first worker did not register"
        time.sleep(0.1)
    assert len(act.children) == 1  # min_workers
    TaskQueue(home).enqueue_batch([req(command=["sleep", "0.4"], description=f"b{i}")
                                   for i in range(24)])
    deadline = time.monotonic() + 90
    while TaskQueue(home).live_tasks():
        step()
        assert time.monotonic() < deadline, "the burst did not finish"
        time.sleep(0.1)
    assert peak == 4, "the burst should have scaled up to max_workers"
    # Idle again: back to min_workers; drained workers exit and are reaped.
    deadline = time.monotonic() + 60
    while len(act.children) > 1 or len(read_specs(home)) > 1:
        step()
        assert time.monotonic() < deadline, f"did not scale back: {act.children}"
        time.sleep(0.1)
    ups = events(home, "scale_up")
    downs = events(home, "scale_down")
    assert ups and downs
    assert max(e["data"]["to"] for e in ups) == 4 and downs[-1]["data"]["to"] == 1
    drained = {i for e in downs for i in e["data"]["instances"]}
    exits = {s.spec["instance"]: s.spec["exit_reason"]
             for s in read_specs(home, completed=True) if s.spec}
    assert drained and all(exits.get(i) == "drained" for i in drained), (drained, exits)
