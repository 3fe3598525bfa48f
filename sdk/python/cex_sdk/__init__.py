"""Python SDK of the cex exchange (asyncio).

    from cex_sdk import Client

    async with Client.from_api_key("127.0.0.1:50050", key_id, secret) as client:
        account = await client.auth.get_account()
        balances = await client.ledger.get_balances()

See docs/sdk.md.
"""

from .client import DEFAULT_TIMEOUT_S, KEEPALIVE_OPTIONS, AuthApi, Client, LedgerApi
from .errors import (
    AlreadyExistsError,
    CancelledError,
    CexError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
    UnavailableError,
)
from .retry import NO_RETRY, RetryEvent, RetryPolicy

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "KEEPALIVE_OPTIONS",
    "NO_RETRY",
    "AlreadyExistsError",
    "AuthApi",
    "CancelledError",
    "CexError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "LedgerApi",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "RetryEvent",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
]
