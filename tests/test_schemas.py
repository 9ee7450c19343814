"""The file contract: docs/coordination.md and coordination/schemas/ against the real code.

A real home is driven through the public API (queue, events, specs, control); every file the
code wrote is validated against its JSON Schema, and the doc is checked against the code it
describes (config table, task fields, paths, locks, event types, jq one-liners, examples).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import make_home, needs, present
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from coordination import clock
from coordination.config import config_reference_markdown
from coordination.config_keys import SYSTEM_KEYS, TYPE_KEYS
from coordination.control import update_control
from coordination.events import ENVELOPE_FIELDS, SEVERITIES, emit, make_event
from coordination.jsonl import read_jsonl
from coordination.locks import lock_for
from coordination.paths import LOCK_NAMES, Home
from coordination.queue import TaskQueue
from coordination.specs import EXIT_REASONS, SPEC_STATES, complete_spec, new_spec, write_spec
from coordination.store import read_json, replace_json
from coordination.tasks import PRIORITIES, REQUEST_FIELDS, STATUSES, TASK_FIELDS

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "coordination" / "schemas"
DOC = ROOT / "docs" / "coordination.md"

SCHEMA_FILES = (
    "task.schema.json", "task-queue.schema.json", "task-request.schema.json",
    "history-record.schema.json", "dead-letter.schema.json", "event.schema.json",
    "worker-spec.schema.json", "control.schema.json", "system-config.schema.json",
    "worker-types.schema.json", "health.schema.json", "supervisor-state.schema.json",
    "queue-journal.schema.json",
)

JQ_QUEUED = ("""jq '[.tasks[] | select(.status == "queued")] | length' """
             "coordination/task-queue.json")
JQ_LIST = ("jq -c '.tasks[] | {task_id, priority, status, created_at}' "
           "coordination/task-queue.json")
# The wait one-liner as specified (`wait: (A) - (B)`) needs jq >= 1.7; jq 1.6 (Debian 12)
# accepts no binary operator in an object value without parentheses, so the doc also gives
# `wait: ((A) - (B))` for it. The verbatim form is run through libjq >= 1.7 (the `jq` Python
# binding) where the jq command is 1.6.
JQ_WAIT_VERBATIM = (
    """jq '[.tasks[] | select(.started_at != null and .created_at != null)] | """
    """map({task_id, wait: (.started_at | sub("\\\\.[0-9]+"; "") | """
    """strptime("%Y-%m-%dT%H:%M:%SZ") | mktime) - (.created_at | sub("\\\\.[0-9]+"; "") | """
    """strptime("%Y-%m-%dT%H:%M:%SZ") | mktime)})' coordination/task-queue.json"""
)
JQ_WAIT = (
    """jq '[.tasks[] | select(.started_at != null and .created_at != null)] | """
    """map({task_id, wait: ((.started_at | sub("\\\\.[0-9]+"; "") | """
    """strptime("%Y-%m-%dT%H:%M:%SZ") | mktime) - (.created_at | sub("\\\\.[0-9]+"; "") | """
    """strptime("%Y-%m-%dT%H:%M:%SZ") | mktime))})' coordination/task-queue.json"""
)

T0 = 1767225600.0  # 2026-01-01T00:00:00.000Z


# ------------------------------------------------------------------------------- helpers
def _load_schemas() -> dict[str, dict[str, Any]]:
    return {name: json.loads((SCHEMAS / name).read_text()) for name in SCHEMA_FILES}


_SCHEMAS = _load_schemas()
_REGISTRY: Registry = Registry().with_resources(
    (name, Resource.from_contents(schema)) for name, schema in _SCHEMAS.items()
)


def validator(name: str) -> Draft202012Validator:
    # format_checker=None: "format" is not asserted; patterns carry the precision.
    return Draft202012Validator(_SCHEMAS[name], registry=_REGISTRY, format_checker=None)


def assert_valid(name: str, instance: Any, what: str = "") -> None:
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{what or name}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])


def is_valid(name: str, instance: Any) -> bool:
    return bool(validator(name).is_valid(instance))


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------- the home
class Scenario:
    """A home driven through every queue transition, with snapshots checked on the way."""

    def __init__(self, root: Path) -> None:
        self.home = make_home(root.parent, root.name)
        self.q = TaskQueue(self.home)
        self.queue_revisions_checked = 0
        self.inbox_files_checked = 0
        self.dead_letters_checked = 0
        self.claimed: list[str] = []

    def check_queue(self) -> None:
        self.q.sync()  # the jq view as it is once the queue has been quiet for 1 s
        data = read_json(self.home.queue_file)
        assert_valid("task-queue.schema.json", data, "task-queue.json")
        for task in data["tasks"]:
            assert list(task) == list(TASK_FIELDS)  # key order too: what jq -c shows
        if self.home.queue_base_file.exists():
            assert_valid("task-queue.schema.json", read_json(self.home.queue_base_file),
                         "task-queue.base.json")
        self.check_journal()
        self.queue_revisions_checked += 1

    def check_journal(self) -> None:
        data = self.home.queue_journal.read_bytes()
        whole = data.split(b"\0", 1)[0]
        assert whole.endswith(b"\n") and not data[len(whole):].strip(b"\0")
        lines = [json.loads(raw) for raw in whole.splitlines()]
        assert "journal" in lines[0]
        for line in lines:
            assert_valid("queue-journal.schema.json", line, "task-queue.journal")

    def check_dead_letters(self) -> None:
        for path in sorted(self.home.dead_letters.glob("*.json")):
            letter = read_json(path)
            assert letter["task_id"] == path.stem
            assert_valid("dead-letter.schema.json", letter, str(path))
            self.dead_letters_checked += 1

    def claim(self, worker: str, now: float, **kw: Any) -> str:
        task = self.q.claim(worker, now=now, **kw)
        assert task is not None
        self.claimed.append(task["task_id"])
        self.check_queue()
        return str(task["task_id"])

    def step(self, result: Any) -> Any:
        self.check_queue()
        return result

    def run(self) -> None:
        q, h = self.q, self.home
        w1 = clock.new_worker_id("alpha", T0)
        w2 = clock.new_worker_id("alpha", T0 + 0.001)
        w3 = clock.new_worker_id("beta", T0)
        self.workers = (w1, w2, w3)
        self.step(q.enqueue({"task_id": "A", "priority": "high", "command": ["echo", "A"],
                             "dedup_key": "dedup-A", "correlation_id": "corr-1",
                             "budget": 1000, "timeout_s": 30}, now=T0))
        self.step(q.enqueue({"task_id": "B", "command": ["echo", "B"], "depends_on": ["A"]},
                            now=T0 + 1))
        self.step(q.enqueue({"task_id": "C", "priority": "low", "command": ["false"],
                             "max_attempts": 2}, now=T0 + 2))
        self.step(q.enqueue({"task_id": "D", "priority": "critical", "command": ["true"]},
                            now=T0 + 3))
        self.step(q.enqueue({"task_id": "E", "worker_type": "shell",
                             "description": "echo hi"}, now=T0 + 4))
        dup = self.step(q.enqueue({"command": ["echo", "dup"], "dedup_key": "dedup-A"},
                                  now=T0 + 5))
        assert not dup.created and dup.task["task_id"] == "A"
        self.step(q.enqueue({"task_id": "F", "priority": "low", "command": ["echo", "F"],
                             "depends_on": ["C"]}, now=T0 + 6))
        self.step(q.enqueue_batch([
            {"task_id": "G", "priority": "high", "command": ["echo", "G"]},
            {"task_id": "H", "priority": "low", "command": ["echo", "H"],
             "not_before": clock.iso(T0 + 1000)},
        ], now=T0 + 7))
        # A producer's inbox file (no lock), and a garbage one.
        assert q.submit({"task_id": "I", "command": ["echo", "I"], "correlation_id": "corr-1"},
                        now=T0 + 8, durable=True) == "I"
        for path in sorted(h.inbox.glob("*.json")):
            assert_valid("task-request.schema.json", read_json(path), str(path))
            self.inbox_files_checked += 1
        (h.inbox / "bad.json").write_text("{not json\n")
        # The next transaction drains the inbox: I is admitted, bad.json rejected.
        self.step(q.cancel("D", now=T0 + 9))
        assert (h.inbox_rejected / "bad.json").exists()
        assert (h.inbox_rejected / "bad.reason").exists()
        assert not (h.inbox / "I.json").exists()

        assert self.claim(w1, T0 + 10) == "A"
        assert self.claim(w2, T0 + 12) == "G"
        assert self.claim(w3, T0 + 14) == "E"
        self.step(q.complete("A", w1, exit_code=0, result={"tokens_used": 12}, now=T0 + 20))
        self.step(q.reprioritize("B", "critical", now=T0 + 21))
        assert self.claim(w1, T0 + 22) == "B"
        assert self.step(q.cancel("B", now=T0 + 23))["cancel_requested"] is True
        assert self.step(q.fail("B", w1, error="stopped for cancel", exit_code=-15,
                                now=T0 + 24))["status"] == "cancelled"
        self.step(q.release("G", w2, reason="worker draining", now=T0 + 25))
        retried = self.step(q.fail("E", w3, error="boom", exit_code=1, now=T0 + 26))
        assert retried["status"] == "queued" and retried["not_before"] is not None
        assert self.claim(w2, T0 + 27) == "G"
        self.step(q.complete("G", w2, now=T0 + 28))
        assert self.claim(w1, T0 + 40) == "E"
        self.step(q.reclaim("E", reason="pid 4242 is gone", now=T0 + 41))
        assert self.claim(w1, T0 + 50) == "E"
        assert self.claim(w2, T0 + 55) == "I"
        self.step(q.release("E", w1, reason="worker stopping", now=T0 + 56))
        self.control = update_control(
            h, lambda s: s["paused_types"].update(
                shell={"since": clock.iso(T0 + 57), "until": None, "reason": "maintenance"}),
            now=T0 + 57)
        assert self.claim(w3, T0 + 62) == "C"  # E is paused (shell)
        self.step(q.fail("C", w3, error="exit 1", exit_code=1, now=T0 + 63))
        assert self.claim(w3, T0 + 100, types=["default"]) == "C"
        self.step(q.fail("C", w3, error="exit 1 again", exit_code=1, now=T0 + 101))
        assert (h.dead_letter("C")).exists()
        self.check_dead_letters()
        assert present(q.get("F"))["status"] == "cancelled"
        self.step(q.requeue_dead("C", now=T0 + 102))
        assert not h.dead_letter("C").exists()
        assert self.claim(w3, T0 + 103, types=["default"]) == "C"
        self.step(q.fail("C", w3, error="fatal", exit_code=2, retry=False, now=T0 + 104))
        self.step(q.enqueue({"task_id": "L", "priority": "low", "command": ["false"],
                             "max_attempts": 1}, now=T0 + 105))
        assert self.claim(w3, T0 + 106) == "L"
        self.step(q.fail("L", w3, error="exit 1", exit_code=1, now=T0 + 107))
        self.check_dead_letters()
        assert q.purge_dead(["L"]) == ["L"]
        self.check_queue()
        # An operator's hand edit (jq and mv under flock): recorded by the next transaction.
        edited = q.live_tasks()[0]
        with lock_for(h.lock_path("queue")).held_for(5):
            raw = json.loads(h.queue_file.read_bytes())
            for task in raw["tasks"]:
                if task["task_id"] == edited["task_id"]:
                    task["description"] = "edited by hand"
            tmp = h.coordination / ".task-queue.json.tmp-manual"
            tmp.write_text(json.dumps(raw))
            tmp.replace(h.queue_file)
        q.reprioritize(edited["task_id"], edited["priority"], now=T0 + 108)
        assert present(q.get(edited["task_id"]))["description"] == "edited by hand"
        self.check_queue()

        emit(h, "deploy.started", severity="info", source="test", message="deploying",
             correlation_id="corr-1", data={"version": "1.2.3"}, now=T0 + 110)
        emit(h, "note", now=T0 + 111)

        # Worker specs: one still active, one completed.
        spec = new_spec(w1, "alpha", T0, types=["default", "shell"],
                        unit="harness-worker@alpha.service")
        assert write_spec(h, spec, create=True)
        spec.update({"state": "busy", "heartbeat_at": clock.iso(T0 + 50), "current_task_id": "E",
                     "task_started_at": clock.iso(T0 + 50), "progress": 3, "tasks_done": 1})
        assert write_spec(h, spec)
        other = new_spec(w2, "alpha", T0 + 1)
        assert write_spec(h, other, create=True)
        self.completed_spec = complete_spec(h, w2, "idle", T0 + 200,
                                            extra={"tasks_done": 2, "tokens_used": 12})
        assert not write_spec(h, other)  # a late heartbeat does not resurrect it
        self.control = update_control(
            h, lambda s: s["drain"]["instances"].update(beta=clock.iso(T0 + 210)),
            now=T0 + 210)

        # One request left pending in the inbox for the doc's inbox one-liners.
        q.submit({"task_id": "P", "command": ["echo", "P"], "priority": "high"}, now=T0 + 220)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    s = Scenario(tmp_path_factory.mktemp("schemas") / "home")
    s.run()
    return s


# ------------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = _SCHEMAS[name]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert schema.get("title") and schema.get("description")


def test_schema_directory_holds_exactly_the_listed_files() -> None:
    assert sorted(p.name for p in SCHEMAS.glob("*.json")) == sorted(SCHEMA_FILES)


def test_schemas_mirror_the_code_constants() -> None:
    task = _SCHEMAS["task.schema.json"]["$defs"]
    assert task["task"]["required"] == list(TASK_FIELDS)
    assert set(task["task"]["properties"]) == set(TASK_FIELDS)
    assert task["priority"]["enum"] == list(PRIORITIES)
    assert task["status"]["enum"] == list(STATUSES)
    request = _SCHEMAS["task-request.schema.json"]
    assert set(request["properties"]) == set(REQUEST_FIELDS)
    event = _SCHEMAS["event.schema.json"]
    assert event["required"] == list(ENVELOPE_FIELDS)
    assert event["properties"]["severity"]["enum"] == list(SEVERITIES)
    spec = _SCHEMAS["worker-spec.schema.json"]
    assert spec["properties"]["state"]["enum"] == list(SPEC_STATES)
    assert spec["properties"]["exit_reason"]["anyOf"][0]["enum"] == list(EXIT_REASONS)
    assert set(spec["required"]) == set(new_spec("w", "i", T0, pid=os.getpid()))
    system = _SCHEMAS["system-config.schema.json"]["properties"]
    assert set(system) - {"_comments", "version"} == {k.name for k in SYSTEM_KEYS}
    for key in SYSTEM_KEYS:
        assert system[key.name]["default"] == key.default, key.name
        assert system[key.name]["description"] == key.doc, key.name
    types = _SCHEMAS["worker-types.schema.json"]["$defs"]["worker_type"]["properties"]
    assert set(types) == set(TYPE_KEYS)


_PROBES: list[Any] = [-1, 0, 1, 2, 3, 5, 1000, 1001, 1023, 1024, 2**62, 2**62 + 1, 0.001,
                      0.005, 0.01, 0.04, 0.05, 0.09, 0.1, 0.25, 0.5, 1.5, 2.5, -0.5, True,
                      False, "fsync", "none", "auto", "systemd", "process", "x", "", None, [],
                      ["a"], [1], ["a", 2], {}]


@pytest.mark.parametrize("key", SYSTEM_KEYS, ids=lambda k: k.name)
def test_system_schema_bounds_agree_with_the_loader(key: Any) -> None:
    for value in _PROBES:
        assert key.check(value) == is_valid("system-config.schema.json", {key.name: value}), \
            f"{key.name}={value!r}"


@pytest.mark.parametrize("key", sorted(TYPE_KEYS))
def test_worker_type_schema_agrees_with_the_loader(key: str) -> None:
    check = TYPE_KEYS[key][0]
    probes = [*_PROBES, ["bash", "-c", "{description}"]]
    if key == "limits":
        probes = [{}, {"memory_mb": None}, {"memory_mb": 512, "cpu_seconds": 60,
                                            "processes": 64}]
    for value in probes:
        doc = {"worker_types": {"t": {key: value}}}
        assert check(value) == is_valid("worker-types.schema.json", doc), f"{key}={value!r}"


def test_worker_types_top_level_keys_agree_with_the_loader(tmp_path: Path) -> None:
    """worker-types.json: `worker_types` (or the legacy `types`, not both), `version` and
    `_` keys; any other top-level key is refused naming the file and the key."""
    from coordination.config import validate_worker_types
    from coordination.errors import ConfigError

    path = tmp_path / "worker-types.json"
    one = {"t": {"description": "x"}}
    for doc, error in (
            ({"worker_types": one}, None),
            ({"types": one, "version": 1, "_note": "legacy home"}, None),
            ({"worker_types": one, "types": one}, "both 'worker_types'"),
            ({"worker_types": one, "worker_type": {"t": {}}}, "unknown top-level key "
                                                              "'worker_type'"),
            ({"worker_types": one, "defaults": {}}, "unknown top-level key 'defaults'"),
            ({"version": 1}, "'worker_types' object"),
            ({"worker_types": []}, "'worker_types' object")):
        assert is_valid("worker-types.schema.json", doc) == (error is None), doc
        if error is None:
            assert set(validate_worker_types(path, doc)) == {"t"}
            continue
        with pytest.raises(ConfigError) as caught:
            validate_worker_types(path, doc)
        assert str(path) in str(caught.value) and error in str(caught.value), caught.value


def test_init_renames_the_legacy_types_key(tmp_path: Path) -> None:
    """A home made before the rename keeps working, and `harness init` (no --force) moves
    its map to `worker_types`, keeping the operator's types and key order."""
    from coordination.config import init_home, load_worker_types

    home = Home(tmp_path / "home")
    init_home(home)
    legacy = {"_comments": {"types": "old"}, "version": 1,
              "types": {"agent": {"description": "mine", "default_budget": 7}}}
    replace_json(home.worker_types_config, legacy, pretty=True)
    assert load_worker_types(home)["agent"]["default_budget"] == 7
    written = init_home(home, force=False)
    assert written == [str(home.worker_types_config)]
    raw = read_json(home.worker_types_config)
    assert list(raw) == ["_comments", "version", "worker_types"]
    assert raw["worker_types"] == legacy["types"]
    assert_valid("worker-types.schema.json", raw)
    assert load_worker_types(home)["agent"]["default_budget"] == 7
    assert init_home(home, force=False) == []  # nothing left to rename


def test_worker_type_limits_agree_with_the_loader(tmp_path: Path) -> None:
    from coordination.config import validate_worker_types
    from coordination.errors import ConfigError

    for limits in ({"memory_mb": 0}, {"cpu_seconds": 1.5}, {"bogus": 1}, {"processes": True},
                   {"memory_mb": 1, "cpu_seconds": None}, {"_c": "x"}):
        doc = {"worker_types": {"t": {"limits": limits}}}
        try:
            validate_worker_types(tmp_path / "w.json", doc)
            loader_ok = True
        except ConfigError:
            loader_ok = False
        assert loader_ok == is_valid("worker-types.schema.json", doc), limits


def test_worker_type_cgroup_limits_agree_with_the_loader(tmp_path: Path) -> None:
    from coordination.config import validate_worker_types
    from coordination.config_keys import SCOPE_PROPERTIES
    from coordination.errors import ConfigError

    values: list[Any] = ["64M", "1.5G", "100", "0", "infinity", "50%", "0.5%", "0%", "200%",
                         "10000", "10001", "1", "64 MB", "-1", "", "x", 20, True, None]
    cases: list[Any] = [None, {}, {"bogus": "1"}, {"_c": "x"}, [],
                        *({prop: value} for prop in SCOPE_PROPERTIES for value in values)]
    for limits in cases:
        doc = {"worker_types": {"t": {"cgroup_limits": limits}}}
        try:
            validate_worker_types(tmp_path / "w.json", doc)
            loader_ok = True
        except ConfigError:
            loader_ok = False
        assert loader_ok == is_valid("worker-types.schema.json", doc), limits


def test_schemas_reject_what_the_contract_forbids(scenario: Scenario) -> None:
    live = read_json(scenario.home.queue_file)["tasks"]
    task = dict(live[0])
    assert is_valid("task.schema.json", task)
    bad_tasks = [
        dict(task, extra=1),
        {k: v for k, v in task.items() if k != "budget"},
        dict(task, status="completed"),
        dict(task, created_at="2026-01-01T00:00:00Z"),
        dict(task, priority="urgent"),
        dict(task, command=[]),
        dict(task, command=["a\x00b"]),
        dict(task, task_id=".hidden"),
        dict(task, attempts=-1),
        dict(task, max_attempts=0),
        dict(task, status="queued", worker_id="w"),
        dict(task, status="running", worker_id=None),
        dict(task, completed_at=clock.iso(T0)),
        dict(task, dedup_key="has space"),
        dict(task, timeout_s=0),
    ]
    for bad in bad_tasks:
        assert not is_valid("task.schema.json", bad), bad
    event = make_event("x", now=T0)
    assert is_valid("event.schema.json", event)
    for bad in (dict(event, severity="fatal"), dict(event, type="Bad"), dict(event, data=[]),
                {k: v for k, v in event.items() if k != "task_id"}, dict(event, more=1)):
        assert not is_valid("event.schema.json", bad), bad
    record = scenario.q.history_of("A")[-1]
    assert is_valid("history-record.schema.json", record)
    for bad in (dict(record, final=False), dict(record, outcome="released"),
                dict(record, outcome="exploded"), dict(record, recorded_at=None)):
        assert not is_valid("history-record.schema.json", bad), bad
    assert not is_valid("task-request.schema.json", {"task_id": "x", "status": "queued"})
    assert not is_valid("system-config.schema.json", {"no_such_key": 1})
    assert not is_valid("worker-types.schema.json", {"worker_types": {"t": {"shell": True}}})
    assert not is_valid("control.schema.json", dict(scenario.control, paused_types={"t": {}}))
    spec = dict(scenario.completed_spec)
    assert is_valid("worker-spec.schema.json", spec)
    for bad in (dict(spec, exit_reason="bored"), dict(spec, state="sleeping"),
                dict(spec, completed_at=None), dict(spec, state="idle")):
        assert not is_valid("worker-spec.schema.json", bad), bad


# ------------------------------------------------------------------------------- the home
def test_every_queue_revision_was_valid(scenario: Scenario) -> None:
    assert scenario.queue_revisions_checked > 30
    assert scenario.inbox_files_checked == 1
    assert scenario.dead_letters_checked == 3  # C once, then C and L
    assert scenario.claimed == ["A", "G", "E", "B", "G", "E", "E", "I", "C", "C", "C", "L"]


def test_history_records_match_schema(scenario: Scenario) -> None:
    read = read_jsonl(scenario.home.history_file)
    assert read.bad_lines == 0
    assert read.records
    for number, record in enumerate(read.records, start=1):
        assert_valid("history-record.schema.json", record, f"task-history.jsonl:{number}")
        assert list(record) == [*TASK_FIELDS, "final", "outcome", "recorded_at", "result"]
    seen = {(r["final"], r["outcome"]) for r in read.records}
    assert seen == {
        (True, "completed"), (True, "failed"), (True, "cancelled"),
        (True, "dependency_failed"), (False, "failed"), (False, "reclaimed"),
        (False, "released"),
    }
    finals = [r["task_id"] for r in read.records if r["final"]]
    assert sorted(finals) == ["A", "B", "C", "C", "D", "F", "G", "L"]


def test_dead_letters_match_schema(scenario: Scenario) -> None:
    names = sorted(p.name for p in scenario.home.dead_letters.iterdir())
    assert names == ["C.json"]
    letter = read_json(scenario.home.dead_letter("C"))
    assert_valid("dead-letter.schema.json", letter)
    assert list(letter) == list(TASK_FIELDS)


def test_events_match_schema(scenario: Scenario) -> None:
    read = read_jsonl(scenario.home.events_file)
    assert read.bad_lines == 0
    for number, event in enumerate(read.records, start=1):
        assert_valid("event.schema.json", event, f"dashboard-events.jsonl:{number}")
        assert list(event) == list(ENVELOPE_FIELDS)
    queue_types = {e["type"] for e in read.records if e["source"] == "queue"}
    assert queue_types == queue_event_types()


def test_specs_control_and_config_match_schema(scenario: Scenario) -> None:
    h = scenario.home
    active = sorted(h.specs_active.glob("*.json"))
    completed = sorted(h.specs_completed.glob("*.json"))
    assert len(active) == 1 and len(completed) == 1
    for path in (*active, *completed):
        spec = read_json(path)
        assert path.stem == spec["worker_id"]
        assert_valid("worker-spec.schema.json", spec, str(path))
    assert read_json(completed[0])["state"] == "stopped"
    assert_valid("control.schema.json", read_json(h.control_file))
    assert_valid("system-config.schema.json", read_json(h.system_config))
    assert_valid("worker-types.schema.json", read_json(h.worker_types_config))


def test_pending_inbox_requests_match_schema(scenario: Scenario) -> None:
    pending = sorted(scenario.home.inbox.glob("*.json"))
    assert [p.name for p in pending] == ["P.json"]
    assert_valid("task-request.schema.json", read_json(pending[0]))


def test_every_file_the_code_wrote_is_in_the_contract(scenario: Scenario) -> None:
    """No file appears in a home that docs/coordination.md does not describe."""
    h = scenario.home
    known = [
        (h.queue_file, "task-queue.schema.json"),
        (h.queue_journal, "queue-journal.schema.json"),
        (h.history_file, "history-record.schema.json"),
        (h.events_file, "event.schema.json"),
        (h.control_file, "control.schema.json"),
        (h.system_config, "system-config.schema.json"),
        (h.worker_types_config, "worker-types.schema.json"),
    ]
    patterns = [
        (h.inbox, r"[A-Za-z0-9][A-Za-z0-9._-]*\.json"),
        (h.inbox_rejected, r".+\.(json|reason)"),
        (h.dead_letters, r"[A-Za-z0-9][A-Za-z0-9._-]*\.json"),
        (h.specs_active, r".+\.json"),
        (h.specs_completed, r".+\.json"),
        (h.locks, "(" + "|".join(LOCK_NAMES) + r")\.lock"),
        # the last version of each config file that validated, kept by daemons
        (h.config_dir / "last-good", r"(system|worker-types)\.json"),
    ]
    exact = {p for p, _ in known}
    doc = doc_text()
    optional = {h.queue_base_file, h.queue_journal.with_name("task-queue.journal.prev")}
    for path in sorted(p for p in h.root.rglob("*") if p.is_file()):
        if path in exact or path in optional:
            assert str(path.relative_to(h.root)) in doc, path
            continue
        folder = next((f for f, _ in patterns if path.parent == f), None)
        assert folder is not None, f"{path} is not part of the contract"
        pattern = dict(patterns)[folder]
        assert re.fullmatch(pattern, path.name), f"{path} is not named as the contract says"
    for path in exact:
        assert path.is_file(), path
        assert str(path.relative_to(h.root)) in doc
    for name in LOCK_NAMES:
        assert (h.locks / f"{name}.lock").is_file()
        assert (h.locks / f"{name}.lock").stat().st_size == 0


# ------------------------------------------------------------------------------- supervisor
class SupervisorScenario:
    """A home driven through ``Supervisor.reconcile``: a worker type's circuit opens and
    closes, a dead worker is retired (``crash_proof``), a live busy worker gets a progress
    watermark; health.json and supervisor-state.json are validated after every pass."""

    def __init__(self, root: Path) -> None:
        from helpers import dead_pid

        from daemons.supervisor.reconcile import Supervisor

        self.home = h = make_home(root.parent, root.name)
        cfg = read_json(h.system_config)
        # heartbeat_timeout_s: worker-busy is this test process, which the supervisor
        # would fence (SIGKILL) once its heartbeat is older than that.
        cfg.update(durability="none", circuit_min_tasks=3, circuit_failure_rate=0.5,
                   circuit_window_s=300, circuit_cooldown_s=60, health_window_s=300,
                   heartbeat_timeout_s=3600)
        replace_json(h.system_config, cfg, pretty=True)
        q = TaskQueue(h)
        now = time_now = clock.now()
        for i in range(3):
            q.enqueue({"task_id": f"S{i}", "worker_type": "shell", "description": "exit 1",
                       "max_attempts": 1}, now=now)
            assert q.claim("worker-gone", now=now + 0.1)
            q.fail(f"S{i}", "worker-gone", error="exit 1", exit_code=1, now=now + 0.2)
        q.enqueue({"task_id": "R", "command": ["true"]}, now=now)
        assert q.claim("worker-dead", now=now + 0.3)
        q.enqueue({"task_id": "B", "command": ["true"]}, now=now)
        assert q.claim("worker-busy", now=now + 0.4)
        dead = new_spec("worker-dead", "dead", now, pid=dead_pid())
        dead.update({"state": "busy", "current_task_id": "R",
                     "task_started_at": clock.iso(now + 0.3)})
        busy = new_spec("worker-busy", "busy", now)
        busy.update({"state": "busy", "current_task_id": "B",
                     "task_started_at": clock.iso(now + 0.4),
                     "heartbeat_at": clock.iso(now + 0.5), "progress": 7})
        for spec in (dead, busy):
            assert write_spec(h, spec, create=True)
        self.sup = Supervisor(h)
        self.states: list[dict[str, Any]] = []
        self.healths: list[dict[str, Any]] = []
        for at in (time_now + 1, time_now + 2, time_now + 62):
            self.sup.reconcile(at)
            self.healths.append(read_json(h.health_file))
            self.states.append(read_json(h.supervisor_state_file))
            assert_valid("health.schema.json", self.healths[-1], "health.json")
            assert_valid("supervisor-state.schema.json", self.states[-1],
                         "supervisor-state.json")


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> SupervisorScenario:
    return SupervisorScenario(tmp_path_factory.mktemp("supervised") / "home")


def test_supervisor_files_match_their_schemas(supervised: SupervisorScenario) -> None:
    """What the supervisor wrote went through every branch the schemas describe."""
    first, _, last = supervised.states
    assert first["circuits"]["shell"]["state"] == "open"
    assert last["circuits"]["shell"]["state"] == "closed"
    assert last["circuits"]["shell"]["closed_at"] is not None
    assert first["progress"]["worker-busy"]["progress"] == 7
    assert supervised.healths[0]["circuits"] == {
        "shell": {"state": "open", "until": first["circuits"]["shell"]["until"]}}
    assert supervised.healths[-1]["circuits"] == {}
    assert "window_s" in supervised.healths[0] and "attempts" in supervised.healths[0]
    # metrics.health_document (the same format without the supervisor's extras) fits too.
    from coordination.metrics import health_document

    assert_valid("health.schema.json", health_document(
        0.5, ["w"], backpressure=True, now=T0, window_s=60,
        circuits={"shell": {"state": "open", "until": clock.iso(T0)}}))
    assert not is_valid("health.schema.json", dict(supervised.healths[0], health="fine"))
    assert not is_valid("supervisor-state.schema.json", dict(last, extra=1))


def test_crashed_spec_with_crash_proof_matches_schema(supervised: SupervisorScenario) -> None:
    h = supervised.home
    crashed = read_json(h.specs_completed / "worker-dead.json")
    assert crashed["exit_reason"] == "crashed" and "is gone" in crashed["crash_proof"]
    assert_valid("worker-spec.schema.json", crashed)
    active = read_json(h.specs_active / "worker-busy.json")
    assert_valid("worker-spec.schema.json", active)
    # crash_proof belongs to a crashed, completed spec only.
    assert not is_valid("worker-spec.schema.json", dict(active, crash_proof="pid 1 is gone"))
    assert not is_valid("worker-spec.schema.json", dict(crashed, exit_reason="idle"))
    assert not is_valid("worker-spec.schema.json", dict(crashed, crash_proof=""))


def test_every_file_the_supervisor_wrote_is_in_the_contract(
        supervised: SupervisorScenario) -> None:
    h = supervised.home
    doc = doc_text()
    for path in (h.health_file, h.supervisor_state_file, h.supervisor_lock):
        assert path.is_file(), path
        assert str(path.relative_to(h.root)) in doc, path
    assert h.supervisor_lock.stat().st_size == 0
    written = {p for p in h.coordination.iterdir() if p.is_file()}
    assert written <= {h.queue_file, h.queue_journal, h.queue_base_file,
                       h.queue_journal.with_name("task-queue.journal.prev"), h.history_file,
                       h.events_file, h.control_file, h.health_file,
                       h.supervisor_state_file}, written


# ------------------------------------------------------------------------------- the doc
def test_doc_config_table_is_generated_from_the_code() -> None:
    text = doc_text()
    begin, end = "<!-- config-table:begin -->", "<!-- config-table:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    table = text.split(begin, 1)[1].split(end, 1)[0].strip("\n")
    assert table == config_reference_markdown()


def test_doc_names_every_task_field() -> None:
    text = doc_text()
    for name in TASK_FIELDS:
        assert f"`{name}`" in text, name


def test_doc_names_every_path_lock_and_constant() -> None:
    text = doc_text()
    h = Home(Path("/HOME"))
    paths = [h.queue_file, h.queue_journal, h.queue_base_file, h.inbox, h.inbox_rejected,
             h.history_file,
             h.dead_letters, h.specs_active, h.specs_completed, h.events_file,
             h.metrics_file, h.control_file, h.system_config, h.worker_types_config,
             h.locks, h.quarantine, h.logs, h.task_logs, h.results, h.health_file,
             h.supervisor_state_file, h.supervisor_lock, h.worker_logs]
    for p in paths:
        rel = str(p.relative_to(h.root))
        leaf = p.name
        assert rel in text or f"{leaf}/" in text or leaf in text, rel
    for rel in ("coordination/task-queue.json", "coordination/task-history.jsonl",
                "coordination/dashboard-events.jsonl", "coordination/metrics-snapshots.jsonl",
                "coordination/control.json", "coordination/config/system.json",
                "coordination/config/worker-types.json", "logs/tasks/<task_id>.log",
                "results/<task_id>/", "inbox/rejected/", "worker-specs/",
                "quarantine/", "coordination/health.json", "coordination/supervisor-state.json",
                "locks/supervisor.lock", "logs/workers/", "`crash_proof`"):
        assert rel in text, rel
    for name in LOCK_NAMES:
        assert f"locks/{name}.lock" in text, name
    for value in (*EXIT_REASONS, *SPEC_STATES, "stopped", *SEVERITIES, *PRIORITIES,
                  *STATUSES):
        assert f"`{value}`" in text, value
    for name in SCHEMA_FILES:
        assert f"schemas/{name}" in text, name
    for var in ("--home", "$HARNESS_HOME", "$STATE_DIRECTORY", "$XDG_STATE_HOME/harness"):
        assert var in text, var
    for code in ("0", "1", "2", "75"):
        assert re.search(rf"^\| `{code}` \|", text, re.M), code


def queue_event_types() -> set[str]:
    source = "".join(p.read_text() for p in (ROOT / "coordination" / "queue").rglob("*.py"))
    return set(re.findall(r'(?:txn\.event|make_event)\(\s*"([a-z_.-]+)"', source))


def test_doc_lists_every_queue_event_type() -> None:
    types = queue_event_types()
    assert len(types) >= 14
    text = doc_text()
    for name in types:
        assert re.search(rf"^\| `{re.escape(name)}` \|", text, re.M), name


def _code_blocks(text: str, lang: str) -> list[tuple[str, str]]:
    """(preceding text, body) of every fenced block in ``lang``."""
    out = []
    for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.M | re.S):
        out.append((text[:m.start()], m.group(1)))
    return out


def test_doc_json_examples_parse_and_match_their_schema() -> None:
    blocks = _code_blocks(doc_text(), "json")
    assert len(blocks) >= 8
    covered = set()
    for before, body in blocks:
        marker = re.search(r"<!-- example: ([a-z-]+\.schema\.json)( jsonl)? -->\s*$", before)
        if marker and marker.group(2):
            docs = [json.loads(line) for line in body.splitlines() if line.strip()]
        else:
            docs = [json.loads(body)]
        if marker:
            covered.add(marker.group(1))
            for d in docs:
                assert_valid(marker.group(1), d, f"doc example for {marker.group(1)}")
    assert covered == set(SCHEMA_FILES) - {"task.schema.json"}


# ------------------------------------------------------------------------------- jq
needs_jq = needs("jq")


def run_sh(command: str, cwd: Path) -> str:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, f"{command}\n{proc.stderr}"
    return proc.stdout


def test_the_three_queue_one_liners_are_in_the_doc_verbatim() -> None:
    text = doc_text()
    for command in (JQ_QUEUED, JQ_LIST, JQ_WAIT_VERBATIM, JQ_WAIT):
        assert command in text, command


@needs_jq
def test_queue_one_liners_give_the_expected_numbers(scenario: Scenario) -> None:
    root = scenario.home.root
    # The order of the tasks array is unspecified (docs/coordination.md): compare sorted.
    live = sorted(scenario.q.live_tasks(), key=lambda t: t["task_id"])
    assert [(t["task_id"], t["status"]) for t in live] == [
        ("E", "queued"), ("H", "queued"), ("I", "running")]
    assert run_sh(JQ_QUEUED, root).strip() == "2"
    lines = sorted((json.loads(line) for line in run_sh(JQ_LIST, root).splitlines()),
                   key=lambda t: t["task_id"])
    assert lines == [{k: t[k] for k in ("task_id", "priority", "status", "created_at")}
                     for t in live]
    assert [(t["task_id"], t["priority"], t["created_at"]) for t in lines] == [
        ("E", "medium", clock.iso(T0 + 4)), ("H", "low", clock.iso(T0 + 7)),
        ("I", "medium", clock.iso(T0 + 8))]
    waits = sorted(json.loads(run_sh(JQ_WAIT, root)), key=lambda w: w["task_id"])
    # E: created T0+4, last started T0+50; I: created T0+8 (submit), started T0+55.
    assert waits == [{"task_id": "E", "wait": 46}, {"task_id": "I", "wait": 47}]
    if not _jq_is_1_6():
        verbatim = json.loads(run_sh(JQ_WAIT_VERBATIM, root))
        assert sorted(verbatim, key=lambda w: w["task_id"]) == waits


def _jq_is_1_6() -> bool:
    done = subprocess.run(["jq", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip().startswith("jq-1.6")


def test_verbatim_wait_one_liner_with_libjq_1_7(scenario: Scenario) -> None:
    """The issue's form, unchanged, on the live file, through libjq >= 1.7."""
    import jq as libjq

    program = JQ_WAIT_VERBATIM.split("'")[1]
    data = json.loads(scenario.home.queue_file.read_bytes())
    [waits] = libjq.compile(program).input_value(data).all()
    assert sorted(waits, key=lambda w: w["task_id"]) == [
        {"task_id": "E", "wait": 46}, {"task_id": "I", "wait": 47}]


@needs_jq
def test_every_jq_one_liner_in_the_doc_runs(scenario: Scenario) -> None:
    commands = [line for _, body in _code_blocks(doc_text(), "sh")
                for line in body.splitlines() if line.startswith("jq ")]
    assert len(commands) >= 15
    for command in commands:
        if command == JQ_WAIT_VERBATIM and _jq_is_1_6():
            continue  # jq >= 1.7 only (the doc says so); checked through libjq below
        run_sh(command, scenario.home.root)


@needs_jq
def test_jsonl_one_liners_skip_torn_lines(scenario: Scenario, tmp_path: Path) -> None:
    """The doc's JSONL recipe (-R + fromjson?) survives a torn line, as the readers do."""
    copy = tmp_path / "home"
    shutil.copytree(scenario.home.root, copy)
    history = copy / "coordination" / "task-history.jsonl"
    good = len(read_jsonl(history).records)
    with open(history, "ab") as fh:
        fh.write(b'{"task_id": "torn", "fin')
    assert read_jsonl(history).bad_lines == 1
    out = run_sh("jq -cR 'fromjson? | .task_id' coordination/task-history.jsonl", copy)
    assert len(out.splitlines()) == good
