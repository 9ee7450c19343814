"""coordination.clock: the contract's timestamps, formatted and parsed fast, and exactly as
the strptime/strftime definitions they replace."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordination import clock

_FORMAT = "%Y-%m-%dT%H:%M:%S"
# Epoch seconds from 1970 to 9999 (the four-digit years the contract's format has).
instants = st.floats(min_value=0, max_value=253402300799.0, allow_nan=False)


def reference_iso(ts: float) -> str:
    secs, millis = divmod(int(ts * 1000), 1000)
    return time.strftime(_FORMAT, time.gmtime(secs)) + f".{millis:03d}Z"


def reference_parse(text: str) -> float:
    """The definition parse_iso had: strptime, with or without a fraction, then Z."""
    if not text.endswith("Z"):
        raise ValueError(text)
    body = text[:-1]
    dt = datetime.strptime(body, _FORMAT + ".%f" if "." in text else _FORMAT)
    return dt.replace(tzinfo=UTC).timestamp()


@given(st.lists(instants, min_size=1, max_size=5))
def test_iso_and_compact_match_strftime_whatever_came_before(stamps: list[float]) -> None:
    # The cached second must never leak into another second's text.
    for ts in stamps:
        assert clock.iso(ts) == reference_iso(ts)
        secs, millis = divmod(int(ts * 1000), 1000)
        assert clock.compact(ts) == time.strftime("%Y%m%dT%H%M%S", time.gmtime(secs)) \
            + f"{millis:03d}"


@given(instants)
def test_parse_iso_inverts_iso(ts: float) -> None:
    text = clock.iso(ts)
    assert clock.parse_iso(text) == reference_parse(text)
    assert abs(clock.parse_iso(text) - int(ts * 1000) / 1000) < 1e-3


@given(st.text(alphabet="0123456789-T:.Z ", max_size=30))
def test_parse_iso_accepts_exactly_what_strptime_accepted(text: str) -> None:
    try:
        expected: float | None = reference_parse(text)
    except ValueError:
        expected = None
    # strptime also takes unpadded fields ("2026-1-3T..."); the contract's writers never
    # produce them, and parse_iso refuses them: only the padded shape is a timestamp.
    padded = len(text.split(".")[0].rstrip("Z")) == 19
    if expected is not None and padded:
        assert clock.parse_iso(text) == expected
    elif expected is None:
        with pytest.raises(ValueError):
            clock.parse_iso(text)


@pytest.mark.parametrize("text", [
    "2026-12-03T19:45:01", "2026-12-03T19:45:01.123", "2026-12-03T19:45:01.1234567Z",
    "2026-12-03 19:45:01Z", "2026-12-03T24:00:00Z", "2026-02-30T00:00:00Z",
    "2026-12-03T19:45:01+00:00", "\uff12026-12-03T19:45:01Z", "2026-W49-4T00:00:00Z", "", "Z"])
def test_parse_iso_refuses_what_is_not_a_contract_timestamp(text: str) -> None:
    with pytest.raises(ValueError):
        clock.parse_iso(text)


def test_parse_iso_refuses_a_non_string() -> None:
    with pytest.raises(ValueError):
        clock.parse_iso(1234)  # type: ignore[arg-type]
