"""Integer nanoseconds since the epoch <-> aware UTC datetimes, as PostgreSQL's
`timestamptz` keeps them: to the microsecond (a time stored from nanoseconds
comes back a whole number of microseconds, in nanoseconds)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["ns_from_utc", "utc_from_ns"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def utc_from_ns(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def ns_from_utc(value: datetime) -> int:
    return (value - _EPOCH) // _US * 1000
