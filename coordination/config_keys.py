"""What every config key is: the system.json keys and the worker-type keys, declared once.

:data:`SYSTEM_KEYS` holds each system key with its default, its check, what it expects
and a line of documentation (``harness init`` writes the defaults with those lines under
``_comments``; docs/coordination.md carries the same table). :data:`TYPE_KEYS`,
:data:`LIMIT_KEYS` and :data:`SCOPE_PROPERTIES` are the keys of a worker type in
worker-types.json, and :data:`DEFAULT_WORKER_TYPES` its defaults. Loading and validating
the files is :mod:`coordination.config`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

SYSTEM_BY_NAME = {k.name: k for k in SYSTEM_KEYS}

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

TYPE_KEYS: dict[str, tuple[Check, str]] = {
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
LIMIT_KEYS = ("memory_mb", "cpu_seconds", "processes")

SIZE_PATTERN = r"infinity|[0-9]+(\.[0-9]+)?[KMGTPE]?|[0-9]+(\.[0-9]+)?%"
#: The systemd resource-control properties a worker type's ``cgroup_limits`` may set, each
#: with the shape its value must have (a full match; the schema carries the same patterns)
#: and how that shape reads in an error message. Values are passed to ``systemd-run -p``.
SCOPE_PROPERTIES: dict[str, tuple[str, str]] = {
    "MemoryMax": (SIZE_PATTERN, 'a string: bytes with an optional K/M/G/T/P/E suffix (base 1024), '
                         'a percentage of RAM such as "50%", or "infinity"'),
    "MemoryHigh": (SIZE_PATTERN, 'a string: bytes with an optional K/M/G/T/P/E suffix (base 1024), '
                          'a percentage of RAM such as "50%", or "infinity"'),
    "CPUQuota": (r"([1-9][0-9]*(\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)%",
                 'a string: a percentage above 0 of one CPU, such as "50%" or "200%"'),
    "TasksMax": (r"[1-9][0-9]*|infinity|[0-9]+(\.[0-9]+)?%",
                 'a string: an integer >= 1, a percentage such as "10%", or "infinity"'),
    "IOWeight": (r"[1-9][0-9]{0,3}|10000", 'a string: an integer 1..10000, such as "100"'),
}
