"""The order-entry rate-limit usage that the exchange reports on its responses.

The order service answers order entry (PlaceOrder and AmendOrder) with the
account's budget as response metadata, like the used-weight headers of the
major exchanges: `x-cex-order-limit-1s`, the order commands allowed per second,
and `x-cex-order-count-1s`, those counted in the current second. The client
reads them from the initial and the trailing metadata of every unary answer,
success or refusal, and keeps the last in `Client.last_rate_limit`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["COUNT_HEADER", "LIMIT_HEADER", "RateLimit", "rate_limit_of"]

LIMIT_HEADER = "x-cex-order-limit-1s"
COUNT_HEADER = "x-cex-order-count-1s"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """An account's order budget as one answer reported it."""

    method: str  # the call that reported it, e.g. /cex.order.v1.OrderService/PlaceOrder
    limit: int  # order commands allowed per second
    used: int  # counted in the current second, this call included

    @property
    def remaining(self) -> int:
        """Commands that may still be sent in this second."""
        return max(self.limit - self.used, 0)


def rate_limit_of(method: str, *metadata: Iterable[tuple[str, Any]] | None) -> RateLimit | None:
    """The usage in a call's metadata (later sets win), or None if it carries none."""
    values: dict[str, Any] = {}
    for pairs in metadata:
        for key, value in pairs or ():
            values[key.lower()] = value
    try:
        limit, used = int(values[LIMIT_HEADER]), int(values[COUNT_HEADER])
    except (KeyError, TypeError, ValueError):
        return None
    if limit <= 0 or used < 0:
        return None
    return RateLimit(method, limit, used)
