"""Our errors as CCXT's exception classes, decided by the ErrorInfo reason.

Every refusal over REST is a `google.rpc.Status` in JSON (ADR 0003): a
canonical `code`, a `message` for people and, in `details`, an `ErrorInfo`
whose `reason` (UPPER_SNAKE, prefixed by the component) is the contract.
The class is chosen from the reason alone: first an exact match, then a
pattern of the reason's family, then the canonical code. The message text
is never read (it is for people, and it changes).
"""

from __future__ import annotations

from typing import Any

from ccxt.base import errors as x

__all__ = ["BY_CODE", "EXACT", "PATTERNS", "error_class", "reason_of"]

ErrorClass = type[x.BaseError]

# Reasons whose CCXT class differs from what their family or code says.
EXACT: dict[str, ErrorClass] = {
    # Money the account does not have (an order, a withdrawal). An amend that
    # needs more than its order holds is InvalidOrder (ORDER_AMEND_*): cancel and place.
    "LEDGER_INSUFFICIENT_FUNDS": x.InsufficientFunds,
    # Orders that do not exist for this account, or are over.
    "ORDER_NOT_FOUND": x.OrderNotFound,
    "MATCH_UNKNOWN_ORDER": x.OrderNotFound,
    "ORDER_ALREADY_CLOSED": x.OrderNotFound,
    # An order the exchange refuses as such.
    "MATCH_POST_ONLY_WOULD_TAKE": x.OrderImmediatelyFillable,
    # The market's status refuses it (ADR 0015).
    "MATCH_MARKET_POST_ONLY": x.InvalidOrder,
    "MATCH_MARKET_CANCEL_ONLY": x.MarketClosed,
    "MATCH_MARKET_HALTED": x.MarketClosed,
    "MATCH_MARKET_DELISTED": x.BadSymbol,
    "ORDER_DUPLICATE_CLIENT_ORDER_ID": x.DuplicateOrderId,
    "ORDER_PRICE_OFF_TICK": x.InvalidOrder,
    "ORDER_QUANTITY_OFF_LOT": x.InvalidOrder,
    "ORDER_QUANTITY_TOO_SMALL": x.InvalidOrder,
    "ORDER_QUANTITY_TOO_LARGE": x.InvalidOrder,
    "ORDER_QUOTE_QUANTITY_TOO_LARGE": x.InvalidOrder,
    "ORDER_QUOTE_QUANTITY_OFF_GRID": x.InvalidOrder,
    "ORDER_NOTIONAL_TOO_SMALL": x.InvalidOrder,
    "ORDER_PRICE_TOO_LARGE": x.InvalidOrder,
    "ORDER_NOT_AMENDABLE": x.InvalidOrder,
    "ORDER_MARKET_PROTECTION": x.InvalidOrder,
    "ORDER_NO_REFERENCE_PRICE": x.InvalidOrder,
    "ORDER_REJECTED": x.InvalidOrder,
    "ORDER_RISK_DENIED": x.InvalidOrder,
    "RISK_PRICE_OUT_OF_BAND": x.InvalidOrder,
    "RISK_QUANTITY_LIMIT_EXCEEDED": x.InvalidOrder,
    "RISK_NOTIONAL_LIMIT_EXCEEDED": x.InvalidOrder,
    "RISK_OPEN_ORDERS_LIMIT_EXCEEDED": x.InvalidOrder,
    "RISK_KILL_SWITCH_ENGAGED": x.PermissionDenied,
    # Symbols and assets.
    "ORDER_UNKNOWN_MARKET": x.BadSymbol,
    "MARKETDATA_UNKNOWN_MARKET": x.BadSymbol,
    "FUNDING_ASSET_UNSUPPORTED": x.BadRequest,
    "FUNDING_ADDRESS_INVALID": x.InvalidAddress,
    # Rate limits: the edge's per-client buckets and risk's per-account ones.
    "EDGE_RATE_LIMITED": x.RateLimitExceeded,
    "RISK_RATE_LIMITED": x.RateLimitExceeded,
    # Credentials and rights.
    "AUTH_INVALID_CREDENTIALS": x.AuthenticationError,
    "AUTH_UNKNOWN_KEY": x.AuthenticationError,
    "AUTH_API_KEY_NOT_FOUND": x.AuthenticationError,
    "AUTH_KEY_EXPIRED": x.AuthenticationError,
    "AUTH_KEY_REVOKED": x.AuthenticationError,
    "AUTH_ACCOUNT_SUSPENDED": x.AccountSuspended,
    "AUTH_ACCOUNT_CLOSED": x.AccountSuspended,
    "AUTH_ACCOUNT_NOT_ACTIVE": x.AccountSuspended,
    # A withdrawal stopped before its broadcast because its account was frozen.
    "FUNDING_ACCOUNT_SUSPENDED": x.AccountSuspended,
    "FUNDING_ACCOUNT_CLOSED": x.AccountSuspended,
    "RISK_ACCOUNT_FROZEN": x.AccountSuspended,
    "AUTH_SCOPE_MISSING": x.PermissionDenied,
    "AUTH_ADDRESS_NOT_ALLOWED": x.PermissionDenied,
    "EDGE_PERMISSION_DENIED": x.PermissionDenied,
    # Withdrawals halted by risk or the ledger's auditor: try again later.
    "RISK_WITHDRAWALS_HALTED": x.OnMaintenance,
    "LEDGER_HALTED": x.OnMaintenance,
    "MARKETDATA_NOT_READY": x.ExchangeNotAvailable,
    "ORDER_SHUTTING_DOWN": x.ExchangeNotAvailable,
    "MATCH_STOPPING": x.ExchangeNotAvailable,
}

# Families of reasons, tried in order when no exact entry matches:
# (prefix, suffix) -> class; an empty part matches anything.
PATTERNS: tuple[tuple[str, str, ErrorClass], ...] = (
    ("", "_UNAVAILABLE", x.ExchangeNotAvailable),
    ("AUTH_TOKEN_", "", x.AuthenticationError),
    ("ORDER_INVALID_", "", x.InvalidOrder),
    ("ORDER_AMEND_", "", x.InvalidOrder),
    ("MATCH_INVALID_", "", x.InvalidOrder),
    ("MATCH_QUANTITY_", "", x.InvalidOrder),
    ("MATCH_NOTIONAL_", "", x.InvalidOrder),
    ("MATCH_MARKET_ORDER_", "", x.InvalidOrder),
    ("RISK_WITHDRAWAL_", "", x.PermissionDenied),
    ("EDGE_", "", x.BadRequest),
)

# google.rpc.Code -> class, when the reason says nothing more specific.
BY_CODE: dict[int, ErrorClass] = {
    3: x.BadRequest,  # INVALID_ARGUMENT
    4: x.RequestTimeout,  # DEADLINE_EXCEEDED
    5: x.BadRequest,  # NOT_FOUND (orders: OrderNotFound, by reason)
    6: x.BadRequest,  # ALREADY_EXISTS: an idempotency key reused with another body
    7: x.PermissionDenied,  # PERMISSION_DENIED
    8: x.RateLimitExceeded,  # RESOURCE_EXHAUSTED
    9: x.BadRequest,  # FAILED_PRECONDITION
    10: x.ExchangeError,  # ABORTED
    12: x.NotSupported,  # UNIMPLEMENTED
    13: x.ExchangeError,  # INTERNAL
    14: x.ExchangeNotAvailable,  # UNAVAILABLE
    16: x.AuthenticationError,  # UNAUTHENTICATED
}


def reason_of(status: Any) -> str:
    """The ErrorInfo reason of a google.rpc.Status in JSON, or ''."""
    if not isinstance(status, dict):
        return ""
    for detail in status.get("details") or ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith(
            "google.rpc.ErrorInfo"
        ):
            return str(detail.get("reason") or "")
    return ""


def error_class(reason: str, code: int | None) -> ErrorClass | None:
    """The CCXT class for a reason (and the status code beside it)."""
    if reason in EXACT:
        return EXACT[reason]
    for prefix, suffix, cls in PATTERNS:
        if reason.startswith(prefix) and reason.endswith(suffix):
            return cls
    return BY_CODE.get(code) if code is not None else None
