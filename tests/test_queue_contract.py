"""The queue contract: one test per documented guarantee of :class:`QueueBackend`.

Every test runs against the ``backend`` fixture, parametrised over :data:`BACKENDS`, so a
second implementation passes the same suite by adding one entry there. A backend is built
over an initialised home (``backend.home``); configuration (backoff, queue depth, ...) goes
through system.json via ``make_backend(**system_overrides)`` and pausing through
control.json, exactly as an operator would do it. Time is injected with ``now=``.

No test here looks at a backend's storage: what only the file backend does (its journal,
the jq snapshot, the inbox layout, lock timing) is tested in tests/test_queue_file.py.
Events are the host's dashboard-events.jsonl with every backend, so they are read here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import T0, event_counts, events, make_home, req

from coordination import clock
from coordination.control import update_control
from coordination.errors import (
    EXIT_TEMPFAIL,
    Backpressure,
    InvalidTransition,
    NotFound,
    TemporaryFailure,
    UsageError,
)
from coordination.events import ENVELOPE_FIELDS
from coordination.jsonl import read_jsonl
from coordination.queue import BACKENDS


@pytest.fixture(params=sorted(BACKENDS))
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_backend(tmp_path: Path, backend_kind: str,
                 request: pytest.FixtureRequest) -> Callable[..., Any]:
    counter = iter(range(1, 1000))
    # The postgres backend: each home gets a fresh database (tests/pg_cluster.py).
    databases = request.getfixturevalue("pg_database") if backend_kind == "postgres" \
        else None

    def make(**system_overrides: Any) -> Any:
        if databases is not None:
            system_overrides.update(queue_backend="postgres", database_url=databases())
        home = make_home(tmp_path, f"home{next(counter)}", **system_overrides)
        return BACKENDS[backend_kind](home)  # a fresh instance: one "process" per call

    return make


@pytest.fixture
def backend(make_backend: Callable[..., Any]) -> Any:
    return make_backend()


def live_ids(backend: Any) -> set[str]:
    return {t["task_id"] for t in backend.live_tasks()}


def run_once(backend: Any, request: dict[str, Any], *, worker: str = "w1", now: float = T0,
             ) -> dict[str, Any]:
    """Enqueue ``request``, claim it and return the running task."""
    task = backend.enqueue(request, now=now).task
    claimed: dict[str, Any] | None = backend.claim(worker, now=now)
    assert claimed is not None and claimed["task_id"] == task["task_id"]
    return claimed


# ------------------------------------------------------------------------------ enqueue
def test_enqueue_returns_visible_queued_task(backend: Any) -> None:
    res = backend.enqueue(req(description="hello", priority="high"), now=T0)
    task = res.task
    assert res.created is True
    assert task["status"] == "queued"
    assert task["attempts"] == 0
    assert task["priority"] == "high"
    assert task["description"] == "hello"
    assert task["created_at"] == clock.iso(T0)
    assert task["worker_id"] is None
    assert backend.get(task["task_id"]) == task
    assert [t["task_id"] for t in backend.live_tasks()] == [task["task_id"]]
    # Visible to another process the moment enqueue returns.
    other = BACKENDS[backend.backend_name](backend.home)
    assert other.get(task["task_id"]) == task


def test_enqueue_batch_commits_all_together(backend: Any) -> None:
    results = backend.enqueue_batch([req(task_id=f"b{i}") for i in range(5)], now=T0)
    assert [r.task["task_id"] for r in results] == [f"b{i}" for i in range(5)]
    assert all(r.created for r in results)
    assert live_ids(backend) == {f"b{i}" for i in range(5)}


def test_enqueue_batch_is_all_or_nothing_on_validation_error(backend: Any) -> None:
    batch = [req(task_id="good1"), req(task_id="good2"), req(task_id="bad", priority="urgent")]
    with pytest.raises(UsageError) as info:
        backend.enqueue_batch(batch, now=T0)
    assert "request[2]" in str(info.value) and "priority" in str(info.value)
    assert backend.live_tasks() == []
    # Nothing of the batch is left behind to be picked up by a later operation either.
    backend.ingest(now=T0)
    assert backend.live_tasks() == []


def test_enqueue_batch_duplicate_task_id_rejected(backend: Any) -> None:
    with pytest.raises(UsageError, match="duplicate task_id"):
        backend.enqueue_batch([req(task_id="same"), req(task_id="same")], now=T0)
    assert backend.live_tasks() == []


def test_enqueue_batch_is_all_or_nothing_on_unknown_dependency(backend: Any) -> None:
    batch = [req(task_id="valid"), req(task_id="orphan", depends_on=["t-does-not-exist"])]
    with pytest.raises(UsageError, match="depends_on"):
        backend.enqueue_batch(batch, now=T0)
    assert backend.live_tasks() == []
    backend.ingest(now=T0 + 1)
    assert backend.live_tasks() == [], "the rejected batch's valid task was queued later"


BAD_REQUESTS = {
    "unknown priority": (req(priority="urgent"), "priority"),
    "unknown worker_type": (req(worker_type="no-such-type"), "worker_type"),
    "oversize description": (req(description="x" * 65537), "description"),
    "unknown depends_on": (req(depends_on=["t-20230101T000000000-0000000000"]), "depends_on"),
    "self dependency": (req(task_id="selfish", depends_on=["selfish"]), "depends_on"),
    "non-list command": (req(command="echo hello"), "command"),
    "empty argv element list": (req(command=[1, 2]), "command"),
    "unknown field": (req(colour="blue"), "colour"),
    "bad task id": (req(task_id=".hidden"), "task_id"),
    "bad max_attempts": (req(max_attempts=1001), "max_attempts"),
    "non-integer max_attempts": (req(max_attempts="3"), "max_attempts"),
    "bad not_before": (req(not_before="tomorrow"), "not_before"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_raises_usage_error_naming_the_field(backend: Any, case: str) -> None:
    request, field_name = BAD_REQUESTS[case]
    with pytest.raises(UsageError) as info:
        backend.enqueue(request, now=T0)
    assert field_name in str(info.value)
    assert info.value.exit_code == 2
    assert backend.live_tasks() == []
    backend.ingest(now=T0)
    assert backend.live_tasks() == []


def test_zero_max_attempts_is_rejected(backend: Any) -> None:
    with pytest.raises(UsageError, match="max_attempts"):
        backend.enqueue(req(max_attempts=0), now=T0)


def test_cyclic_depends_on_within_batch_is_rejected(backend: Any) -> None:
    batch = [req(task_id="A", depends_on=["B"]), req(task_id="B", depends_on=["A"])]
    with pytest.raises(UsageError) as info:
        backend.enqueue_batch(batch, now=T0)
    assert "depends_on" in str(info.value) and "cycle" in str(info.value)
    assert backend.live_tasks() == []
    backend.ingest(now=T0)
    assert backend.live_tasks() == []


def test_longer_cycle_within_batch_is_rejected(backend: Any) -> None:
    batch = [req(task_id="A", depends_on=["C"]), req(task_id="B", depends_on=["A"]),
             req(task_id="C", depends_on=["B"])]
    with pytest.raises(UsageError, match="cycle"):
        backend.enqueue_batch(batch, now=T0)
    assert backend.live_tasks() == []


def _rejected_files(backend: Any) -> dict[str, str]:
    folder = backend.home.inbox_rejected
    return {p.stem: p.with_suffix(".reason").read_text() for p in folder.glob("*.json")}


def test_inbox_batch_rejects_every_cycle_and_what_depends_on_it(backend: Any) -> None:
    """Drained together: two cycles, a task depending on a cycle member, a task depending
    on that one, and unrelated tasks. Every cycle member and every dependent of a rejected
    task is rejected (a dependent must not run as if its dependency had finished)."""
    requests = [req(task_id="C1", depends_on=["D1"]), req(task_id="D1", depends_on=["C1"]),
                req(task_id="E1", depends_on=["F1"]), req(task_id="F1", depends_on=["E1"]),
                req(task_id="G1", depends_on=["C1"]), req(task_id="A1", depends_on=["G1"]),
                req(task_id="K1"), req(task_id="L1", depends_on=["K1"])]
    for request in requests:
        backend.submit(request, now=T0)
    backend.ingest(now=T0 + 1)
    assert live_ids(backend) == {"K1", "L1"}
    reasons = _rejected_files(backend)
    assert set(reasons) == {"A1", "C1", "D1", "E1", "F1", "G1"}
    assert "cycle" in reasons["C1"] and "cycle" in reasons["E1"]
    assert "rejected task(s): C1" in reasons["G1"]
    assert "rejected task(s): G1" in reasons["A1"]
    assert list(backend.home.inbox.glob("*.json")) == []
    # The dependents never run before (or instead of) their rejected dependency.
    claimed = backend.claim("w1", now=T0 + 2)
    assert claimed is not None and claimed["task_id"] == "K1"
    assert backend.claim("w1", now=T0 + 3) is None


def test_inbox_task_depending_on_a_later_rejected_one_is_rejected(backend: Any) -> None:
    """A1 is drained before B1, which is then rejected (unknown dependency): A1 goes too."""
    backend.submit(req(task_id="A1", depends_on=["B1"]), now=T0)
    backend.submit(req(task_id="B1", depends_on=["t-no-such-task"]), now=T0)
    backend.ingest(now=T0 + 1)
    assert backend.live_tasks() == []
    reasons = _rejected_files(backend)
    assert "unknown or not-completed" in reasons["B1"]
    assert "rejected task(s): B1" in reasons["A1"]


def test_dependency_on_a_deduplicated_request_follows_the_holder(backend: Any) -> None:
    """B is deduplicated onto the live X (same dedup_key): C, which names B, waits for X."""
    holder = backend.enqueue(req(task_id="X", dedup_key="nightly"), now=T0).task
    results = backend.enqueue_batch([req(task_id="B", dedup_key="nightly"),
                                     req(task_id="C", depends_on=["B"])], now=T0 + 1)
    assert results[0].created is False and results[0].task["task_id"] == "X"
    assert results[1].task["depends_on"] == ["X"]
    assert backend.get("C")["depends_on"] == ["X"]
    first = backend.claim("w1", now=T0 + 2)
    assert first is not None and first["task_id"] == holder["task_id"]
    assert backend.claim("w2", now=T0 + 3) is None  # C waits for X, not for a ghost B
    backend.complete("X", "w1", now=T0 + 4)
    after = backend.claim("w2", now=T0 + 5)
    assert after is not None and after["task_id"] == "C"


def test_acyclic_dependencies_within_batch_are_accepted(backend: Any) -> None:
    batch = [req(task_id="A"), req(task_id="B", depends_on=["A"]),
             req(task_id="C", depends_on=["A", "B"])]
    backend.enqueue_batch(batch, now=T0)
    assert live_ids(backend) == {"A", "B", "C"}


# ------------------------------------------------------------------------------ dedup
def test_dedup_returns_live_holder(backend: Any) -> None:
    first = backend.enqueue(req(dedup_key="nightly", description="one"), now=T0)
    second = backend.enqueue(req(dedup_key="nightly", description="two"), now=T0 + 1)
    assert first.created is True
    assert second.created is False
    assert second.task["task_id"] == first.task["task_id"]
    assert second.task["description"] == "one"
    assert len(backend.live_tasks()) == 1
    # A running holder still holds the key.
    backend.claim("w1", now=T0 + 2)
    third = backend.enqueue(req(dedup_key="nightly"), now=T0 + 3)
    assert third.created is False and third.task["task_id"] == first.task["task_id"]
    assert third.task["status"] == "running"


def test_dedup_within_one_batch(backend: Any) -> None:
    results = backend.enqueue_batch([req(dedup_key="k"), req(dedup_key="k")], now=T0)
    assert [r.created for r in results] == [True, False]
    assert results[0].task["task_id"] == results[1].task["task_id"]
    assert len(backend.live_tasks()) == 1


@pytest.mark.parametrize("ending", ["completed", "cancelled", "failed"])
def test_dedup_key_is_freed_once_holder_is_terminal(backend: Any, ending: str) -> None:
    first = backend.enqueue(req(dedup_key="k", max_attempts=1), now=T0).task
    if ending == "cancelled":
        backend.cancel(first["task_id"], now=T0 + 1)
    else:
        backend.claim("w1", now=T0 + 1)
        if ending == "completed":
            backend.complete(first["task_id"], "w1", now=T0 + 2)
        else:
            backend.fail(first["task_id"], "w1", error="boom", now=T0 + 2)
    again = backend.enqueue(req(dedup_key="k"), now=T0 + 3)
    assert again.created is True
    assert again.task["task_id"] != first["task_id"]
    assert live_ids(backend) == {again.task["task_id"]}


def test_dedup_across_processes_returns_holder(backend: Any) -> None:
    holder = backend.enqueue(req(dedup_key="k"), now=T0).task
    other_process = BACKENDS[backend.backend_name](backend.home)
    res = other_process.enqueue(req(dedup_key="k"), now=T0 + 1)
    assert res.created is False
    assert res.task["task_id"] == holder["task_id"]


# ------------------------------------------------------------------------------ claim
def test_claim_order_is_priority_then_created_at(backend: Any) -> None:
    order = [("low", 1), ("high", 2), ("medium", 3), ("critical", 4), ("high", 5),
             ("critical", 6)]
    ids = {}
    for prio, offset in order:
        ids[(prio, offset)] = backend.enqueue(req(priority=prio), now=T0 + offset).task["task_id"]
    expected = [ids[k] for k in [("critical", 4), ("critical", 6), ("high", 2), ("high", 5),
                                 ("medium", 3), ("low", 1)]]
    got = [backend.claim("w1", now=T0 + 10)["task_id"] for _ in expected]
    assert got == expected
    assert backend.claim("w1", now=T0 + 10) is None


def test_claim_ties_broken_by_task_id(backend: Any) -> None:
    backend.enqueue_batch([req(task_id="b"), req(task_id="c"), req(task_id="a")], now=T0)
    assert [backend.claim("w", now=T0)["task_id"] for _ in range(3)] == ["a", "b", "c"]


def test_claim_marks_running_and_counts_attempt(backend: Any) -> None:
    task = backend.enqueue(req(), now=T0).task
    claimed = backend.claim("w1", now=T0 + 5)
    assert claimed["task_id"] == task["task_id"]
    assert claimed["status"] == "running"
    assert claimed["worker_id"] == "w1"
    assert claimed["attempts"] == 1
    assert claimed["started_at"] == clock.iso(T0 + 5)
    assert backend.get(task["task_id"])["status"] == "running"


def test_claim_on_empty_queue_returns_none(backend: Any) -> None:
    assert backend.claim("w1", now=T0) is None


def test_not_before_is_honoured(backend: Any) -> None:
    task = backend.enqueue(req(not_before=clock.iso(T0 + 60)), now=T0).task
    assert backend.claim("w1", now=T0) is None
    assert backend.claim("w1", now=T0 + 59.9) is None
    claimed = backend.claim("w1", now=T0 + 60)
    assert claimed is not None and claimed["task_id"] == task["task_id"]


def test_not_before_does_not_block_other_tasks(backend: Any) -> None:
    backend.enqueue(req(task_id="later", priority="critical", not_before=clock.iso(T0 + 60)),
                    now=T0)
    backend.enqueue(req(task_id="now", priority="low"), now=T0)
    assert backend.claim("w1", now=T0)["task_id"] == "now"


def test_depends_on_blocks_until_dependency_completes(backend: Any) -> None:
    backend.enqueue(req(task_id="parent", priority="low"), now=T0)
    backend.enqueue(req(task_id="child", priority="critical", depends_on=["parent"]), now=T0 + 1)
    first = backend.claim("w1", now=T0 + 2)
    assert first["task_id"] == "parent"
    assert backend.claim("w2", now=T0 + 3) is None  # parent is running, child still blocked
    backend.complete("parent", "w1", now=T0 + 4)
    assert backend.claim("w2", now=T0 + 5)["task_id"] == "child"


def test_depends_on_a_completed_task_is_accepted(backend: Any) -> None:
    run_once(backend, req(task_id="done"))
    backend.complete("done", "w1", now=T0 + 1)
    task = backend.enqueue(req(task_id="after", depends_on=["done"]), now=T0 + 2).task
    assert task["status"] == "queued"
    assert backend.claim("w1", now=T0 + 3)["task_id"] == "after"


def test_depends_on_a_failed_task_is_rejected(backend: Any) -> None:
    run_once(backend, req(task_id="broken", max_attempts=1))
    backend.fail("broken", "w1", error="boom", now=T0 + 1)
    with pytest.raises(UsageError, match="depends_on"):
        backend.enqueue(req(task_id="after", depends_on=["broken"]), now=T0 + 2)
    assert backend.live_tasks() == []


def test_failed_dependency_cancels_dependents(backend: Any) -> None:
    backend.enqueue(req(task_id="parent", max_attempts=1), now=T0)
    backend.enqueue(req(task_id="child", depends_on=["parent"]), now=T0 + 1)
    backend.enqueue(req(task_id="grandchild", depends_on=["child"]), now=T0 + 2)
    backend.enqueue(req(task_id="bystander"), now=T0 + 3)
    backend.claim("w1", now=T0 + 4)
    backend.fail("parent", "w1", error="boom", now=T0 + 5)
    assert live_ids(backend) == {"bystander"}
    for task_id in ("child", "grandchild"):
        record = backend.get(task_id)
        assert record["status"] == "cancelled"
        assert record["outcome"] == "dependency_failed"
        assert record["final"] is True
    assert {d["task_id"] for d in backend.dead_letters()} == {"parent"}


def test_cancelled_dependency_cancels_dependents(backend: Any) -> None:
    backend.enqueue(req(task_id="parent"), now=T0)
    backend.enqueue(req(task_id="child", depends_on=["parent"]), now=T0 + 1)
    backend.cancel("parent", now=T0 + 2)
    assert backend.live_tasks() == []
    assert backend.get("child")["status"] == "cancelled"
    assert "parent" in backend.get("child")["last_error"]


def test_worker_type_filter(backend: Any) -> None:
    backend.enqueue(req(task_id="plain", priority="critical"), now=T0)
    shell = backend.enqueue({"worker_type": "shell", "description": "echo hi"}, now=T0 + 1).task
    assert shell["command"] == ["bash", "-c", "echo hi"]
    assert backend.claim("w1", types=["shell"], now=T0 + 2)["task_id"] == shell["task_id"]
    assert backend.claim("w1", types=["shell"], now=T0 + 2) is None
    assert backend.claim("w2", types=["default", "shell"], now=T0 + 2)["task_id"] == "plain"


def test_paused_types_are_skipped(backend: Any) -> None:
    home = backend.home
    backend.enqueue({"task_id": "s1", "worker_type": "shell", "description": "echo",
                     "priority": "critical"}, now=T0)
    backend.enqueue(req(task_id="d1", priority="low"), now=T0)

    def pause(until: float | None) -> None:
        update_control(home, lambda s: s["paused_types"].update(
            {"shell": {"since": clock.iso(T0), "until": None if until is None
                       else clock.iso(until), "reason": "maintenance"}}), now=T0)

    pause(None)
    assert backend.claim("w1", now=T0 + 1)["task_id"] == "d1"
    assert backend.claim("w1", now=T0 + 1) is None
    assert backend.claim("w1", types=["shell"], now=T0 + 1) is None
    pause(T0 + 100)  # a pause with an expiry stops pausing once it has passed
    assert backend.claim("w1", now=T0 + 50) is None
    assert backend.claim("w1", now=T0 + 101)["task_id"] == "s1"


def test_resumed_type_is_claimable(backend: Any) -> None:
    backend.enqueue({"worker_type": "shell", "description": "echo"}, now=T0)
    update_control(backend.home, lambda s: s["paused_types"].update(
        {"shell": {"since": clock.iso(T0), "until": None, "reason": "x"}}), now=T0)
    assert backend.claim("w1", now=T0) is None
    update_control(backend.home, lambda s: s["paused_types"].pop("shell"), now=T0)
    assert backend.claim("w1", now=T0) is not None


# ------------------------------------------------------------------------------ finish
def test_complete_moves_task_to_history_final(backend: Any) -> None:
    task = run_once(backend, req())
    done = backend.complete(task["task_id"], "w1", exit_code=0, result={"answer": 42},
                            now=T0 + 7)
    assert done["status"] == "completed"
    assert backend.live_tasks() == []
    record = backend.get(task["task_id"])
    assert record["status"] == "completed"
    assert record["final"] is True
    assert record["outcome"] == "completed"
    assert record["completed_at"] == clock.iso(T0 + 7)
    assert record["result"] == {"answer": 42}
    finals = [r for r in backend.history_of(task["task_id"]) if r["final"]]
    assert len(finals) == 1
    assert backend.dead_letters() == []


def test_complete_by_wrong_worker_raises_invalid_transition(backend: Any) -> None:
    task = run_once(backend, req(), worker="w1")
    with pytest.raises(InvalidTransition):
        backend.complete(task["task_id"], "w2", now=T0 + 1)
    live = backend.get(task["task_id"])
    assert live["status"] == "running" and live["worker_id"] == "w1"
    assert backend.history_of(task["task_id"]) == []


def test_complete_of_queued_or_unknown_task_raises(backend: Any) -> None:
    task = backend.enqueue(req(), now=T0).task
    with pytest.raises(InvalidTransition):
        backend.complete(task["task_id"], "w1", now=T0)
    with pytest.raises(NotFound):
        backend.complete("t-unknown", "w1", now=T0)
    assert backend.get(task["task_id"])["status"] == "queued"


def test_complete_and_claim_is_complete_then_claim_in_one_commit(backend: Any) -> None:
    first = run_once(backend, req(priority="low"))
    low = backend.enqueue(req(priority="low"), now=T0 + 1).task
    high = backend.enqueue(req(priority="high"), now=T0 + 2).task
    revision = backend.stats(T0 + 2)["revision"]
    done, nxt = backend.complete_and_claim(first["task_id"], "w1", result={"n": 1},
                                           now=T0 + 3)
    assert done["status"] == "completed" and done["task_id"] == first["task_id"]
    assert nxt is not None and nxt["task_id"] == high["task_id"]  # claim order holds
    assert nxt["status"] == "running" and nxt["worker_id"] == "w1" and nxt["attempts"] == 1
    record = backend.get(first["task_id"])
    assert record["final"] is True and record["outcome"] == "completed"
    assert record["result"] == {"n": 1}
    assert backend.get(high["task_id"])["status"] == "running"
    assert backend.stats(T0 + 3)["revision"] == revision + 1  # one commit for both changes
    types = [e["type"] for e in events(backend.home)][-2:]
    assert types == ["task_completed", "task_claimed"]
    # Nothing runnable: completes, claims nothing.
    backend.claim("w2", now=T0 + 4)
    done, nxt = backend.complete_and_claim(high["task_id"], "w1", now=T0 + 5)
    assert done["status"] == "completed" and nxt is None
    assert backend.get(low["task_id"])["worker_id"] == "w2"


def test_complete_and_claim_checks_the_owner_and_claims_nothing_then(backend: Any) -> None:
    task = run_once(backend, req(), worker="w1")
    other = backend.enqueue(req(), now=T0 + 1).task
    with pytest.raises(InvalidTransition):
        backend.complete_and_claim(task["task_id"], "w2", now=T0 + 2)
    assert backend.get(other["task_id"])["status"] == "queued"
    assert backend.get(task["task_id"])["worker_id"] == "w1"


def test_complete_and_claim_respects_types_and_pauses(backend: Any) -> None:
    task = run_once(backend, req())
    backend.enqueue({"worker_type": "shell", "description": "echo"}, now=T0 + 1)
    update_control(backend.home, lambda s: s["paused_types"].update(
        {"shell": {"since": clock.iso(T0), "until": None, "reason": "x"}}), now=T0)
    _, nxt = backend.complete_and_claim(task["task_id"], "w1", now=T0 + 2)
    assert nxt is None
    update_control(backend.home, lambda s: s["paused_types"].pop("shell"), now=T0)
    again = run_once(backend, req(priority="critical"), now=T0 + 3)
    _, nxt = backend.complete_and_claim(again["task_id"], "w1", types=["default"],
                                        now=T0 + 4)
    assert nxt is None
    backend.enqueue(req(priority="low"), now=T0 + 5)
    third = backend.claim("w1", types=["default"], now=T0 + 6)
    _, nxt = backend.complete_and_claim(third["task_id"], "w1", types=["shell"], now=T0 + 7)
    assert nxt is not None and nxt["worker_type"] == "shell"


def test_fail_retries_with_backoff_bounded_by_max(make_backend: Callable[..., Any]) -> None:
    backend = make_backend(retry_backoff_base_s=10, retry_backoff_max_s=15, retry_jitter=0)
    task = backend.enqueue(req(max_attempts=3), now=T0).task
    tid = task["task_id"]

    backend.claim("w1", now=T0)
    after1 = backend.fail(tid, "w1", error="first", exit_code=1, now=T0 + 1)
    assert after1["status"] == "queued"
    assert after1["worker_id"] is None
    assert after1["attempts"] == 1
    assert after1["last_error"] == "first"
    assert clock.parse_iso(after1["not_before"]) == pytest.approx(T0 + 1 + 10, abs=0.002)
    assert backend.claim("w1", now=T0 + 10) is None  # not before T0+11
    assert backend.claim("w1", now=T0 + 11)["attempts"] == 2

    after2 = backend.fail(tid, "w1", error="second", now=T0 + 12)
    delay = clock.parse_iso(after2["not_before"]) - (T0 + 12)
    assert delay == pytest.approx(15, abs=0.002)  # 10 * 2 = 20, capped at 15
    assert backend.claim("w1", now=T0 + 12 + 15)["attempts"] == 3

    final = backend.fail(tid, "w1", error="third", now=T0 + 40)
    assert final["status"] == "failed"
    assert backend.live_tasks() == []
    assert [d["task_id"] for d in backend.dead_letters()] == [tid]
    record = backend.get(tid)
    assert record["status"] == "failed"
    assert record["attempts"] == 3


def test_fail_backoff_with_jitter_stays_within_bounds(make_backend: Callable[..., Any]) -> None:
    backend = make_backend(retry_backoff_base_s=4, retry_backoff_max_s=300, retry_jitter=0.25)
    for i in range(20):
        task = backend.enqueue(req(), now=T0).task
        backend.claim("w", now=T0)
        out = backend.fail(task["task_id"], "w", error="x", now=T0 + i)
        delay = clock.parse_iso(out["not_before"]) - (T0 + i)
        assert 3.0 - 0.002 <= delay <= 5.0 + 0.002
        backend.cancel(task["task_id"], now=T0 + i)


def test_fail_backoff_never_exceeds_max_even_with_jitter(make_backend: Callable[..., Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make_backend(retry_backoff_base_s=100, retry_backoff_max_s=10, retry_jitter=0.25)
    monkeypatch.setattr(random, "uniform", lambda lo, hi: hi)  # worst-case jitter
    task = run_once(backend, req(max_attempts=5))
    out = backend.fail(task["task_id"], "w1", error="x", now=T0)
    assert clock.parse_iso(out["not_before"]) - T0 <= 10 + 0.002


def test_fail_without_retry_goes_straight_to_dead_letters(backend: Any) -> None:
    task = run_once(backend, req(max_attempts=5))
    out = backend.fail(task["task_id"], "w1", error="fatal", retry=False, now=T0 + 1)
    assert out["status"] == "failed"
    assert [d["task_id"] for d in backend.dead_letters()] == [task["task_id"]]
    assert backend.get(task["task_id"])["status"] == "failed"  # the dead letter
    finals = [r for r in backend.history_of(task["task_id"]) if r["final"]]
    assert [(r["status"], r["attempts"]) for r in finals] == [("failed", 1)]


def test_fail_after_max_attempts_dead_letters_and_final_history(
        make_backend: Callable[..., Any]) -> None:
    backend = make_backend(retry_backoff_base_s=0)
    tid = backend.enqueue(req(max_attempts=2), now=T0).task["task_id"]
    for attempt in (1, 2):
        claimed = backend.claim("w1", now=T0 + attempt)
        assert claimed["attempts"] == attempt
        backend.fail(tid, "w1", error=f"boom {attempt}", now=T0 + attempt)
    assert backend.live_tasks() == []
    letters = backend.dead_letters()
    assert [d["task_id"] for d in letters] == [tid]
    assert letters[0]["status"] == "failed"
    assert letters[0]["last_error"] == "boom 2"
    records = backend.history_of(tid)
    assert [(r["attempts"], r["final"], r["status"]) for r in records] == [
        (1, False, "failed"), (2, True, "failed")]
    assert event_counts(backend.home, "task_dead_lettered")[tid] == 1
    assert event_counts(backend.home, "task_failed")[tid] == 1


def test_fail_by_wrong_worker_raises(backend: Any) -> None:
    task = run_once(backend, req())
    with pytest.raises(InvalidTransition):
        backend.fail(task["task_id"], "intruder", error="x", now=T0)
    assert backend.get(task["task_id"])["status"] == "running"


def test_release_does_not_spend_an_attempt(backend: Any) -> None:
    tid = backend.enqueue(req(max_attempts=1), now=T0).task["task_id"]
    for i in range(3):
        claimed = backend.claim("w1", now=T0 + i)
        assert claimed["attempts"] == 1
        released = backend.release(tid, "w1", reason="shutting down", now=T0 + i)
        assert released["status"] == "queued"
        assert released["attempts"] == 0
        assert released["worker_id"] is None
    assert backend.dead_letters() == []
    claimed = backend.claim("w1", now=T0 + 10)
    assert claimed is not None and claimed["attempts"] == 1  # immediately claimable
    assert all(not r["final"] for r in backend.history_of(tid))


def test_release_by_wrong_worker_raises(backend: Any) -> None:
    task = run_once(backend, req())
    with pytest.raises(InvalidTransition):
        backend.release(task["task_id"], "intruder", reason="x", now=T0)


def test_reclaim_counts_the_attempt(make_backend: Callable[..., Any]) -> None:
    backend = make_backend(retry_backoff_base_s=0)
    tid = backend.enqueue(req(max_attempts=2), now=T0).task["task_id"]
    backend.claim("w1", now=T0)
    out = backend.reclaim(tid, reason="worker died", now=T0 + 1)
    assert out["status"] == "queued" and out["attempts"] == 1
    assert backend.history_of(tid)[-1]["outcome"] == "reclaimed"
    backend.claim("w2", now=T0 + 2)
    out = backend.reclaim(tid, reason="worker died again", now=T0 + 3)
    assert out["status"] == "failed"
    assert [d["task_id"] for d in backend.dead_letters()] == [tid]


def test_reclaim_with_owner_requeues_only_that_owners_task(
        make_backend: Callable[..., Any]) -> None:
    """The supervisor proved w1 dead, but meanwhile the task was requeued and claimed by w2:
    a reclaim naming w1 changes nothing (None), so w2's attempt is not stolen."""
    backend = make_backend(retry_backoff_base_s=0)
    tid = backend.enqueue(req(max_attempts=3), now=T0).task["task_id"]
    backend.claim("w1", now=T0)
    backend.release(tid, "w1", reason="handed back", now=T0 + 1)
    backend.claim("w2", now=T0 + 2)
    history = backend.history_of(tid)
    assert backend.reclaim(tid, reason="w1 died", worker_id="w1", now=T0 + 3) is None
    task = backend.get(tid)
    assert task["status"] == "running" and task["worker_id"] == "w2"
    assert task["attempts"] == 1
    assert backend.history_of(tid) == history
    # Named correctly, it reclaims as before (the attempt counts).
    out = backend.reclaim(tid, reason="w2 died", worker_id="w2", now=T0 + 4)
    assert out is not None and out["status"] == "queued" and out["attempts"] == 1
    assert backend.history_of(tid)[-1]["outcome"] == "reclaimed"
    # Not running (queued now), or not live at all: a no-op with an owner named ...
    assert backend.reclaim(tid, reason="again", worker_id="w2", now=T0 + 5) is None
    assert backend.reclaim("t-nope", reason="x", worker_id="w2", now=T0 + 5) is None
    assert backend.get(tid)["status"] == "queued"
    # ... and an error without one (unchanged behaviour).
    with pytest.raises(InvalidTransition):
        backend.reclaim(tid, reason="again", now=T0 + 5)
    with pytest.raises(NotFound):
        backend.reclaim("t-nope", reason="x", now=T0 + 5)


# ------------------------------------------------------------------------------ operators
def test_cancel_queued_task_finishes_at_once(backend: Any) -> None:
    tid = backend.enqueue(req(), now=T0).task["task_id"]
    out = backend.cancel(tid, reason="not needed", now=T0 + 1)
    assert out["status"] == "cancelled"
    assert backend.live_tasks() == []
    record = backend.get(tid)
    assert record["final"] is True and record["status"] == "cancelled"
    assert record["last_error"] == "not needed"
    assert backend.dead_letters() == []
    assert backend.claim("w1", now=T0 + 2) is None


@pytest.mark.parametrize("ending", ["fail", "release"])
def test_cancel_running_task_requests_then_ends_cancelled(backend: Any, ending: str) -> None:
    task = run_once(backend, req(max_attempts=5))
    tid = task["task_id"]
    out = backend.cancel(tid, now=T0 + 1)
    assert out["status"] == "running"
    assert out["cancel_requested"] is True
    assert backend.get(tid)["cancel_requested"] is True
    # Cancelling again is harmless.
    assert backend.cancel(tid, now=T0 + 2)["cancel_requested"] is True
    if ending == "fail":
        end = backend.fail(tid, "w1", error="terminated", now=T0 + 3)  # retries left, still
    else:
        end = backend.release(tid, "w1", reason="stopping", now=T0 + 3)
    assert end["status"] == "cancelled"
    assert backend.live_tasks() == []
    assert backend.dead_letters() == []
    record = backend.get(tid)
    assert record["status"] == "cancelled" and record["final"] is True


def test_cancel_unknown_or_finished_task_raises_not_found(backend: Any) -> None:
    with pytest.raises(NotFound):
        backend.cancel("t-unknown", now=T0)
    task = run_once(backend, req())
    backend.complete(task["task_id"], "w1", now=T0)
    with pytest.raises(NotFound):
        backend.cancel(task["task_id"], now=T0)


def test_reprioritize_changes_claim_order(backend: Any) -> None:
    backend.enqueue(req(task_id="first", priority="medium"), now=T0)
    backend.enqueue(req(task_id="second", priority="medium"), now=T0 + 1)
    out = backend.reprioritize("second", "critical", now=T0 + 2)
    assert out["priority"] == "critical"
    assert backend.get("second")["priority"] == "critical"
    assert backend.claim("w1", now=T0 + 3)["task_id"] == "second"


def test_reprioritize_rejects_bad_input(backend: Any) -> None:
    backend.enqueue(req(task_id="x"), now=T0)
    with pytest.raises(UsageError, match="priority"):
        backend.reprioritize("x", "urgent", now=T0)
    with pytest.raises(NotFound):
        backend.reprioritize("t-unknown", "low", now=T0)
    assert backend.get("x")["priority"] == "medium"


def test_requeue_dead_makes_a_fresh_queued_task(make_backend: Callable[..., Any]) -> None:
    backend = make_backend(retry_backoff_base_s=0)
    tid = run_once(backend, req(max_attempts=1, not_before=clock.iso(T0 - 10)))["task_id"]
    backend.fail(tid, "w1", error="boom", now=T0 + 1)
    out = backend.requeue_dead(tid, now=T0 + 2)
    assert out["status"] == "queued"
    assert out["attempts"] == 0
    assert out["not_before"] is None
    assert out["worker_id"] is None
    assert backend.dead_letters() == []
    assert live_ids(backend) == {tid}
    assert backend.claim("w1", now=T0 + 3)["attempts"] == 1
    with pytest.raises(NotFound):
        backend.requeue_dead(tid, now=T0 + 4)  # no longer a dead letter
    with pytest.raises(NotFound):
        backend.requeue_dead("t-unknown", now=T0 + 4)


def test_requeue_dead_respects_live_dedup_key(backend: Any) -> None:
    old = run_once(backend, req(dedup_key="k", max_attempts=1))["task_id"]
    backend.fail(old, "w1", error="boom", now=T0 + 1)
    new = backend.enqueue(req(dedup_key="k"), now=T0 + 2).task["task_id"]
    try:
        backend.requeue_dead(old, now=T0 + 3)
    except (InvalidTransition, UsageError):
        pass  # refusing is one acceptable answer
    holders = [t["task_id"] for t in backend.live_tasks() if t.get("dedup_key") == "k"]
    assert holders == [new] or len(holders) == 1


def test_purge_dead_removes_dead_letters_but_keeps_history(
        make_backend: Callable[..., Any]) -> None:
    backend = make_backend(retry_backoff_base_s=0)
    ids = []
    for i in range(3):
        tid = run_once(backend, req(max_attempts=1), now=T0 + i)["task_id"]
        backend.fail(tid, "w1", error="boom", now=T0 + i)
        ids.append(tid)
    assert backend.purge_dead([ids[0]]) == [ids[0]]
    assert {d["task_id"] for d in backend.dead_letters()} == set(ids[1:])
    assert backend.purge_dead([ids[0]]) == []  # already gone
    assert sorted(backend.purge_dead()) == sorted(ids[1:])
    assert backend.dead_letters() == []
    for tid in ids:
        assert backend.get(tid)["status"] == "failed"  # the final history record stays


def test_backpressure_past_max_queue_depth_and_force(make_backend: Callable[..., Any]) -> None:
    backend = make_backend(max_queue_depth=2)
    backend.enqueue(req(), now=T0)
    backend.enqueue(req(), now=T0)
    with pytest.raises(Backpressure) as info:
        backend.enqueue(req(), now=T0)
    assert info.value.exit_code == EXIT_TEMPFAIL == 75
    assert isinstance(info.value, TemporaryFailure)
    assert len(backend.live_tasks()) == 2
    forced = backend.enqueue(req(), force=True, now=T0)
    assert forced.created is True
    assert len(backend.live_tasks()) == 3
    # Running tasks do not count as queued.
    backend.claim("w1", now=T0)
    backend.claim("w1", now=T0)
    backend.enqueue(req(), now=T0)


def test_backpressure_counts_the_whole_batch(make_backend: Callable[..., Any]) -> None:
    backend = make_backend(max_queue_depth=3)
    with pytest.raises(Backpressure):
        backend.enqueue_batch([req() for _ in range(4)], now=T0)
    assert backend.live_tasks() == []
    assert len(backend.enqueue_batch([req() for _ in range(3)], now=T0)) == 3


# ------------------------------------------------------------------------------ submit / ingest
def test_submit_publishes_to_inbox_and_ingest_queues_it(backend: Any) -> None:
    if not hasattr(backend, "submit"):
        pytest.skip("backend has no inbox")
    tid = backend.submit(req(description="via inbox"), now=T0)
    assert tid not in live_ids(backend)
    assert backend.ingest(now=T0 + 1) == 1
    assert live_ids(backend) == {tid}
    assert backend.ingest(now=T0 + 2) == 0


def test_any_operation_drains_the_inbox(backend: Any) -> None:
    if not hasattr(backend, "submit"):
        pytest.skip("backend has no inbox")
    tid = backend.submit(req(priority="critical"), now=T0)
    claimed = backend.claim("w1", now=T0 + 1)
    assert claimed is not None and claimed["task_id"] == tid


# ------------------------------------------------------------------------------ events, history
def test_events_file_lines_carry_the_envelope(backend: Any) -> None:
    task = run_once(backend, req(correlation_id="corr-1"))
    backend.complete(task["task_id"], "w1", now=T0 + 1)
    read = read_jsonl(backend.home.events_file)
    assert read.bad_lines == 0
    assert read.records
    for event in read.records:
        assert tuple(event) == ENVELOPE_FIELDS
        assert isinstance(event["data"], dict)
        assert event["source"] == "queue"
    enqueued = [e for e in read.records if e["type"] == "task_enqueued"]
    assert [e["task_id"] for e in enqueued] == [task["task_id"]]
    assert enqueued[0]["timestamp"] == clock.iso(T0)
    assert enqueued[0]["correlation_id"] == "corr-1"
    claimed = [e for e in read.records if e["type"] == "task_claimed"]
    assert claimed[0]["worker_id"] == "w1" and claimed[0]["data"]["attempt"] == 1
    # Lines are plain JSON to any reader, not just orjson.
    for line in backend.home.events_file.read_text().splitlines():
        json.loads(line)


def test_history_of_shows_every_attempt(make_backend: Callable[..., Any]) -> None:
    backend = make_backend(retry_backoff_base_s=0)
    tid = backend.enqueue(req(max_attempts=5), now=T0).task["task_id"]
    backend.claim("w1", now=T0 + 1)
    backend.fail(tid, "w1", error="e1", exit_code=3, now=T0 + 2)
    backend.claim("w2", now=T0 + 3)
    backend.release(tid, "w2", reason="shutdown", now=T0 + 4)
    backend.claim("w3", now=T0 + 5)
    backend.fail(tid, "w3", error="e2", now=T0 + 6)
    backend.claim("w4", now=T0 + 7)
    backend.complete(tid, "w4", now=T0 + 8)
    records = backend.history_of(tid)
    assert [(r["attempts"], r["worker_id"], r["outcome"], r["final"]) for r in records] == [
        (1, "w1", "failed", False),
        (2, "w2", "released", False),
        (2, "w3", "failed", False),
        (3, "w4", "completed", True),
    ]
    assert records[0]["exit_code"] == 3 and records[0]["last_error"] == "e1"
    assert backend.history_of("t-unknown") == []
    assert backend.get("t-unknown") is None


# ------------------------------------------------------------------------------ leases
def test_a_stale_lease_cannot_commit(make_backend: Callable[..., Any]) -> None:
    """A worker that was presumed dead and lost its claim (reclaimed, claimed again by the
    same worker id after a restart) cannot finish the new attempt with its old lease."""
    from coordination.queue.rules import lease_token

    backend = make_backend(retry_backoff_base_s=0)
    first = run_once(backend, req(max_attempts=3))
    old_lease = lease_token(first)
    backend.reclaim(first["task_id"], reason="heartbeat lost", worker_id="w1", now=T0 + 1)
    again = backend.claim("w1", now=T0 + 2)
    assert again is not None and again["task_id"] == first["task_id"]
    with pytest.raises(InvalidTransition, match="lease lost"):
        backend.complete(first["task_id"], "w1", lease=old_lease, now=T0 + 3)
    assert backend.get(first["task_id"])["status"] == "running"
    done = backend.complete(first["task_id"], "w1", lease=lease_token(again), now=T0 + 4)
    assert done["status"] == "completed"


def test_a_claim_records_its_host_and_a_fresh_lease(
        make_backend: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim records the claiming process's host (HARNESS_HOST_ID), a fresh lease token
    and lease_until = claim time + heartbeat_timeout_s; handing the task back clears them
    all, and the next claim's token is new."""
    from coordination.queue.rules import lease_token

    monkeypatch.setenv("HARNESS_HOST_ID", "h7")
    backend = make_backend(heartbeat_timeout_s=30)
    first = run_once(backend, req())
    assert first["host_id"] == "h7" and first["lease_until"] == clock.iso(T0 + 30)
    assert first["lease_token"] and lease_token(first) == first["lease_token"]
    queued = backend.release(first["task_id"], "w1", reason="x", now=T0 + 1,
                             lease=first["lease_token"])
    assert (queued["worker_id"], queued["host_id"], queued["lease_token"],
            queued["lease_until"]) == (None, None, None, None)
    monkeypatch.setenv("HARNESS_HOST_ID", "h8")
    again = backend.claim("w1", now=T0 + 2)
    assert again is not None and again["host_id"] == "h8"
    assert again["lease_token"] != first["lease_token"]
    with pytest.raises(UsageError, match="HARNESS_HOST_ID"):
        monkeypatch.setenv("HARNESS_HOST_ID", "../h")
        backend.claim("w2", now=T0 + 3)


def test_heartbeat_extends_the_lease_and_refuses_a_lost_one(
        make_backend: Callable[..., Any]) -> None:
    backend = make_backend(heartbeat_timeout_s=30, retry_backoff_base_s=0)
    task = run_once(backend, req(max_attempts=3))
    tid, token = task["task_id"], task["lease_token"]
    assert backend.heartbeat("w1", {}, now=T0 + 1) == {}
    assert backend.heartbeat("w1", {tid: token}, now=T0 + 10) == {tid: clock.iso(T0 + 40)}
    assert backend.get(tid)["lease_until"] == clock.iso(T0 + 40)
    with pytest.raises(InvalidTransition, match="lease lost"):
        backend.heartbeat("w1", {tid: "1-stale"}, now=T0 + 11)
    with pytest.raises(InvalidTransition):
        backend.heartbeat("intruder", {tid: token}, now=T0 + 11)
    assert backend.get(tid)["lease_until"] == clock.iso(T0 + 40)  # nothing changed
    assert backend.reclaim(tid, reason="gone", worker_id="w1", lease=token,
                           now=T0 + 12) is not None
    with pytest.raises(InvalidTransition, match="not running"):  # queued again
        backend.heartbeat("w1", {tid: token}, now=T0 + 13)
    again = backend.claim("w2", now=T0 + 14)
    assert again is not None and again["task_id"] == tid
    with pytest.raises(InvalidTransition, match=r"lease lost|held by"):
        backend.heartbeat("w1", {tid: token}, now=T0 + 15)


def test_expired_leases_lists_running_tasks_past_their_lease(
        make_backend: Callable[..., Any]) -> None:
    backend = make_backend(heartbeat_timeout_s=30)
    backend.enqueue_batch([req(task_id="a"), req(task_id="b"), req(task_id="c")], now=T0)
    a = backend.claim("w1", now=T0)
    b = backend.claim("w2", now=T0 + 20)
    assert a is not None and b is not None
    assert backend.expired_leases(T0 + 29) == []
    assert [t["task_id"] for t in backend.expired_leases(T0 + 31)] == ["a"]
    assert [t["task_id"] for t in backend.expired_leases(T0 + 51)] == ["a", "b"]
    backend.heartbeat("w1", {"a": a["lease_token"]}, now=T0 + 40)
    assert [t["task_id"] for t in backend.expired_leases(T0 + 51)] == ["b"]
    backend.complete("b", "w2", lease=b["lease_token"], now=T0 + 52)
    assert backend.expired_leases(T0 + 60) == []  # a's lease runs to T0 + 70; c is queued


def test_a_lease_reclaim_is_fenced_by_expiry_and_happens_once(
        make_backend: Callable[..., Any]) -> None:
    """reclaim(expired_only=True) leaves a task whose lease has not expired (a heartbeat
    came first: fail closed) and reclaims an expired one exactly once, whoever asks."""
    backend = make_backend(heartbeat_timeout_s=30, retry_backoff_base_s=0)
    task = run_once(backend, req(max_attempts=3))
    tid, token = task["task_id"], task["lease_token"]
    assert backend.reclaim(tid, reason="lease", worker_id="w1", lease=token,
                           expired_only=True, now=T0 + 29) is None
    assert backend.get(tid)["status"] == "running"
    done = backend.reclaim(tid, reason="lease", worker_id="w1", lease=token,
                           expired_only=True, now=T0 + 31)
    assert done is not None and done["status"] == "queued" and done["attempts"] == 1
    assert backend.reclaim(tid, reason="lease", worker_id="w1", lease=token,
                           expired_only=True, now=T0 + 32) is None
    reclaimed = [r for r in backend.history_of(tid) if r["outcome"] == "reclaimed"]
    assert len(reclaimed) == 1


def test_check_reports_an_expired_lease_and_repair_reclaims_it(
        make_backend: Callable[..., Any]) -> None:
    backend = make_backend(heartbeat_timeout_s=30, retry_backoff_base_s=0)
    task = run_once(backend, req(max_attempts=3))
    assert "lease_expired" not in {f.code for f in backend.check(now=T0 + 29)}
    found = {f.code: f for f in backend.check(now=T0 + 31)}
    assert found["lease_expired"].level == "warning"
    repaired = {f.code: f for f in backend.check(repair=True, now=T0 + 31)}
    assert repaired["lease_expired"].repaired
    assert backend.get(task["task_id"])["status"] == "queued"
    assert "lease_expired" not in {f.code for f in backend.check(now=T0 + 32)}


# ------------------------------------------------------------------------------ wake-ups
def test_wait_wakes_on_a_change_by_another_process_and_times_out_otherwise(
        backend: Any) -> None:
    import threading
    import time

    assert backend.wait(0.2) is False  # nothing changed
    other = BACKENDS[backend.backend_name](backend.home)
    timer = threading.Timer(0.2, lambda: other.enqueue(req(), now=T0))
    started = time.monotonic()
    timer.start()
    try:
        assert backend.wait(5) is True
        assert time.monotonic() - started < 2.0
    finally:
        timer.join()
    calls: list[int] = []
    stop = backend.on_change(lambda: calls.append(1))
    try:
        other.enqueue(req(), now=T0 + 1)
        deadline = time.monotonic() + 2
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls
    finally:
        stop()


def test_next_due_is_the_earliest_future_not_before_of_queued_tasks(backend: Any) -> None:
    assert backend.next_due(now=T0) is None
    backend.enqueue(req(not_before=clock.iso(T0 + 50)), now=T0)
    backend.enqueue(req(not_before=clock.iso(T0 + 20), worker_type="shell",
                        description="x"), now=T0)
    backend.enqueue(req(not_before=clock.iso(T0 - 5)), now=T0)  # due already: not future
    assert backend.next_due(now=T0) == clock.iso(T0 + 20)
    assert backend.next_due(types=["default"], now=T0) == clock.iso(T0 + 50)
    assert backend.next_due(types=["other"], now=T0) is None
    assert backend.next_due(now=T0 + 60) is None


# ------------------------------------------------------------------------------ retention
def test_retention_keeps_the_newest_history_and_what_queued_tasks_need(
        make_backend: Callable[..., Any]) -> None:
    """apply_retention past history_max_lines leaves the newest history_keep_lines records
    in the live history (the file backend archives the rest, the postgres backend deletes
    them), and a completed dependency of a queued task stays known as completed."""
    backend = make_backend(history_max_lines=10, history_keep_lines=4)
    dep = run_once(backend, req())
    backend.complete(dep["task_id"], "w1", now=T0)
    backend.enqueue(req(depends_on=[dep["task_id"]], not_before=clock.iso(T0 + 10**6)),
                    now=T0)
    done = []
    for i in range(12):
        task = run_once(backend, req(description=f"t{i}"), now=T0 + i)
        backend.complete(task["task_id"], "w1", now=T0 + i)
        done.append(task["task_id"])
    assert backend.apply_retention(dry_run=True).errors == []
    assert len(backend.history_since(None)[0]) == 13  # a dry run changes nothing
    report = backend.apply_retention(now=T0 + 100)
    assert report.errors == []
    kept = [r["task_id"] for r in backend.history_since(None)[0]]
    assert kept[-4:] == done[-4:] and len(kept) <= 5
    # the dependency still counts as completed: a new waiter is admitted behind it
    backend.enqueue(req(depends_on=[dep["task_id"]]), now=T0 + 101)
