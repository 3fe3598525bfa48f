"""Python SDK of the cex exchange (asyncio).

    from cex_sdk import Client

    async with Client.from_api_key("127.0.0.1:50050", key_id, secret) as client:
        account = await client.auth.get_account()
        balances = await client.ledger.get_balances()
        order = await client.orders.place("BTC-USDT", SIDE_BUY, "0.1", price="100")

Helpers: `MarketMakerSession` (StreamOrders that reconnects and reconciles)
and `LocalOrderBook` (StreamOrderBook with sequence and checksum checks).

See docs/sdk.md.
"""

from .book import BookOutOfSync, BookState, Level, LocalOrderBook, Resync, book_checksum
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
from .marketdata import MarketDataApi
from .orders import TERMINAL_STATES, WORKING_STATES, OrdersApi, new_id, place_request
from .ratelimit import RateLimit
from .retry import NO_RETRY, RetryEvent, RetryPolicy
from .session import (
    Connected,
    Disconnected,
    GapDetected,
    MarketMakerSession,
    Reconciled,
    SessionEvent,
)

# The distribution's version (sdk/python/pyproject.toml); its major is the
# contracts' version, CONTRACTS_VERSION.
__version__ = "1.0.0"
CONTRACTS_VERSION = "v1"

__all__ = [
    "CONTRACTS_VERSION",
    "DEFAULT_TIMEOUT_S",
    "KEEPALIVE_OPTIONS",
    "NO_RETRY",
    "TERMINAL_STATES",
    "WORKING_STATES",
    "AlreadyExistsError",
    "AuthApi",
    "BookOutOfSync",
    "BookState",
    "CancelledError",
    "CexError",
    "Client",
    "Connected",
    "DeadlineExceededError",
    "Disconnected",
    "FailedPreconditionError",
    "FieldViolation",
    "GapDetected",
    "InternalError",
    "InvalidArgumentError",
    "LedgerApi",
    "Level",
    "LocalOrderBook",
    "MarketDataApi",
    "MarketMakerSession",
    "NotFoundError",
    "OrdersApi",
    "PermissionDeniedError",
    "RateLimit",
    "RateLimitedError",
    "Reconciled",
    "Resync",
    "RetryEvent",
    "RetryPolicy",
    "SessionEvent",
    "UnauthenticatedError",
    "UnavailableError",
    "book_checksum",
    "new_id",
    "place_request",
]
