"""The service chassis: what every exchange service runs on."""

from .authn import (
    INTERNAL,
    PUBLIC,
    AuthContext,
    Policy,
    Rule,
    ServiceCredentials,
    current_auth,
    owned_account,
    user,
)
from .bus import PullConsumer, ensure_stream, match_events, nats_connection, observe_fetch
from .cache import redis_connection
from .clients import mesh_channel, service_credentials
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
    require_request_id,
)
from .infra import Infrastructure, connect
from .markets import Asset, Catalog, Market, load_catalog
from .money import MoneyError, from_units, to_units
from .server import Server, background, run
from .settings import ChassisSettings

__all__ = [
    "INTERNAL",
    "PUBLIC",
    "AlreadyExists",
    "Asset",
    "AuthContext",
    "Catalog",
    "ChassisSettings",
    "ErrorDetails",
    "ExchangeError",
    "FailedPrecondition",
    "FieldViolation",
    "Infrastructure",
    "InvalidArgument",
    "Market",
    "MigrationError",
    "MoneyError",
    "NotFound",
    "PermissionDenied",
    "Policy",
    "PullConsumer",
    "ResourceExhausted",
    "Rule",
    "Server",
    "ServiceCredentials",
    "Unauthenticated",
    "Unavailable",
    "background",
    "connect",
    "current_auth",
    "ensure_stream",
    "from_units",
    "load_catalog",
    "match_events",
    "mesh_channel",
    "migrate",
    "nats_connection",
    "observe_fetch",
    "owned_account",
    "postgres",
    "redis_connection",
    "require_request_id",
    "run",
    "service_credentials",
    "to_units",
    "user",
]
