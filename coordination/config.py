"""Config: ``coordination/config/system.json`` and ``worker-types.json``.

Each system key is declared once in :data:`SYSTEM_KEYS` with its default, type and a line of
documentation; ``harness init`` writes the defaults with those lines under ``_comments``, and
docs/coordination.md carries the same table. Loading validates every key and raises
:class:`ConfigError` naming the file and the key. Keys starting with ``_`` are comments.
Loaded files are cached per process and re-read when their inode, size or mtime changes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, CorruptFileError, HarnessError
from .ids import ID_RULE, is_valid_id
from .paths import Home
from .redact import pattern_problem, use_patterns
from .store import Durability, parse_json, read_json, replace_bytes, replace_json

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    check: Check
    expect: str
    doc: str


def _num(lo: float = 0, hi: float = float("inf")) -> Check:
    return lambda v: isinstance(v, int | float) and not isinstance(v, bool) \
        and math.isfinite(v) and lo <= v <= hi


def _int(lo: int = 0, hi: int = 2**62) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _choice(*options: str) -> Check:
    return lambda v: v in options


def _pair() -> Check:
    return lambda v: isinstance(v, list) and len(v) == 2 and all(_num()(x) for x in v)


def _opt_str(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v != "")


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


SYSTEM_KEYS: tuple[Key, ...] = (
    Key("queue_backend", "file", _choice("file", "postgres"), '"file" or "postgres"',
        "Where the queue keeps its tasks. file: a journal and the jq view task-queue.json in "
        "this home (docs/coordination.md, \"Queue\"). postgres: a PostgreSQL database "
        "(database_url), shared by several hosts (docs/multi-host.md)."),
    Key("database_url", None, _opt_str, "a string or null",
        "The PostgreSQL connection URL or conninfo of queue_backend postgres, passed to libpq "
        "unchanged (its PG* variables, ~/.pgpass and sslmode apply); the environment "
        "variable HARNESS_DATABASE_URL overrides it. Keep the password out of it (use "
        "~/.pgpass); one shown anywhere is redacted."),
    Key("durability", "fsync", _choice("fsync", "none"), '"fsync" or "none"',
        "fsync: every published file and appended line is fsynced (crash-durable). none: "
        "still atomic (publish by rename) but a power loss may lose recent writes."),
    Key("lock_timeout_s", 30, _num(0.01), "number > 0",
        "How long a command waits for a lock before failing with exit 75."),
    Key("default_max_attempts", 3, _int(1, 1000), "integer 1..1000",
        "max_attempts of a task that does not set its own."),
    Key("retry_backoff_base_s", 2, _num(0), "number >= 0",
        "Retry delay after attempt n is base * 2**(n-1), capped, with jitter."),
    Key("retry_backoff_max_s", 300, _num(0), "number >= 0", "Cap of the retry delay."),
    Key("retry_jitter", 0.25, _num(0, 1), "number 0..1",
        "Retry delay is multiplied by a random factor in [1-j, 1+j]."),
    Key("max_queue_depth", 1000, _int(1), "integer >= 1",
        "Backpressure: `harness task add` exits 75 when accepting would leave more than this"
        " many tasks queued (the inbox is still drained)."),
    Key("max_description_bytes", 65536, _int(1), "integer >= 1",
        "Largest accepted task description (UTF-8 bytes)."),
    Key("max_command_bytes", 131072, _int(1), "integer >= 1",
        "Largest accepted command (sum of argv element bytes)."),
    Key("max_depends_on", 100, _int(0), "integer >= 0", "Most dependencies one task may name."),
    Key("heartbeat_interval_s", 5, _num(0.05), "number > 0",
        "How often a busy worker refreshes heartbeat_at in its spec."),
    Key("heartbeat_timeout_s", 60, _num(0.1), "number > 0",
        "A worker whose heartbeat is older than this is presumed dead; its task is reclaimed."),
    Key("worker_stall_timeout_s", 900, _num(0.1), "number > 0",
        "A task whose worker reports no progress for this long is stopped and retried."),
    Key("stop_grace_s", 30, _num(0), "number >= 0",
        "On SIGTERM a worker lets its current task run this long before handing it back."),
    Key("kill_grace_s", 5, _num(0), "number >= 0",
        "After SIGTERM to a task's process group and every other descendant of the worker "
        "(timeout, cancel; docs/security.md), SIGKILL follows this late."),
    Key("task_log_max_bytes", 10 * 1024 * 1024, _int(1024), "integer >= 1024",
        "Cap of logs/tasks/<task_id>.log; output beyond it is dropped and the cut is marked."),
    Key("idle_exit_s", 0, _num(0), "number >= 0",
        "A worker idle this long exits (exit_reason idle); 0 means never."),
    Key("safety_recheck_s", 30, _num(0.1), "number > 0",
        "Idle daemons re-check the queue this often even without an inotify wake-up."),
    Key("env_allowlist", ["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME",
                          "SHELL", "TERM", "TMPDIR"], _str_list, "list of strings",
        "Environment variables a task inherits from its worker (worker types may add keys)."),
    Key("min_workers", 1, _int(0), "integer >= 0", "Autoscaling floor."),
    Key("max_workers", 4, _int(0), "integer >= 0", "Autoscaling ceiling."),
    Key("max_concurrent_workers", 16, _int(1), "integer >= 1",
        "Hard cap on running workers, whatever max_workers says."),
    Key("scale_up_threshold", 2.0, _num(0), "number >= 0",
        "Scale up while queued/workers is above this ratio."),
    Key("scale_down_threshold", 0.5, _num(0), "number >= 0",
        "Scale down while queued/workers is below this ratio."),
    Key("scale_cooldown_s", 60, _num(0), "number >= 0", "Minimum time between scale operations."),
    Key("warm_pool", 1, _int(0), "integer >= 0", "Idle workers kept ready above the demand."),
    Key("actuator", "auto", _choice("auto", "systemd", "process"),
        '"auto", "systemd" or "process"', "How the supervisor starts and stops workers."),
    Key("systemd_scope", "user", _choice("user", "system"), '"user" or "system"',
        "Which systemd manager the systemd actuator drives (systemctl --user or system)."),
    Key("supervisor_tick_s", 2, _num(0.05), "number > 0",
        "The supervisor reconciles at least this often (besides inotify wake-ups)."),
    # -- health and circuit breaker (supervisor) -----------------------------------------
    Key("health_window_s", 900, _num(1), "number >= 1",
        "Success rate for health is computed over finished attempts in this window."),
    Key("health_min_attempts", 5, _int(0), "integer >= 0",
        "Health judges the success rate only once the window holds this many finished "
        "attempts (one early failure is not an outage); stalled workers always count."),
    Key("circuit_failure_rate", 0.5, _num(0, 1), "number 0..1",
        "A worker type whose failure rate in circuit_window_s exceeds this is paused."),
    Key("circuit_min_tasks", 5, _int(1), "integer >= 1",
        "The circuit breaker judges a type only after this many attempts in the window."),
    Key("circuit_window_s", 300, _num(1), "number >= 1", "Circuit breaker window."),
    Key("circuit_cooldown_s", 300, _num(0), "number >= 0",
        "How long an open circuit keeps its worker type paused."),
    # -- janitor: rotation and retention --------------------------------------------------
    Key("events_max_bytes", 50 * 1024 * 1024, _int(1024), "integer >= 1024",
        "Rotate dashboard-events.jsonl above this size."),
    Key("events_max_lines", 200_000, _int(10), "integer >= 10",
        "Rotate dashboard-events.jsonl above this many lines."),
    Key("events_keep_lines", 20_000, _int(0), "integer >= 0",
        "Newest lines left in the live events file after a rotation."),
    Key("metrics_max_bytes", 20 * 1024 * 1024, _int(1024), "integer >= 1024",
        "Rotate metrics-snapshots.jsonl above this size."),
    Key("metrics_max_lines", 50_000, _int(10), "integer >= 10",
        "Rotate metrics-snapshots.jsonl above this many lines."),
    Key("metrics_keep_lines", 10_080, _int(0), "integer >= 0",
        "Newest snapshots left live after a rotation (a week of minutes)."),
    Key("history_max_bytes", 100 * 1024 * 1024, _int(1024), "integer >= 1024",
        "Rotate task-history.jsonl above this size."),
    Key("history_max_lines", 500_000, _int(10), "integer >= 10",
        "Rotate task-history.jsonl above this many lines."),
    Key("history_keep_lines", 50_000, _int(0), "integer >= 0",
        "Newest history records left live after a rotation."),
    Key("archive_generations", 5, _int(1, 1000), "integer 1..1000",
        "Compressed archives kept per JSONL file (NAME.1.jsonl.gz is the newest)."),
    Key("retention_completed_specs_days", 7, _num(0), "number >= 0",
        "Completed worker specs older than this are pruned."),
    Key("retention_results_days", 30, _num(0), "number >= 0",
        "results/<task_id>/ of finished tasks older than this are pruned."),
    Key("retention_task_logs_days", 14, _num(0), "number >= 0",
        "logs/tasks/<task_id>.log of finished tasks older than this are pruned."),
    # -- observability: metrics and `harness check` thresholds ----------------------------
    Key("redact_patterns", [], _str_list, "list of regexes",
        "Extra secret patterns: each match is shown and stored as [redacted] (events, "
        "history, task show, the shell scripts). POSIX extended regexes without (?, "
        "backslash classes, lazy quantifiers or [:class:] (docs/coordination.md, Redaction)."),
    Key("metrics_textfile", None, lambda v: v is None or isinstance(v, str), "null or path",
        "Also write the Prometheus exposition atomically here (node_exporter textfile)."),
    Key("check_queue_depth", [500, 900], _pair(), "[warning, critical]",
        "harness check: queued tasks."),
    Key("check_error_rate", [0.2, 0.5], _pair(), "[warning, critical]",
        "harness check: failed / finished attempts over health_window_s."),
    Key("check_stalled_workers", [1, 3], _pair(), "[warning, critical]",
        "harness check: stalled workers."),
    Key("check_p95_duration_s", [1800, 3600], _pair(), "[warning, critical]",
        "harness check: p95 task duration over health_window_s."),
    Key("check_disk_free_mb", [1024, 256], _pair(), "[warning, critical] (lower is worse)",
        "harness check: free space on the home's filesystem."),
    Key("check_file_mb", [100, 500], _pair(), "[warning, critical]",
        "harness check: size of any single coordination file."),
    Key("check_events_file_mb", [50, 200], _pair(), "[warning, critical]",
        "harness check: size of dashboard-events.jsonl."),
    Key("check_oldest_queued_s", [300, 1800], _pair(), "[warning, critical]",
        "harness check: age of the oldest runnable queued task (waiting since its "
        "not_before when later than created_at)."),
    Key("check_supervisor_stale_s", 180, _num(1), "number >= 1",
        "harness check: critical when tasks wait and no supervisor has published "
        "health.json for this long (it refreshes it at least every 30 s)."),
)

_SYSTEM_BY_NAME = {k.name: k for k in SYSTEM_KEYS}

DEFAULT_WORKER_TYPES: dict[str, Any] = {
    "_comments": {
        "worker_types": "Map of worker type name to its settings (homes made before this "
                        "key was named so have 'types', still read; `harness init` renames "
                        "it).",
        "command_template": "argv list with {description} {task_id} {priority} {worker_type} "
                            "{correlation_id} placeholders, substituted per element (no shell);"
                            " null: tasks must carry their own command.",
        "env_allowlist": "Extra environment keys passed to tasks of this type (e.g. API keys).",
        "default_budget": "Token budget per task (from the result file's tokens_used); null: none.",
        "timeout_s": "Default task timeout; null: none.",
        "limits": "setrlimit caps: memory_mb (RLIMIT_AS), cpu_seconds, processes (RLIMIT_NPROC).",
        "stall_on_silence": "Optional, default false: the task's progress is its output only "
                            "(not the worker's heartbeats), so a task silent for "
                            "worker_stall_timeout_s is stalled: stopped and retried.",
        "cgroup_limits": "null (off) or systemd resource-control properties of a transient "
                         "scope per task (systemd-run --scope, when the worker runs under "
                         "systemd): MemoryMax, MemoryHigh, CPUQuota, TasksMax, IOWeight as "
                         "strings, e.g. {\"MemoryMax\": \"4G\", \"CPUQuota\": \"200%\"}.",
    },
    "version": 1,
    "worker_types": {
        "default": {
            "description": "Runs the task's own argv.",
            "command_template": None,
            "env_allowlist": [],
            "default_budget": None,
            "timeout_s": None,
            "limits": {"memory_mb": None, "cpu_seconds": None, "processes": None},
            "cgroup_limits": None,
        },
        "shell": {
            "description": "Runs the description as a bash script (explicit opt-in to a shell).",
            "command_template": ["bash", "-c", "{description}"],
            "env_allowlist": [],
            "default_budget": None,
            "timeout_s": 3600,
            "limits": {"memory_mb": None, "cpu_seconds": None, "processes": None},
            "cgroup_limits": None,
        },
    },
}

_TYPE_KEYS: dict[str, tuple[Check, str]] = {
    "description": (lambda v: isinstance(v, str), "string"),
    "command_template": (lambda v: v is None or (_str_list(v) and len(v) > 0),
                         "null or non-empty list of strings"),
    "env_allowlist": (_str_list, "list of strings"),
    "default_budget": (lambda v: v is None or _int(0)(v), "null or integer >= 0"),
    "timeout_s": (lambda v: v is None or _num(0.001)(v), "null or number > 0"),
    "max_attempts": (lambda v: v is None or _int(1, 1000)(v), "null or integer 1..1000"),
    "cwd": (lambda v: v is None or isinstance(v, str), "null or string"),
    "limits": (lambda v: isinstance(v, dict), "object"),
    "cgroup_limits": (lambda v: v is None or isinstance(v, dict), "null or object"),
    "stall_on_silence": (lambda v: isinstance(v, bool), "true or false"),
}
_LIMIT_KEYS = ("memory_mb", "cpu_seconds", "processes")

_SIZE = r"infinity|[0-9]+(\.[0-9]+)?[KMGTPE]?|[0-9]+(\.[0-9]+)?%"
#: The systemd resource-control properties a worker type's ``cgroup_limits`` may set, each
#: with the shape its value must have (a full match; the schema carries the same patterns)
#: and how that shape reads in an error message. Values are passed to ``systemd-run -p``.
SCOPE_PROPERTIES: dict[str, tuple[str, str]] = {
    "MemoryMax": (_SIZE, 'a string: bytes with an optional K/M/G/T/P/E suffix (base 1024), '
                         'a percentage of RAM such as "50%", or "infinity"'),
    "MemoryHigh": (_SIZE, 'a string: bytes with an optional K/M/G/T/P/E suffix (base 1024), '
                          'a percentage of RAM such as "50%", or "infinity"'),
    "CPUQuota": (r"([1-9][0-9]*(\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)%",
                 'a string: a percentage above 0 of one CPU, such as "50%" or "200%"'),
    "TasksMax": (r"[1-9][0-9]*|infinity|[0-9]+(\.[0-9]+)?%",
                 'a string: an integer >= 1, a percentage such as "10%", or "infinity"'),
    "IOWeight": (r"[1-9][0-9]{0,3}|10000", 'a string: an integer 1..10000, such as "100"'),
}


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
        key = _SYSTEM_BY_NAME.get(name)
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
            rule = _TYPE_KEYS.get(key)
            if rule is None:
                raise ConfigError(f"{where}: unknown key {key!r}")
            if not rule[0](value):
                raise ConfigError(f"{where}.{key} must be {rule[1]}, got {value!r}")
            clean[key] = value
        for lk, lv in clean["limits"].items():
            if lk not in _LIMIT_KEYS:
                raise ConfigError(f"{where}.limits: unknown key {lk!r} (known: {_LIMIT_KEYS})")
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
    try:
        st = os.stat(path)
    except FileNotFoundError:
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
