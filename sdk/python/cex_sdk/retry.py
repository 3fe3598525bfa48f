"""When a failed call is tried again, and after how long.

Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried, with exponential backoff
and full jitter; a server's RetryInfo delay is a floor (never retry sooner
than asked). A call is retried only if running it twice cannot do something
twice: reads (Get*, List*, Audit*, IssueToken, health) always, a mutating call
only when its request carries its idempotency key (`request_id`,
`client_order_id`, or `id`; for batches, every item's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor
from google.protobuf.message import Message

__all__ = [
    "IDEMPOTENCY_KEY_FIELDS",
    "NO_RETRY",
    "RETRYABLE_CODES",
    "RetryEvent",
    "RetryPolicy",
    "has_idempotency_key",
    "is_read",
    "may_retry",
]

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: A mutating request's idempotency key, first match wins: CancelOrder's key is
#: its request_id (its client_order_id names the order to cancel).
IDEMPOTENCY_KEY_FIELDS = ("request_id", "client_order_id", "id")
_READ_PREFIXES = ("Get", "List", "Audit", "Check", "Watch")
_SAFE_METHODS = frozenset({"IssueToken"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by the call's deadline.

    Attempt n (n >= 1 retries) waits uniform(0, min(max_backoff_s,
    initial_backoff_s * multiplier ** (n - 1))), plus the server's RetryInfo
    delay when it sent one.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")

    def backoff_cap_s(self, retry: int) -> float:
        """The upper bound of the jittered wait before retry number `retry` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))

    def delay_s(
        self, retry: int, retry_after_s: float | None, random: Callable[[], float]
    ) -> float:
        """The wait before retry number `retry`; `random()` is uniform in [0, 1)."""
        jittered = self.backoff_cap_s(retry) * random()
        return (retry_after_s or 0.0) + jittered


#: No retries: every failure is raised at once.
NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """Reported to `on_retry` before each retry's wait."""

    method: str
    retry: int
    code: grpc.StatusCode
    reason: str
    delay_s: float
    retry_after_s: float | None


def _short_name(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def is_read(method: str) -> bool:
    """A method that changes nothing (by name: /pkg.Service/GetX, ListX, ...)."""
    name = _short_name(method)
    return name in _SAFE_METHODS or name.startswith(_READ_PREFIXES)


def has_idempotency_key(request: Message) -> bool:
    """Whether the request carries its idempotency key (see IDEMPOTENCY_KEY_FIELDS).

    A batch (a request whose only keyed content is a repeated message field,
    e.g. CreateTransfers' `transfers` or BatchPlaceOrders' `requests`) counts
    when it is non-empty and every item has its key.
    """
    fields = request.DESCRIPTOR.fields_by_name
    for name in IDEMPOTENCY_KEY_FIELDS:
        field = fields.get(name)
        if field is not None and field.type == descriptor.FieldDescriptor.TYPE_STRING:
            return bool(getattr(request, name))
    for field in request.DESCRIPTOR.fields:
        item_type = field.message_type
        if field.is_repeated and item_type is not None and not item_type.GetOptions().map_entry:
            items = getattr(request, field.name)
            if len(items) and all(has_idempotency_key(item) for item in items):
                return True
    return False


def may_retry(method: str, request: Message, code: grpc.StatusCode) -> bool:
    """Whether a call that failed with `code` may be sent again as it is."""
    if code not in RETRYABLE_CODES:
        return False
    return is_read(method) or has_idempotency_key(request)
