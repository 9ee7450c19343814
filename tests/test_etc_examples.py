"""etc/system.json and etc/worker-types.json are the shipped defaults, valid and current.

Regenerate after changing the defaults:
    python -c 'from tests.test_etc_examples import write; write()'
"""

from __future__ import annotations

from pathlib import Path

import orjson

from coordination.config import default_system, validate_system, validate_worker_types
from coordination.config_keys import DEFAULT_WORKER_TYPES

ETC = Path(__file__).resolve().parent.parent / "etc"


def _render(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n"


def write() -> None:
    (ETC / "system.json").write_bytes(_render(default_system()))
    (ETC / "worker-types.json").write_bytes(_render(DEFAULT_WORKER_TYPES))


def test_system_example_is_the_default_and_valid() -> None:
    path = ETC / "system.json"
    raw = orjson.loads(path.read_bytes())
    assert raw == default_system(), "etc/system.json is stale: see this module's docstring"
    validate_system(path, raw)


def test_worker_types_example_is_the_default_and_valid() -> None:
    path = ETC / "worker-types.json"
    raw = orjson.loads(path.read_bytes())
    assert raw == DEFAULT_WORKER_TYPES, "etc/worker-types.json is stale"
    assert validate_worker_types(path, raw)
