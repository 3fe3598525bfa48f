"""Times at the edge: google.protobuf.Timestamp <-> aware UTC datetimes and nanoseconds.

Inside a service a time is an aware `datetime` in UTC or integer nanoseconds
since the epoch; on the wire it is a `Timestamp` named `*_time`. An unset
optional `Timestamp` field reads as None, never as the epoch, and no time is
written as the field unset. Nanoseconds <-> datetimes go as PostgreSQL's
`timestamptz` keeps them: to the microsecond (a time stored from nanoseconds
comes back a whole number of microseconds, in nanoseconds).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = [
    "from_timestamp",
    "ns_from_utc",
    "optional_time",
    "timestamp",
    "timestamp_ns",
    "timestamp_or_none",
    "utc_from_ns",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def timestamp_or_none(value: datetime | None) -> Timestamp | None:
    return None if value is None else timestamp(value)


def timestamp_ns(ns: int) -> Timestamp:
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def from_timestamp(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def optional_time(message: Message, field: str) -> datetime | None:
    """`message.<field>` as a datetime, None when the field is unset."""
    if not message.HasField(field):
        return None
    stamp: Timestamp = getattr(message, field)
    return from_timestamp(stamp)


def utc_from_ns(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def ns_from_utc(value: datetime) -> int:
    return (value - _EPOCH) // _US * 1000
