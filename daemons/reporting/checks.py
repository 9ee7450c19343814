"""``harness check``: thresholds over the metrics snapshot, in the monitoring-plugin format.

Each :data:`CHECKS` entry reads one value of a snapshot (:mod:`coordination.metrics`) and
compares it with its ``[warning, critical]`` pair from system.json. :func:`run_check`
records the levels in ``coordination/check-state.json`` (under ``locks/metrics.lock``,
published by rename) and emits one ``performance_alert`` / ``performance_recovered`` event
per level change (docs/observability.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordination import clock
from coordination.config import SystemConfig, load_system
from coordination.errors import CorruptFileError, HarnessError
from coordination.events import emit
from coordination.locks import lock_for
from coordination.metrics import as_number, observe, snapshot_from
from coordination.paths import Home
from coordination.store import read_json, replace_json

LEVELS = ("ok", "warning", "critical")
EVENT_SOURCE = "harness-check"
_MB = 1024 * 1024
_EVENTS_NAME = Home(Path("/")).events_file.name


def check_state_file(home: Home) -> Path:
    """``coordination/check-state.json``: the levels ``harness check`` last reported."""
    return home.coordination / "check-state.json"


@dataclass(frozen=True)
class CheckDef:
    name: str
    key: str          # system.json key with [warning, critical]
    lower_is_worse: bool
    unit: str
    doc: str


CHECKS: tuple[CheckDef, ...] = (
    CheckDef("queue_depth", "check_queue_depth", False, "", "queued tasks"),
    CheckDef("error_rate", "check_error_rate", False, "",
             "failed / finished attempts over health_window_s"),
    CheckDef("stalled_workers", "check_stalled_workers", False, "", "stalled workers"),
    CheckDef("p95_duration_s", "check_p95_duration_s", False, "s",
             "p95 attempt duration over health_window_s"),
    CheckDef("disk_free_mb", "check_disk_free_mb", True, "MB", "free space of the home"),
    CheckDef("file_mb", "check_file_mb", False, "MB", "largest coordination file"),
    CheckDef("events_file_mb", "check_events_file_mb", False, "MB",
             "dashboard-events.jsonl"),
    CheckDef("oldest_queued_s", "check_oldest_queued_s", False, "s",
             "age of the oldest runnable queued task"),
    CheckDef("supervisor_stale_s", "check_supervisor_stale_s", False, "s",
             "age of health.json while tasks wait (critical only)"),
)


def _check_value(check: CheckDef, snap: dict[str, Any]) -> tuple[float | None, str]:
    files: dict[str, int] = snap.get("files") or {}
    if check.name == "queue_depth":
        return float(snap["queue"]["queued"]), ""
    if check.name == "error_rate":
        return as_number(snap.get("error_rate")), ""
    if check.name == "stalled_workers":
        return float(snap["workers"]["stalled"]), ", ".join(snap["workers"]["stalled_ids"][:5])
    if check.name == "p95_duration_s":
        return as_number(snap["durations"]["task_p95_s"]), ""
    if check.name == "disk_free_mb":
        return as_number(snap["disk"]["free_mb"]), ""
    if check.name == "file_mb":
        if not files:
            return 0.0, ""
        name = max(files, key=lambda n: files[n])
        return round(files[name] / _MB, 3), name
    if check.name == "events_file_mb":
        return round(files.get(_EVENTS_NAME, 0) / _MB, 3), ""
    if check.name == "oldest_queued_s":
        return as_number(snap["queue"].get("oldest_runnable_age_s")), ""
    if check.name == "supervisor_stale_s":
        return _supervisor_staleness(snap)
    raise ValueError(check.name)


def _supervisor_staleness(snap: dict[str, Any]) -> tuple[float | None, str]:
    """How long no supervisor has published health.json while tasks wait (None: nothing
    waits). Without any health.json, the oldest waiting task's age: no supervisor has run
    during its whole wait."""
    q, sup = snap["queue"], snap.get("supervisor") or {}
    if not int(q["queued"]) + int(q.get("inbox_pending") or 0):
        return None, ""
    age = as_number(sup.get("health_age_s"))
    if age is not None:
        return age, f"health.json updated {sup.get('health_updated_at')}"
    waited = as_number(q.get("oldest_queued_age_s")) or 0.0
    return waited, "no health.json: no supervisor has run on this home"


def evaluate_checks(snap: dict[str, Any], cfg: SystemConfig) -> list[dict[str, Any]]:
    """One result per :data:`CHECKS` entry: name, value, thresholds, level, detail."""
    out = []
    for check in CHECKS:
        limits = cfg[check.key]
        # A single number (check_supervisor_stale_s) is a critical-only threshold.
        warn, crit = (float(x) for x in (limits if isinstance(limits, list)
                                         else (limits, limits)))
        value, detail = _check_value(check, snap)
        level = "ok"
        if value is not None:
            if check.lower_is_worse:
                level = "critical" if value <= crit else "warning" if value <= warn else "ok"
            else:
                level = "critical" if value >= crit else "warning" if value >= warn else "ok"
        out.append({"name": check.name, "value": value, "warning": warn, "critical": crit,
                    "level": level, "lower_is_worse": check.lower_is_worse,
                    "unit": check.unit, "detail": detail, "doc": check.doc})
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "U"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


def check_summary(results: list[dict[str, Any]]) -> tuple[str, int, str]:
    """``(STATUS, exit code, first line)`` in the monitoring-plugin format."""
    worst = max((LEVELS.index(r["level"]) for r in results), default=0)
    status = ("OK", "WARNING", "CRITICAL")[worst]
    bad = sorted((r for r in results if r["level"] != "ok"),
                 key=lambda r: -LEVELS.index(r["level"]))
    if bad:
        text = ", ".join(
            f"{r['name']}={_fmt(r['value'])}"
            f" ({'crit' if r['level'] == 'critical' else 'warn'} "
            f"{_fmt(r['critical'] if r['level'] == 'critical' else r['warning'])})"
            + (f" [{r['detail']}]" if r["detail"] else "")
            for r in bad)
    else:
        text = f"{len(results)} checks ok"
    perf = " ".join(f"{r['name']}={_fmt(r['value'])}{r['unit'] if r['value'] is not None else ''};"
                    f"{_fmt(r['warning'])};{_fmt(r['critical'])}" for r in results)
    return status, worst, f"HARNESS {status} - {text} | {perf}"


@dataclass
class CheckRun:
    status: str
    exit_code: int
    summary: str
    results: list[dict[str, Any]]
    alerts: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "exit_code": self.exit_code, "summary": self.summary,
                "checks": self.results, "alerts": self.alerts,
                "recoveries": self.recoveries, "notes": self.notes}


def read_check_state(home: Home) -> dict[str, Any]:
    try:
        raw = read_json(check_state_file(home))
    except FileNotFoundError:
        return {"version": 1, "updated_at": None, "checks": {}}
    if not isinstance(raw, dict) or not isinstance(raw.get("checks"), dict):
        raise CorruptFileError(check_state_file(home), "must be an object with 'checks'")
    return raw


def run_check(home: Home, now: float | None = None, *, emit_events: bool = True) -> CheckRun:
    """Evaluate every threshold and record level transitions.

    Under locks/metrics.lock, compares each level with coordination/check-state.json
    (published by rename): a level that rose emits one ``performance_alert`` event, one that
    fell emits ``performance_recovered``; a level that stays the same emits nothing.
    Raises HarnessError (the CLI maps it to UNKNOWN) when the home cannot be read.
    """
    ts = clock.now() if now is None else now
    home.require()
    cfg = load_system(home)
    snap = snapshot_from(observe(home, ts))
    results = evaluate_checks(snap, cfg)
    status, code, summary = check_summary(results)
    run = CheckRun(status, code, summary, results)
    with lock_for(home.lock_path("metrics")).held_for(cfg.lock_timeout):
        try:
            state = read_check_state(home)
        except CorruptFileError as exc:
            run.notes.append(f"{exc}; starting from a clean state")
            state = {"version": 1, "updated_at": None, "checks": {}}
        previous: dict[str, Any] = state["checks"]
        current: dict[str, Any] = {}
        for r in results:
            before = previous.get(r["name"]) if isinstance(previous.get(r["name"]), dict) \
                else None
            old = before.get("level") if before and before.get("level") in LEVELS else "ok"
            since = before.get("since") if before and old == r["level"] else clock.iso(ts)
            current[r["name"]] = {"level": r["level"], "since": since, "value": r["value"]}
            if LEVELS.index(r["level"]) > LEVELS.index(old):
                run.alerts.append(_transition_event("performance_alert", r, old))
            elif LEVELS.index(r["level"]) < LEVELS.index(old):
                run.recoveries.append(_transition_event("performance_recovered", r, old))
        replace_json(check_state_file(home),
                     {"version": 1, "updated_at": clock.iso(ts), "checks": current},
                     cfg.durability, pretty=True)
        if emit_events:
            for fields in run.alerts + run.recoveries:
                try:
                    emit(home, fields["type"], severity=fields["severity"],
                         source=EVENT_SOURCE, message=fields["message"], data=fields["data"],
                         now=ts)
                except HarnessError as exc:
                    run.notes.append(f"could not emit {fields['type']}: {exc}")
    return run


def _transition_event(kind: str, r: dict[str, Any], old: str) -> dict[str, Any]:
    level = r["level"]
    value = _fmt(r["value"])
    unit = r["unit"]
    if kind == "performance_alert":
        threshold = r["critical"] if level == "critical" else r["warning"]
        cmp = "<=" if r["lower_is_worse"] else ">="
        message = (f"{r['name']}={value}{unit} {cmp} {level} threshold {_fmt(threshold)}{unit}"
                   + (f" ({r['detail']})" if r["detail"] else ""))
        severity = "critical" if level == "critical" else "warning"
    else:
        threshold = r["critical"] if old == "critical" else r["warning"]
        message = (f"{r['name']}={value}{unit} cleared its {old} threshold "
                   f"{_fmt(threshold)}{unit} (now {level})")
        severity = "info"
    return {"type": kind, "severity": severity, "message": message,
            "data": {"check": r["name"], "level": level, "previous": old, "value": r["value"],
                     "warning": r["warning"], "critical": r["critical"]}}
