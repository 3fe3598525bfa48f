"""Times at the edge: google.protobuf.Timestamp <-> aware UTC datetimes and nanoseconds.

Inside a service a time is an aware `datetime` in UTC or integer nanoseconds
since the epoch; on the wire it is a `Timestamp` named `*_time`. An unset
optional `Timestamp` field reads as None, never as the epoch.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["from_timestamp", "optional_time", "timestamp", "timestamp_ns"]


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


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
