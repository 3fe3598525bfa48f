"""Shared helpers for the matching engine tests (imported by conftest and tests)."""

from __future__ import annotations

import itertools
from typing import Any

from services.match import (
    AmendOrder,
    CancelOrder,
    Event,
    FastOrderBook,
    MarketSpec,
    MassCancel,
    OrderBook,
    OrderType,
    PlaceOrder,
    ReferenceOrderBook,
    Result,
    Side,
    TimeInForce,
)

BOOKS: list[type[OrderBook]] = [ReferenceOrderBook, FastOrderBook]

SPEC = MarketSpec(
    symbol="BTC-USD", tick_size=100, lot_size=1000, min_qty=1, max_qty=1_000, min_notional=0
)


class Driver:
    """A book plus a command clock: each command gets ts = previous + 1 unless given."""

    def __init__(self, book: OrderBook) -> None:
        self.book = book
        self._clock = itertools.count(1_000)
        self.ts = 1_000

    def _ts(self, ts: int | None) -> int:
        self.ts = next(self._clock) if ts is None else ts
        return self.ts

    def submit(self, command: Any) -> list[Event]:
        result: Result = self.book.submit(command)
        return result.events

    def place(
        self,
        order_id: int,
        side: Side,
        qty: int,
        price: int | None,
        *,
        account: int = 1,
        ts: int | None = None,
        **kw: Any,
    ) -> list[Event]:
        return self.submit(
            PlaceOrder(
                ts=self._ts(ts),
                order_id=order_id,
                account_id=account,
                side=side,
                qty=qty,
                price=price,
                **kw,
            )
        )

    def buy(self, order_id: int, qty: int, price: int | None, **kw: Any) -> list[Event]:
        return self.place(order_id, Side.BUY, qty, price, **kw)

    def sell(self, order_id: int, qty: int, price: int | None, **kw: Any) -> list[Event]:
        return self.place(order_id, Side.SELL, qty, price, **kw)

    def market(
        self, order_id: int, side: Side, qty: int, *, price: int | None = None, **kw: Any
    ) -> list[Event]:
        kw.setdefault("tif", TimeInForce.IOC)
        return self.place(order_id, side, qty, price, order_type=OrderType.MARKET, **kw)

    def cancel(self, order_id: int, *, account: int = 1, ts: int | None = None) -> list[Event]:
        return self.submit(CancelOrder(ts=self._ts(ts), order_id=order_id, account_id=account))

    def amend(
        self,
        order_id: int,
        *,
        price: int | None = None,
        qty: int | None = None,
        account: int = 1,
        ts: int | None = None,
    ) -> list[Event]:
        return self.submit(
            AmendOrder(ts=self._ts(ts), order_id=order_id, account_id=account, price=price, qty=qty)
        )

    def mass_cancel(
        self, account: int, side: Side | None = None, *, ts: int | None = None
    ) -> list[Event]:
        return self.submit(MassCancel(ts=self._ts(ts), account_id=account, side=side))
