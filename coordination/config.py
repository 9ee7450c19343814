"""Config: ``coordination/config/system.json`` and ``worker-types.json``.

Each system key is declared once in :data:`~coordination.config_keys.SYSTEM_KEYS` with its
default, type and a line of documentation (:mod:`coordination.config_keys`); ``harness
init`` writes the defaults with those lines under ``_comments``, and docs/coordination.md
carries the same table. Loading validates every key and raises
:class:`ConfigError` naming the file and the key. Keys starting with ``_`` are comments.
Loaded files are cached per process and re-read when their inode, size or mtime changes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_keys import (
    DEFAULT_WORKER_TYPES,
    LIMIT_KEYS,
    SCOPE_PROPERTIES,
    SYSTEM_BY_NAME,
    SYSTEM_KEYS,
    TYPE_KEYS,
    _int,
)
from .errors import ConfigError, CorruptFileError, HarnessError
from .ids import ID_RULE, is_valid_id
from .paths import Home
from .redact import pattern_problem, use_patterns
from .store import Durability, parse_json, read_json, replace_bytes, replace_json


def default_system() -> dict[str, Any]:
    doc = {k.name: k.doc for k in SYSTEM_KEYS}
    return {"_comments": doc, "version": 1, **{k.name: k.default for k in SYSTEM_KEYS}}


def init_home(home: Home, *, force: bool = True, group: int | None = None,
              **system_overrides: Any) -> list[str]:
    """Create the home's directories and lock files (0700, or shared with ``group``: see
    :meth:`Home.create`), and publish (by rename) ``config/system.json`` (the defaults
    plus ``system_overrides``) and ``config/worker-types.json`` (the defaults). With
    ``force`` False a config file that exists is kept, except that a worker-types.json with
    the legacy top-level key ``types`` is republished with it renamed ``worker_types``
    (content and order otherwise kept). Returns the paths written ([] when both were
    kept)."""
    home.create(group)
    system = default_system()
    system.update(system_overrides)
    written = []
    for path, content in ((home.system_config, system),
                          (home.worker_types_config, DEFAULT_WORKER_TYPES)):
        if force or not path.exists():
            replace_json(path, content, pretty=True)
            written.append(str(path))
    if not force and migrate_worker_types_key(home.worker_types_config):
        written.append(str(home.worker_types_config))
    return written


#: Top-level keys of worker-types.json besides ``_*`` comments (``types``: the legacy name
#: of ``worker_types``, read from homes made before the rename).
WORKER_TYPES_TOP_KEYS = ("version", "worker_types", "types")


def migrate_worker_types_key(path: Path) -> bool:
    """Republish ``path`` (by rename) with its legacy ``types`` key renamed
    ``worker_types``, in the same position. True when it did; False when there was nothing
    to rename (no file, already ``worker_types``, or not a valid worker-types file, which
    is left alone for the loader to report)."""
    try:
        raw = read_json(path)
    except (FileNotFoundError, CorruptFileError):
        return False
    if not isinstance(raw, dict) or "types" not in raw or "worker_types" in raw:
        return False
    validate_worker_types(path, raw)
    renamed = {("worker_types" if k == "types" else k): v for k, v in raw.items()}
    replace_json(path, renamed, pretty=True)
    return True


@dataclass(frozen=True)
class SystemConfig:
    """Validated system.json values (every key present, defaults filled in)."""

    values: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def durability(self) -> Durability:
        return self.values["durability"]  # type: ignore[no-any-return]

    @property
    def lock_timeout(self) -> float:
        return float(self.values["lock_timeout_s"])


def validate_system(path: Path, raw: Any) -> SystemConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    values: dict[str, Any] = {k.name: k.default for k in SYSTEM_KEYS}
    for name, value in raw.items():
        if name.startswith("_") or name == "version":
            continue
        key = SYSTEM_BY_NAME.get(name)
        if key is None:
            raise ConfigError(f"{path}: unknown key {name!r} (known keys: docs/coordination.md)")
        if not key.check(value):
            raise ConfigError(f"{path}: key {name!r} must be {key.expect}, got {value!r}")
        values[name] = value
    for index, pattern in enumerate(values["redact_patterns"]):
        problem = pattern_problem(pattern)
        if problem is not None:
            raise ConfigError(f"{path}: key 'redact_patterns'[{index}] {pattern!r} {problem}")
    if values["min_workers"] > values["max_workers"]:
        raise ConfigError(f"{path}: key 'min_workers' ({values['min_workers']}) exceeds "
                          f"'max_workers' ({values['max_workers']})")
    return SystemConfig(values)


def validate_worker_types(path: Path, raw: Any) -> dict[str, dict[str, Any]]:
    """The worker types of a parsed worker-types.json, by name, with defaults filled in.

    The map is the top-level ``worker_types`` object (``types`` in homes made before the
    rename, still accepted; both at once is an error). Any other top-level key that does
    not start with ``_`` and is not ``version`` is refused, naming the file and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    for name in raw:
        if not name.startswith("_") and name not in WORKER_TYPES_TOP_KEYS:
            raise ConfigError(f"{path}: unknown top-level key {name!r} (known: "
                              "worker_types, version, and _comments or other '_' keys)")
    if "worker_types" in raw and "types" in raw:
        raise ConfigError(f"{path}: both 'worker_types' and its legacy name 'types' are "
                          "present; keep only 'worker_types'")
    key = "types" if "types" in raw else "worker_types"
    if not isinstance(raw.get(key), dict):
        raise ConfigError(f"{path}: must be an object with a 'worker_types' object")
    types: dict[str, dict[str, Any]] = {}
    for name, spec in raw[key].items():
        where = f"{path}: {key}.{name}"
        if not is_valid_id(name):
            raise ConfigError(f"{path}: worker type name {name!r} is not valid ({ID_RULE})")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be an object")
        clean: dict[str, Any] = {"description": "", "command_template": None,
                                 "env_allowlist": [], "default_budget": None,
                                 "timeout_s": None, "max_attempts": None, "cwd": None,
                                 "limits": {}, "cgroup_limits": None}
        for key, value in spec.items():
            if key.startswith("_"):
                continue
            rule = TYPE_KEYS.get(key)
            if rule is None:
                raise ConfigError(f"{where}: unknown key {key!r}")
            if not rule[0](value):
                raise ConfigError(f"{where}.{key} must be {rule[1]}, got {value!r}")
            clean[key] = value
        for lk, lv in clean["limits"].items():
            if lk not in LIMIT_KEYS:
                raise ConfigError(f"{where}.limits: unknown key {lk!r} (known: {LIMIT_KEYS})")
            if lv is not None and not _int(1)(lv):
                raise ConfigError(f"{where}.limits.{lk} must be null or integer >= 1")
        _check_cgroup_limits(where, clean["cgroup_limits"])
        types[name] = clean
    return types


def _check_cgroup_limits(where: str, scope: dict[str, Any] | None) -> None:
    """``cgroup_limits``: known property names, values of the documented shapes (or null)."""
    for prop, value in (scope or {}).items():
        rule = SCOPE_PROPERTIES.get(prop)
        if rule is None:
            raise ConfigError(f"{where}.cgroup_limits: unknown property {prop!r} (allowed: "
                              f"{', '.join(SCOPE_PROPERTIES)})")
        if value is not None and not (isinstance(value, str)
                                      and re.fullmatch(rule[0], value)):
            raise ConfigError(f"{where}.cgroup_limits.{prop} must be null or {rule[1]}, "
                              f"got {value!r}")


def scope_properties(wtype: dict[str, Any]) -> dict[str, str]:
    """The properties a validated worker type sets for its tasks' scope ({}: no scope)."""
    return {k: v for k, v in (wtype.get("cgroup_limits") or {}).items() if v is not None}


_cache: dict[str, tuple[tuple[int, int, int], Any]] = {}
#: Per config file: the last value that validated in this process, kept for daemons.
_last_good: dict[str, Any] = {}
#: The bytes of that version, and the signature last kept as config/last-good/NAME.
_good_bytes: dict[str, bytes] = {}
_remembered: dict[str, tuple[int, int, int]] = {}
_keep = {"last_good": False}
#: Inside :func:`one_version`: the stat of each config file, taken once for the block.
_pinned: ContextVar[dict[str, os.stat_result | None] | None] = ContextVar(
    "harness_config_pinned", default=None)


@contextmanager
def one_version() -> Iterator[None]:
    """Within the block, each config file is looked at (stat) once: the loads see one
    version of it. A daemon's step runs in one (the config is read once per step, not at
    every ``load_system``); a change is seen by the next step, which its inotify event
    wakes."""
    token = _pinned.set({})
    try:
        yield
    finally:
        _pinned.reset(token)


def _stat(path: Path) -> os.stat_result | None:
    """``os.stat(path)``, None when it is missing; once per file inside :func:`one_version`."""
    pinned = _pinned.get()
    key = str(path)
    if pinned is not None and key in pinned:
        return pinned[key]
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    if pinned is not None:
        pinned[key] = st
    return st


def keep_last_good(enabled: bool = True) -> bool:
    """Daemon mode (supervisor, worker, the janitor and metrics runs, ``harness up``): a
    config file that turns invalid does not raise; loading returns the last value that
    validated, and :func:`config_problems` says what is wrong until the file is fixed
    (picked up without a restart: the cache follows the file's signature). "Last" is this
    process's, else the copy in ``config/last-good/`` that daemons keep (so a oneshot run
    of the janitor or metrics, which has no earlier values, uses it too).
    Commands stay strict: they fail on a bad file, naming it and the key. Returns the
    previous mode (a daemon run restores it when it ends)."""
    before = _keep["last_good"]
    _keep["last_good"] = enabled
    return before


def last_good_copy(path: Path) -> Path:
    """``config/last-good/NAME``: the last version of config file ``path`` that validated,
    kept by daemons in keep-last-good mode."""
    return path.parent / "last-good" / path.name


def _remember(path: Path, data: bytes) -> None:
    """Keep ``data`` (a config file that validated) as its last-good copy, when it differs
    (best effort: a copy that cannot be written only weakens the fallback)."""
    copy = last_good_copy(path)
    try:
        if copy.read_bytes() == data:
            return
    except OSError:
        pass
    try:
        copy.parent.mkdir(mode=0o700, exist_ok=True)
        replace_bytes(copy, data, "none")
    except (OSError, HarnessError):
        pass


def _from_copy(path: Path, validate: Callable[[Path, Any], Any]) -> Any:
    """The value of the last-good copy of ``path``; None when there is none or it fails."""
    copy = last_good_copy(path)
    try:
        return validate(path, parse_json(copy, copy.read_bytes()))
    except (OSError, HarnessError):
        return None


def _load_cached(path: Path, validate: Callable[[Path, Any], Any], missing_default: Any) -> Any:
    st = _stat(path)
    if st is None:
        return validate(path, missing_default)
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _cache.get(str(path))
    if hit is None or hit[0] != sig:
        try:
            try:
                data = path.read_bytes()
                raw = parse_json(path, data)
            except CorruptFileError as exc:
                raise ConfigError(str(exc)) from None
            value: Any = validate(path, raw)
            _last_good[str(path)] = value
            _good_bytes[str(path)] = data
        except ConfigError as exc:
            value = exc  # cached too: a broken file is not re-parsed on every call
        hit = _cache[str(path)] = (sig, value)
    if _keep["last_good"] and not isinstance(hit[1], ConfigError) \
            and _remembered.get(str(path)) != sig:
        # once per version, also for one read before this process became a daemon
        _remember(path, _good_bytes[str(path)])
        _remembered[str(path)] = sig
    if isinstance(hit[1], ConfigError):
        if _keep["last_good"]:
            if str(path) not in _last_good:
                kept = _from_copy(path, validate)
                if kept is not None:
                    _last_good[str(path)] = kept
            if str(path) in _last_good:
                return _last_good[str(path)]
        raise hit[1]
    return hit[1]


def load_system(home: Home) -> SystemConfig:
    """The validated system config (defaults when the file is absent). Applies its
    ``redact_patterns`` to this process's redaction (coordination/redact.py)."""
    cfg: SystemConfig = _load_cached(home.system_config, validate_system, {})
    use_patterns(cfg.values["redact_patterns"])
    return cfg


def load_worker_types(home: Home) -> dict[str, dict[str, Any]]:
    """Validated worker types by name (the built-in defaults when the file is absent)."""
    return _load_cached(  # type: ignore[no-any-return]
        home.worker_types_config, validate_worker_types, DEFAULT_WORKER_TYPES)


def config_problems(home: Home) -> list[str]:
    """What is wrong with the home's config files now ([] when both validate). In
    :func:`keep_last_good` mode the daemons run on the last good values meanwhile."""
    problems = []
    for path, validate, default in (
            (home.system_config, validate_system, {}),
            (home.worker_types_config, validate_worker_types, DEFAULT_WORKER_TYPES)):
        try:
            _load_cached(path, validate, default)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        hit = _cache.get(str(path))
        if hit is not None and isinstance(hit[1], ConfigError):
            problems.append(str(hit[1]))
    return problems


@contextmanager
def keeping_last_good() -> Iterator[None]:
    """:func:`keep_last_good` for the length of a daemon's run (the mode is restored after,
    so a daemon run inside a command or a test leaves the process strict)."""
    before = keep_last_good(True)
    try:
        yield
    finally:
        keep_last_good(before)


@contextmanager
def daemon_run(home: Home, name: str) -> Iterator[None]:
    """Keep-last-good mode for a oneshot daemon run (the janitor and metrics timers),
    saying on stderr when it runs on the last good values of an invalid config. Raises
    ConfigError (exit 2) only when no good version was ever kept."""

    with keeping_last_good():
        load_system(home)
        load_worker_types(home)
        for problem in config_problems(home):
            logging.getLogger(f"harness.{name}").warning(
                "config invalid, running on the last good values (config/last-good/): %s",
                problem)
        yield


class ConfigWatch:
    """Turns :func:`config_problems` into events for a daemon: one ``config_invalid``
    (severity error) when the config turns bad or the problem changes, one
    ``config_valid`` when it validates again. No I/O besides reading the config."""

    def __init__(self) -> None:
        self.reported: tuple[str, ...] = ()

    def check(self, home: Home) -> list[dict[str, Any]]:
        """The events (``type``, ``severity``, ``message``, ``data``) to emit now."""
        problems = tuple(config_problems(home))
        if problems == self.reported:
            return []
        before, self.reported = self.reported, problems
        if problems:
            kept = "keeping the last good values" if all(
                str(p) in _last_good for p in (home.system_config, home.worker_types_config)
                if p.exists()) else "no good version was read yet"
            return [{"type": "config_invalid", "severity": "error",
                     "message": f"config invalid ({kept}): {'; '.join(problems)}",
                     "data": {"problems": list(problems)}}]
        return [{"type": "config_valid", "severity": "info",
                 "message": "config valid again: the daemons use the fixed file",
                 "data": {"resolved": list(before)}}]


def config_reference_markdown() -> str:
    """The system.json key table, as embedded in docs/coordination.md."""
    rows = ["| key | default | type | meaning |", "| --- | --- | --- | --- |"]
    for k in SYSTEM_KEYS:
        default = json.dumps(k.default)
        doc = k.doc.replace("<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `{k.name}` | `{default}` | {k.expect} | {doc} |")
    return "\n".join(rows)


def update_doc_table(doc: Path) -> bool:
    """Rewrite the config table between the ``config-table`` markers of ``doc``.

    Returns True when the file changed. Run ``python -m coordination.config FILE``.
    """
    begin, end = "<!-- config-table:begin -->", "<!-- config-table:end -->"
    text = doc.read_text()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{config_reference_markdown()}\n{end}{tail}"
    if new != text:
        doc.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or ["docs/coordination.md"]:
        print(f"{name}: {'updated' if update_doc_table(Path(name)) else 'unchanged'}")
