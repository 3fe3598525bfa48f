"""The service chassis: what every exchange service runs on."""

from .account_states import AccountStates
from .authn import (
    INTERNAL,
    PUBLIC,
    AuthContext,
    Policy,
    Rule,
    ServiceCredentials,
    current_auth,
    owned_account,
    owned_resource,
    sees_every_account,
    user,
)
from .bus import (
    Outbox,
    PullConsumer,
    ensure_stream,
    match_event_consumer,
    match_events,
    nats_connection,
    observe_fetch,
)
from .cache import redis_connection
from .clients import mesh_channel, service_credentials
from .command_stream import CommandStream
from .db import MigrationError, migrate, postgres
from .env_fields import env_fields
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
    Violations,
    batch_size,
    invalid,
    invalid_field,
    require_request_id,
)
from .infra import Infrastructure, connect
from .markets import Asset, Catalog, Market, load_catalog
from .maybe_times import timestamp_or_none
from .money import MoneyError, from_units, to_units
from .nanos import ns_from_utc, utc_from_ns
from .outbox_rows import relay_outbox_rows
from .pages import bad_page_token, page_size, page_token, parse_page_token, read_page_token
from .rows import from_row
from .server import Server, background, poll_until_cancelled, run
from .settings import ChassisSettings
from .telemetry import metrics_registry
from .time_pages import time_key_after, time_keyed_page
from .times import from_timestamp, optional_time, timestamp, timestamp_ns

__all__ = [
    "INTERNAL",
    "PUBLIC",
    "AccountStates",
    "AlreadyExists",
    "Asset",
    "AuthContext",
    "Catalog",
    "ChassisSettings",
    "CommandStream",
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
    "Outbox",
    "PermissionDenied",
    "Policy",
    "PullConsumer",
    "ResourceExhausted",
    "Rule",
    "Server",
    "ServiceCredentials",
    "Unauthenticated",
    "Unavailable",
    "Violations",
    "background",
    "bad_page_token",
    "batch_size",
    "connect",
    "current_auth",
    "ensure_stream",
    "env_fields",
    "from_row",
    "from_timestamp",
    "from_units",
    "invalid",
    "invalid_field",
    "load_catalog",
    "match_event_consumer",
    "match_events",
    "mesh_channel",
    "metrics_registry",
    "migrate",
    "nats_connection",
    "ns_from_utc",
    "observe_fetch",
    "optional_time",
    "owned_account",
    "owned_resource",
    "page_size",
    "page_token",
    "parse_page_token",
    "poll_until_cancelled",
    "postgres",
    "read_page_token",
    "redis_connection",
    "relay_outbox_rows",
    "require_request_id",
    "run",
    "sees_every_account",
    "service_credentials",
    "time_key_after",
    "time_keyed_page",
    "timestamp",
    "timestamp_ns",
    "timestamp_or_none",
    "to_units",
    "user",
    "utc_from_ns",
]
