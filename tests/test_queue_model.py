"""Model-based test: random operation sequences on every queue backend against an in-memory
model.

Time is injected and advances one second per step, so ``created_at`` orders tasks and the
model can predict exactly which task a claim returns. ``retry_backoff_base_s`` is 0, so a
retried task is claimable at once (the jitter multiplies a zero delay).

Known bug kept out of the model: requeue_dead of a dead letter whose dedup_key is held by a
live task (see test_queue_contract.py::test_requeue_dead_respects_live_dedup_key); the
model only requeues dead letters whose key is free.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from helpers import T0, make_home
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from coordination.errors import InvalidTransition, NotFound
from coordination.queue import BACKENDS, QueueBackend
from coordination.tasks import PRIORITIES, PRIORITY_RANK

DEDUP_KEYS = [None, "k1", "k2"]
WORKERS = ["w1", "w2", "w3"]


@dataclass
class Model:
    task_id: str
    priority: str
    created_at: str
    max_attempts: int
    dedup_key: str | None
    status: str = "queued"
    attempts: int = 0
    worker: str | None = None
    cancel_requested: bool = False


class QueueMachine(RuleBasedStateMachine):
    #: The backend under test: a name of ``coordination.queue.BACKENDS`` (one subclass each).
    backend = "file"

    def __init__(self) -> None:
        super().__init__()
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.queue: QueueBackend
        self.now = T0
        self.live: dict[str, Model] = {}
        self.dead: dict[str, Model] = {}
        self.finished: dict[str, str] = {}  # task_id -> terminal status

    @initialize()
    def fresh_home(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="harness-model-")
        overrides: dict[str, Any] = {}
        if self.backend == "postgres":  # a fresh database per example (tests/pg_cluster.py)
            from pg_cluster import shared_cluster

            self.database = shared_cluster().create_database()
            overrides.update(queue_backend="postgres", database_url=self.database)
        home = make_home(Path(self.tmp.name), retry_backoff_base_s=0, durability="none",
                         **overrides)
        self.queue = BACKENDS[self.backend](home)

    database: str | None = None

    def teardown(self) -> None:
        if self.tmp is not None:
            self.queue.close()
            self.tmp.cleanup()
        if self.database is not None:
            from pg_cluster import shared_cluster

            shared_cluster().drop_database(self.database)

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    # ------------------------------------------------------------------ helpers
    def running(self) -> list[str]:
        return sorted(t for t, m in self.live.items() if m.status == "running")

    def holder_of(self, key: str | None) -> str | None:
        if key is None:
            return None
        return next((t for t, m in self.live.items() if m.dedup_key == key), None)

    def expected_claim(self) -> Model | None:
        queued = [m for m in self.live.values() if m.status == "queued"]
        if not queued:
            return None
        return min(queued, key=lambda m: (PRIORITY_RANK[m.priority], m.created_at, m.task_id))

    def finish(self, task_id: str, status: str) -> None:
        model = self.live.pop(task_id)
        model.status = status
        if status == "failed":
            self.dead[task_id] = model
        self.finished[task_id] = status

    # ------------------------------------------------------------------ rules
    @rule(priority=st.sampled_from(PRIORITIES), key=st.sampled_from(DEDUP_KEYS),
          max_attempts=st.integers(1, 2))
    def enqueue(self, priority: str, key: str | None, max_attempts: int) -> None:
        request: dict[str, Any] = {"command": ["true"], "priority": priority,
                                   "max_attempts": max_attempts}
        if key is not None:
            request["dedup_key"] = key
        holder = self.holder_of(key)
        result = self.queue.enqueue(request, now=self.tick())
        if holder is not None:
            assert result.created is False
            assert result.task["task_id"] == holder
            return
        assert result.created is True
        task = result.task
        assert task["status"] == "queued" and task["attempts"] == 0
        assert task["task_id"] not in self.live and task["task_id"] not in self.finished
        self.live[task["task_id"]] = Model(task["task_id"], priority, task["created_at"],
                                           max_attempts, key)

    @rule(worker=st.sampled_from(WORKERS))
    def claim(self, worker: str) -> None:
        expected = self.expected_claim()
        top_rank = min((PRIORITY_RANK[m.priority] for m in self.live.values()
                        if m.status == "queued"), default=None)
        got = self.queue.claim(worker, now=self.tick())
        if expected is None:
            assert got is None
            return
        assert got is not None, f"expected {expected.task_id}, got nothing"
        assert PRIORITY_RANK[got["priority"]] == top_rank  # a task of the top priority
        assert got["task_id"] == expected.task_id
        expected.status = "running"
        expected.attempts += 1
        expected.worker = worker
        assert got["attempts"] == expected.attempts
        assert got["worker_id"] == worker

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.running()))
        model = self.live[task_id]
        out = self.queue.complete(task_id, str(model.worker), now=self.tick())
        assert out["status"] == "completed"
        self.finish(task_id, "completed")

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def complete_by_wrong_worker(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.running()))
        with pytest.raises(InvalidTransition):
            self.queue.complete(task_id, "intruder", now=self.tick())

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.running()))
        model = self.live[task_id]
        out = self.queue.fail(task_id, model.worker, error="boom", now=self.tick())
        if model.cancel_requested:
            self.finish(task_id, "cancelled")
        elif model.attempts < model.max_attempts:
            model.status, model.worker = "queued", None
        else:
            self.finish(task_id, "failed")
        assert out["status"] == (self.finished.get(task_id) or "queued")

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.running()))
        model = self.live[task_id]
        out = self.queue.release(task_id, str(model.worker), reason="bye", now=self.tick())
        if model.cancel_requested:
            self.finish(task_id, "cancelled")
            assert out["status"] == "cancelled"
        else:
            model.status, model.worker = "queued", None
            model.attempts -= 1
            assert out["status"] == "queued" and out["attempts"] == model.attempts

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.live)))
        model = self.live[task_id]
        out = self.queue.cancel(task_id, now=self.tick())
        if model.status == "queued":
            self.finish(task_id, "cancelled")
            assert out["status"] == "cancelled"
        else:
            model.cancel_requested = True
            assert out["status"] == "running" and out["cancel_requested"] is True

    @precondition(lambda self: self.finished)
    @rule(data=st.data())
    def cancel_finished_is_not_found(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.finished)))
        if task_id in self.live:
            return  # requeued since
        with pytest.raises(NotFound):
            self.queue.cancel(task_id, now=self.tick())

    @precondition(lambda self: self.live)
    @rule(data=st.data(), priority=st.sampled_from(PRIORITIES))
    def reprioritize(self, data: st.DataObject, priority: str) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.live)))
        out = self.queue.reprioritize(task_id, priority, now=self.tick())
        self.live[task_id].priority = priority
        assert out["priority"] == priority

    def requeueable(self) -> list[str]:
        return sorted(t for t, m in self.dead.items() if self.holder_of(m.dedup_key) is None)

    @precondition(lambda self: self.requeueable())
    @rule(data=st.data())
    def requeue_dead(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.requeueable()))
        out = self.queue.requeue_dead(task_id, now=self.tick())
        model = self.dead.pop(task_id)
        self.finished.pop(task_id)
        model.status, model.attempts, model.worker = "queued", 0, None
        model.cancel_requested = False
        self.live[task_id] = model
        assert out["status"] == "queued" and out["attempts"] == 0
        assert out["created_at"] == model.created_at

    @precondition(lambda self: self.dead)
    @rule(data=st.data())
    def purge_dead(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.dead)))
        assert self.queue.purge_dead([task_id]) == [task_id]
        del self.dead[task_id]

    # ------------------------------------------------------------------ invariants
    @invariant()
    def live_tasks_match_model(self) -> None:
        if self.tmp is None:
            return
        real = {t["task_id"]: t for t in self.queue.live_tasks()}
        assert set(real) == set(self.live)
        for task_id, model in self.live.items():
            task = real[task_id]
            assert task["status"] == model.status, task_id
            assert task["priority"] == model.priority, task_id
            assert task["attempts"] == model.attempts, task_id
            assert task["worker_id"] == model.worker, task_id
            assert bool(task["cancel_requested"]) == model.cancel_requested, task_id
            assert task["dedup_key"] == model.dedup_key, task_id

    @invariant()
    def dead_letters_match_model(self) -> None:
        if self.tmp is None:
            return
        dead = {d["task_id"]: d for d in self.queue.dead_letters()}
        assert set(dead) == set(self.dead)
        assert all(d["status"] == "failed" for d in dead.values())
        assert not set(dead) & {t["task_id"] for t in self.queue.live_tasks()}

    @invariant()
    def no_task_in_two_places(self) -> None:
        assert not set(self.live) & set(self.dead)
        assert not set(self.live) & set(self.finished)

    @invariant()
    def dedup_keys_unique_among_live(self) -> None:
        if self.tmp is None:
            return
        keys = [t["dedup_key"] for t in self.queue.live_tasks() if t["dedup_key"]]
        assert len(keys) == len(set(keys))

    @invariant()
    def stats_agree(self) -> None:
        if self.tmp is None:
            return
        stats = self.queue.stats(now=self.now)
        assert stats["live"] == len(self.live)
        assert stats["by_status"]["running"] == len(self.running())
        assert stats["dead_letters"] == len(self.dead)
        # No dependencies, no pause, retries due at once (backoff 0): every queued task
        # is runnable, whatever path it took back to queued.
        queued = len(self.live) - len(self.running())
        assert stats["runnable"] == queued
        assert stats["runnable_by_type"] == ({"default": queued} if queued else {})


QueueMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# One test case per backend the factory knows, each named after it (TestQueueModel_file).
for _name in BACKENDS:
    _machine = cast(type[QueueMachine],
                    type(f"QueueMachine_{_name}", (QueueMachine,), {"backend": _name}))
    _machine.TestCase.settings = QueueMachine.TestCase.settings
    if _name == "postgres":
        # A database per example and a round trip per statement: fewer examples, and room
        # on a loaded machine (alone it takes ~10 s).
        _machine.TestCase.settings = settings(QueueMachine.TestCase.settings,
                                              max_examples=20)
        _machine.TestCase.pytestmark = [pytest.mark.timeout(600)]  # type: ignore[attr-defined]  # read by pytest
    globals()[f"TestQueueModel_{_name}"] = _machine.TestCase
del _name, _machine
