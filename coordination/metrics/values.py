"""The values of coordination records as numbers: timestamps, numbers, quantiles.

Small pure helpers shared by every part of :mod:`coordination.metrics` and by the
reporting, the benches and the load test.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from functools import lru_cache
from typing import Any

from .. import clock

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


@lru_cache(maxsize=1024)
def _day_seconds(day: str) -> int:
    return (date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL) * 86400


def ts_of(value: Any) -> float | None:
    """Epoch seconds of a contract timestamp, None when absent or malformed.

    The contract's ``YYYY-MM-DDTHH:MM:SS.mmmZ`` is parsed by slicing (a cached day plus the
    time of day), several times faster than strptime; other forms go through
    clock.parse_iso."""
    if not isinstance(value, str):
        return None
    if len(value) == 24 and value[10] == "T" and value[19] == "." and value[23] == "Z":
        try:
            return (_day_seconds(value[:10]) + int(value[11:13]) * 3600
                    + int(value[14:16]) * 60 + int(value[17:19]) + int(value[20:23]) / 1000)
        except ValueError:
            return None
    try:
        return clock.parse_iso(value)
    except ValueError:
        return None


def as_number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1), None for no values: the one definition behind every p50,
    p95 and p99 harness reports (snapshots, ``harness bench``, the load test).

    Linear interpolation between the closest ranks: position ``(n - 1) * q`` of the sorted
    values (type 7 of Hyndman and Fan, numpy's default, Excel's PERCENTILE.INC), so the
    median of an even count is the mean of the middle two and a single value is every
    quantile."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def rounded(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded to ``digits`` places; None stays None."""
    return None if value is None else round(value, digits)
