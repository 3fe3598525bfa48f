"""An optional time on the wire: a `Timestamp` where there is a time, the field
unset (None) where there is none, never the epoch (see times.py)."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from .times import timestamp

__all__ = ["timestamp_or_none"]


def timestamp_or_none(value: datetime | None) -> Timestamp | None:
    return None if value is None else timestamp(value)
