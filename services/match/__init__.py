"""Matching: deterministic in-memory order books, one per market.

``FastOrderBook`` is the one the service runs; ``ReferenceOrderBook`` is the slow,
obviously correct statement of the same rules that the tests compare it with.
The rules themselves are documented in ``services.match.domain``.
"""

from .book import FastOrderBook
from .domain import (
    Accepted,
    Amended,
    AmendOrder,
    BookState,
    Cancelled,
    CancelOrder,
    CancelReason,
    Command,
    Event,
    Expire,
    LevelChanged,
    MarketSpec,
    MassCancel,
    OrderBook,
    OrderType,
    OrderView,
    PlaceOrder,
    Rejected,
    RejectReason,
    Result,
    Side,
    StpMode,
    TimeInForce,
    Trade,
    Triggered,
)
from .reference_book import ReferenceOrderBook

__all__ = [
    "Accepted",
    "AmendOrder",
    "Amended",
    "BookState",
    "CancelOrder",
    "CancelReason",
    "Cancelled",
    "Command",
    "Event",
    "Expire",
    "FastOrderBook",
    "LevelChanged",
    "MarketSpec",
    "MassCancel",
    "OrderBook",
    "OrderType",
    "OrderView",
    "PlaceOrder",
    "ReferenceOrderBook",
    "RejectReason",
    "Rejected",
    "Result",
    "Side",
    "StpMode",
    "TimeInForce",
    "Trade",
    "Triggered",
]
