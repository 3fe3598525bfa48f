"""Nanoseconds <-> UTC datetimes as PostgreSQL keeps them (chassis/times.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from services.chassis import ns_from_utc, utc_from_ns


def test_the_epoch_and_a_known_instant() -> None:
    assert utc_from_ns(0) == datetime(1970, 1, 1, tzinfo=UTC)
    moment = datetime(2026, 12, 7, 21, 30, 1, 123456, tzinfo=UTC)
    assert ns_from_utc(moment) == 1_796_679_001_123_456_000
    assert utc_from_ns(1_796_679_001_123_456_789) == moment  # to the microsecond


@given(st.integers(min_value=0, max_value=4_000_000_000 * 10**9))
def test_a_time_comes_back_truncated_to_the_microsecond(ns: int) -> None:
    assert ns_from_utc(utc_from_ns(ns)) == ns // 1000 * 1000
