"""The TypedDicts of the task, history record, worker spec and event match their JSON
schemas key for key (name and required-ness), so the static types cannot drift from the
contract (docs/coordination.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coordination.events import ENVELOPE_FIELDS, Event
from coordination.specs import WorkerSpec
from coordination.tasks import TASK_FIELDS, HistoryRecord, Task

SCHEMAS = Path(__file__).resolve().parent.parent / "coordination" / "schemas"


def _schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    return loaded


def _task_def() -> dict[str, Any]:
    task_def: dict[str, Any] = _schema("task.schema.json")["$defs"]["task"]
    return task_def


def _keys(schemas: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """(all properties, required properties) of the schemas taken together (allOf)."""
    props: set[str] = set()
    required: set[str] = set()
    for schema in schemas:
        props |= set(schema.get("properties", {}))
        required |= set(schema.get("required", []))
    return props, required


CASES = [
    ("task", Task, [_task_def()]),
    ("history-record", HistoryRecord, [_task_def(), _schema("history-record.schema.json")]),
    ("worker-spec", WorkerSpec, [_schema("worker-spec.schema.json")]),
    ("event", Event, [_schema("event.schema.json")]),
]


@pytest.mark.parametrize(("name", "typed", "schemas"), CASES, ids=[c[0] for c in CASES])
def test_typeddict_matches_schema(name: str, typed: Any, schemas: list[dict[str, Any]]) -> None:
    props, required = _keys(schemas)
    assert set(typed.__annotations__) == props, name
    assert set(typed.__required_keys__) == required, name
    assert set(typed.__optional_keys__) == props - required, name


def test_typeddicts_match_field_tuples() -> None:
    assert tuple(Task.__annotations__) == TASK_FIELDS
    assert tuple(Event.__annotations__) == ENVELOPE_FIELDS
