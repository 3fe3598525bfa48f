"""The service chassis: what every exchange service runs on."""

from .bus import ensure_stream, nats_connection
from .cache import redis_connection
from .clients import mesh_channel
from .db import MigrationError, migrate, postgres
from .errors import (
    AlreadyExists,
    ErrorDetails,
    ExchangeError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .infra import Infrastructure, connect
from .server import Server, run
from .settings import ChassisSettings

__all__ = [
    "AlreadyExists",
    "ChassisSettings",
    "ErrorDetails",
    "ExchangeError",
    "FailedPrecondition",
    "FieldViolation",
    "Infrastructure",
    "InvalidArgument",
    "MigrationError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Server",
    "Unauthenticated",
    "Unavailable",
    "connect",
    "ensure_stream",
    "mesh_channel",
    "migrate",
    "nats_connection",
    "postgres",
    "redis_connection",
    "run",
]
