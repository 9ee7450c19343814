"""The metrics snapshot and the health rule, computed from the coordination files.

Pure computation over the home (docs/observability.md): no long loop, no subprocess. The
reporting built on top (``harness status``, ``check``, ``timeline``) lives in
:mod:`daemons.reporting`. One module per part; this package exports their public names:

- :mod:`~coordination.metrics.values`: timestamps and numbers of records, the one
  :func:`percentile`.
- :mod:`~coordination.metrics.window`: the history window (:class:`HistoryWindow`,
  :class:`AttemptWindow`) and its attempt statistics (:func:`window_stats`).
- :mod:`~coordination.metrics.health`: the stall rule (:func:`stall_reason`, shared with
  the supervisor), the worker rows, the health rule (:func:`compute_health`) and the
  ``health.json`` document the supervisor publishes (:func:`health_document`).
- :mod:`~coordination.metrics.observation`: one read of the home (:func:`observe`).
- :mod:`~coordination.metrics.snapshot`: the snapshot schema (:func:`snapshot_from`) and
  ``metrics-snapshots.jsonl`` (:func:`take_snapshot`), which it owns.
- :mod:`~coordination.metrics.counters`: the cumulative, incremental counters.
"""

from .counters import update_counters
from .health import (
    HEALTH_STATES,
    HEALTHY_SUCCESS_RATE,
    STALL_STATES,
    UNHEALTHY_STALLED,
    UNHEALTHY_SUCCESS_RATE,
    WORKER_STATES,
    compute_health,
    health_document,
    stall_reason,
    worker_rows,
)
from .observation import Observation, observe
from .snapshot import build_snapshot, last_snapshot, recent_snapshots, snapshot_from, take_snapshot
from .values import as_number, percentile, ts_of
from .window import (
    HISTORY_TAIL_MAX_BYTES,
    HISTORY_TAIL_MAX_RECORDS,
    AttemptWindow,
    HistoryWindow,
    attempt_result,
    history_window,
    window_stats,
)

__all__ = [
    "HEALTHY_SUCCESS_RATE",
    "HEALTH_STATES",
    "HISTORY_TAIL_MAX_BYTES",
    "HISTORY_TAIL_MAX_RECORDS",
    "STALL_STATES",
    "UNHEALTHY_STALLED",
    "UNHEALTHY_SUCCESS_RATE",
    "WORKER_STATES",
    "AttemptWindow",
    "HistoryWindow",
    "Observation",
    "as_number",
    "attempt_result",
    "build_snapshot",
    "compute_health",
    "health_document",
    "history_window",
    "last_snapshot",
    "observe",
    "percentile",
    "recent_snapshots",
    "snapshot_from",
    "stall_reason",
    "take_snapshot",
    "ts_of",
    "update_counters",
    "window_stats",
    "worker_rows",
]
