"""The reference book: slow and obviously correct.

Orders live in two plain lists (resting, pending stops). Every question (what is
the best order, what are the levels) is answered by sorting or filtering those lists
from scratch; L2 changes are the difference of the whole L2 before and after the
command. It exists to be read and to check the fast book against (see
``tests/unit/match``); the rules it follows are in ``domain``'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Self

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
    MarkStatus,
    MassCancel,
    OrderBook,
    OrderType,
    OrderView,
    PlaceOrder,
    Rejected,
    RejectReason,
    Result,
    Side,
    StatusMarked,
    StpMode,
    TimeInForce,
    Trade,
    Triggered,
    check_amend_size,
    validate_amend,
    validate_place,
)

__all__ = ["ReferenceOrderBook"]


_VIEW_FIELDS = tuple(f.name for f in fields(OrderView))  # the same as _Order's


@dataclass(eq=False)
class _Order:
    order_id: int
    account_id: int
    side: Side
    order_type: OrderType
    price: int | None
    stop_price: int | None
    qty: int
    leaves: int
    tif: TimeInForce
    expire_time: int | None
    post_only: bool
    stp: StpMode
    quote_budget: int | None
    accepted_seq: int
    priority: int

    def view(self) -> OrderView:
        return OrderView(**{name: getattr(self, name) for name in _VIEW_FIELDS})

    @classmethod
    def from_view(cls, v: OrderView) -> _Order:
        return cls(**{name: getattr(v, name) for name in _VIEW_FIELDS})

    @property
    def is_market(self) -> bool:
        return self.order_type in (OrderType.MARKET, OrderType.STOP_MARKET)


def _price(o: _Order) -> int:
    assert o.price is not None, "resting orders have a price"
    return o.price


class ReferenceOrderBook(OrderBook):
    """Plain lists, sorted on every access."""

    name = "reference"

    def __init__(self, spec: MarketSpec) -> None:
        self._spec = spec
        self._seq = 0
        self._last: int | None = None
        self._resting: list[_Order] = []
        self._stops: list[_Order] = []
        self._events: list[Event] = []
        self._ts = 0

    # ----------------------------------------------------------------- queries

    @property
    def spec(self) -> MarketSpec:
        return self._spec

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def last_price(self) -> int | None:
        return self._last

    def next_expiry(self) -> int | None:
        times = [
            o.expire_time
            for o in self._resting + self._stops
            if o.tif is TimeInForce.GTD and o.expire_time is not None
        ]
        return min(times, default=None)

    def _side_in_priority(self, side: Side) -> list[_Order]:
        """Resting orders of one side, best first: price, then priority."""
        orders = [o for o in self._resting if o.side is side]
        if side is Side.BUY:
            return sorted(orders, key=lambda o: (-_price(o), o.priority))
        return sorted(orders, key=lambda o: (_price(o), o.priority))

    def _levels(self, side: Side) -> list[tuple[int, int]]:
        totals: dict[int, int] = {}
        for o in self._side_in_priority(side):
            totals[_price(o)] = totals.get(_price(o), 0) + o.leaves
        return list(totals.items())  # insertion order is best first

    def l2(self, depth: int | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        bids, asks = self._levels(Side.BUY), self._levels(Side.SELL)
        if depth is not None:
            bids, asks = bids[:depth], asks[:depth]
        return bids, asks

    def level_size(self, side: Side, price: int) -> int:
        return sum(1 for o in self._resting if o.side is side and _price(o) == price)

    def l3(self) -> list[OrderView]:
        return [o.view() for s in (Side.BUY, Side.SELL) for o in self._side_in_priority(s)]

    def stops(self) -> list[OrderView]:
        return [o.view() for o in sorted(self._stops, key=lambda o: o.accepted_seq)]

    def order(self, order_id: int) -> OrderView | None:
        found = self._find(order_id)
        return None if found is None else found.view()

    def export_state(self) -> BookState:
        return BookState(
            spec=self._spec,
            seq=self._seq,
            last_price=self._last,
            resting=tuple(self.l3()),
            stops=tuple(self.stops()),
        )

    @classmethod
    def from_state(cls, state: BookState) -> Self:
        book = cls(state.spec)
        book._seq = state.seq
        book._last = state.last_price
        book._resting = [_Order.from_view(v) for v in state.resting]
        book._stops = [_Order.from_view(v) for v in state.stops]
        return book

    # ----------------------------------------------------------------- helpers

    def _find(self, order_id: int) -> _Order | None:
        for o in self._resting + self._stops:
            if o.order_id == order_id:
                return o
        return None

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _reject(self, order_id: int, account_id: int, reason: RejectReason) -> None:
        self._events.append(Rejected(self._next_seq(), self._ts, order_id, account_id, reason))

    def _cancel(self, o: _Order, reason: CancelReason, qty: int) -> None:
        """Take ``qty`` away from an order; remove it from the book when nothing is left."""
        o.qty -= qty
        o.leaves -= qty
        self._events.append(
            Cancelled(self._next_seq(), self._ts, o.order_id, o.account_id, reason, qty, o.leaves)
        )
        if o.leaves == 0:
            if o in self._resting:
                self._resting.remove(o)
            if o in self._stops:
                self._stops.remove(o)

    def _crosses(self, side: Side, price: int) -> bool:
        """Would a limit order at ``price`` meet the best opposite order?"""
        opposite = self._side_in_priority(side.opposite)
        if not opposite:
            return False
        best = _price(opposite[0])
        return price >= best if side is Side.BUY else price <= best

    @staticmethod
    def _within_bound(taker: _Order, maker_price: int) -> bool:
        if taker.price is None:  # a market order bounded by its budget only
            return True
        return maker_price <= taker.price if taker.side is Side.BUY else maker_price >= taker.price

    def _l2_map(self) -> dict[tuple[Side, int], int]:
        totals: dict[tuple[Side, int], int] = {}
        for o in self._resting:
            key = (o.side, _price(o))
            totals[key] = totals.get(key, 0) + o.leaves
        return totals

    # ----------------------------------------------------------------- commands

    def submit(self, command: Command) -> Result:
        self._events = []
        self._ts = command.ts
        before = self._l2_map()
        self._expire(command.ts)
        if isinstance(command, PlaceOrder):
            self._place(command)
        elif isinstance(command, CancelOrder):
            self._cancel_order(command)
        elif isinstance(command, AmendOrder):
            self._amend(command)
        elif isinstance(command, MassCancel):
            self._mass_cancel(command)
        elif isinstance(command, MarkStatus):
            self._events.append(StatusMarked(self._next_seq(), self._ts))
            if command.cancel_all:
                for o in sorted(self._resting + self._stops, key=lambda o: o.accepted_seq):
                    self._cancel(o, CancelReason.CLOSED, o.leaves)
        elif not isinstance(command, Expire):  # pragma: no cover - the type checker rules this out
            raise TypeError(f"not a command: {command!r}")
        after = self._l2_map()
        changed = [k for k in set(before) | set(after) if before.get(k, 0) != after.get(k, 0)]
        changed.sort(key=lambda k: (0, -k[1]) if k[0] is Side.BUY else (1, k[1]))
        for side, price in changed:
            self._events.append(
                LevelChanged(self._next_seq(), self._ts, side, price, after.get((side, price), 0))
            )
        return Result(self._events)

    def _expire(self, ts: int) -> None:
        due = [
            o
            for o in self._resting + self._stops
            if o.tif is TimeInForce.GTD and o.expire_time is not None and o.expire_time <= ts
        ]
        due.sort(key=lambda o: (o.expire_time, o.accepted_seq))
        for o in due:
            self._cancel(o, CancelReason.EXPIRED, o.leaves)

    def _place(self, cmd: PlaceOrder) -> None:
        reason = validate_place(self._spec, cmd)
        if reason is None and self._find(cmd.order_id) is not None:
            reason = RejectReason.DUPLICATE_ORDER_ID
        if reason is None and cmd.post_only:
            assert cmd.price is not None
            if self._crosses(cmd.side, cmd.price):
                reason = RejectReason.POST_ONLY_WOULD_TAKE
        if reason is not None:
            self._reject(cmd.order_id, cmd.account_id, reason)
            return
        seq = self._next_seq()
        self._events.append(
            Accepted(
                seq,
                cmd.ts,
                cmd.order_id,
                cmd.account_id,
                cmd.side,
                cmd.order_type,
                cmd.price,
                cmd.stop_price,
                cmd.qty,
            )
        )
        order = _Order(
            order_id=cmd.order_id,
            account_id=cmd.account_id,
            side=cmd.side,
            order_type=cmd.order_type,
            price=cmd.price,
            stop_price=cmd.stop_price,
            qty=cmd.qty,
            leaves=cmd.qty,
            tif=cmd.tif,
            expire_time=cmd.expire_time,
            post_only=cmd.post_only,
            stp=cmd.stp,
            quote_budget=cmd.quote_budget,
            accepted_seq=seq,
            priority=seq,
        )
        if cmd.order_type in (OrderType.STOP_LIMIT, OrderType.STOP_MARKET):
            self._stops.append(order)
        else:
            self._execute(order)
        self._run_stops()

    def _cancel_order(self, cmd: CancelOrder) -> None:
        order = self._find(cmd.order_id)
        if order is None or order.account_id != cmd.account_id:
            self._reject(cmd.order_id, cmd.account_id, RejectReason.UNKNOWN_ORDER)
            return
        self._cancel(order, CancelReason.USER, order.leaves)

    def _amend(self, cmd: AmendOrder) -> None:
        reason = validate_amend(cmd)
        order = None
        if reason is None:
            order = self._find(cmd.order_id)
            if order is None or order.account_id != cmd.account_id:
                reason = RejectReason.UNKNOWN_ORDER
            elif order in self._stops:
                reason = RejectReason.ORDER_NOT_AMENDABLE
        if reason is not None or order is None:
            self._reject(cmd.order_id, cmd.account_id, reason or RejectReason.UNKNOWN_ORDER)
            return
        old_price = _price(order)
        new_price = old_price if cmd.price is None else cmd.price
        new_qty = order.qty if cmd.qty is None else cmd.qty
        filled = order.qty - order.leaves
        reason = check_amend_size(self._spec, new_price, new_qty)
        if reason is None and new_qty <= filled:
            reason = RejectReason.AMEND_QTY_TOO_LOW
        if (
            reason is None
            and new_price != old_price
            and order.post_only
            and self._crosses(order.side, new_price)
        ):
            reason = RejectReason.POST_ONLY_WOULD_TAKE
        if reason is not None:
            self._reject(cmd.order_id, cmd.account_id, reason)
            return

        keeps_priority = new_price == old_price and new_qty <= order.qty
        order.qty = new_qty
        order.leaves = new_qty - filled
        seq = self._next_seq()
        self._events.append(
            Amended(
                seq,
                cmd.ts,
                order.order_id,
                order.account_id,
                new_price,
                new_qty,
                order.leaves,
                keeps_priority,
            )
        )
        if keeps_priority:
            return
        order.priority = seq
        if new_price == old_price:
            return  # same level, back of the queue: nothing can cross
        # A new price: out of the book and in again like a new limit order.
        self._resting.remove(order)
        order.price = new_price
        self._execute(order)
        self._run_stops()

    def _mass_cancel(self, cmd: MassCancel) -> None:
        mine = [
            o
            for o in self._resting + self._stops
            if o.account_id == cmd.account_id and (cmd.side is None or o.side is cmd.side)
        ]
        for o in sorted(mine, key=lambda o: o.accepted_seq):
            self._cancel(o, CancelReason.MASS_CANCEL, o.leaves)

    # ----------------------------------------------------------------- matching

    def _execute(self, order: _Order) -> None:
        """Run an active (non-pending) order: FOK check, match, then its remainder."""
        if order.tif is TimeInForce.FOK and not self._fillable(order):
            self._cancel(order, CancelReason.FOK_UNFILLED, order.leaves)
            return
        self._match(order)
        if order.leaves == 0:
            return
        if order.is_market:
            self._cancel(order, CancelReason.MARKET_UNFILLED, order.leaves)
        elif order.tif is TimeInForce.IOC:
            self._cancel(order, CancelReason.IOC_REMAINDER, order.leaves)
        elif order.tif is TimeInForce.FOK:  # pragma: no cover - _fillable said it fills
            self._cancel(order, CancelReason.FOK_UNFILLED, order.leaves)
        else:
            self._resting.append(order)

    def _fillable(self, taker: _Order) -> bool:
        """Would matching fill the whole order? Walks the book as ``_match`` would."""
        need = taker.leaves
        budget = taker.quote_budget
        for maker in self._side_in_priority(taker.side.opposite):
            price = _price(maker)
            if not self._within_bound(taker, price):
                return False
            if budget is not None and budget // price == 0:
                return False
            if maker.account_id == taker.account_id:
                if taker.stp is StpMode.CANCEL_OLDEST:
                    continue
                return False
            qty = min(need, maker.leaves)
            if budget is not None:
                qty = min(qty, budget // price)
                budget -= qty * price
            need -= qty
            if need == 0:
                return True
        return False

    def _match(self, taker: _Order) -> None:
        budget = taker.quote_budget
        while taker.leaves > 0:
            queue = self._side_in_priority(taker.side.opposite)
            if not queue:
                return
            maker = queue[0]
            price = _price(maker)
            if not self._within_bound(taker, price):
                return
            if budget is not None and budget // price == 0:
                return
            if maker.account_id == taker.account_id:
                mode = taker.stp
                if mode is StpMode.CANCEL_NEWEST:
                    self._cancel(taker, CancelReason.STP, taker.leaves)
                elif mode is StpMode.CANCEL_OLDEST:
                    self._cancel(maker, CancelReason.STP, maker.leaves)
                elif mode is StpMode.CANCEL_BOTH:
                    self._cancel(maker, CancelReason.STP, maker.leaves)
                    self._cancel(taker, CancelReason.STP, taker.leaves)
                else:
                    both = min(maker.leaves, taker.leaves)
                    self._cancel(maker, CancelReason.STP, both)
                    self._cancel(taker, CancelReason.STP, both)
                continue
            qty = min(taker.leaves, maker.leaves)
            if budget is not None:
                qty = min(qty, budget // price)
                budget -= qty * price
            maker.leaves -= qty
            taker.leaves -= qty
            self._last = price
            self._events.append(
                Trade(
                    self._seq + 1,
                    self._ts,
                    self._seq + 1,
                    price,
                    qty,
                    taker.side,
                    maker.order_id,
                    taker.order_id,
                    maker.account_id,
                    taker.account_id,
                    maker.leaves,
                    taker.leaves,
                )
            )
            self._seq += 1
            if maker.leaves == 0:
                self._resting.remove(maker)

    def _triggered(self, stop: _Order) -> bool:
        last = self._last
        assert stop.stop_price is not None
        if last is None:
            return False
        return last >= stop.stop_price if stop.side is Side.BUY else last <= stop.stop_price

    def _run_stops(self) -> None:
        queue: list[tuple[_Order, int]] = []
        while True:
            fired = [s for s in self._stops if self._triggered(s)]
            fired.sort(key=lambda s: s.accepted_seq)
            for stop in fired:
                self._stops.remove(stop)
                assert self._last is not None
                queue.append((stop, self._last))
            if not queue:
                return
            stop, last = queue.pop(0)
            assert stop.stop_price is not None
            seq = self._next_seq()
            self._events.append(
                Triggered(seq, self._ts, stop.order_id, stop.account_id, stop.stop_price, last)
            )
            stop.priority = seq
            self._execute(stop)
