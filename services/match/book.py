"""The fast book.

Layout, per side: ``dict price -> _Level`` and a sorted list of keys with the best
price last (bids keyed by price, asks by ``-price``), so the best level is
``keys[-1]`` and emptying it is ``keys.pop()``. A level is a doubly linked list
of ``_Order`` objects (FIFO = priority) with a running total and count (an L2
change carries the level's order count: walking the list for it made every
place on a deep level cost O(depth)); ``order id ->
_Order`` and ``account -> {order id: _Order}`` dicts give O(1) cancel, amend and
mass cancel. Pending stops sit in two lists sorted by ``(stop_price,
accepted_seq)`` (buy stops fire from the front, sell stops from the back); GTD
orders in a heap by ``(expire_time, accepted_seq)`` with lazy deletion.

L2 changes are tracked by marking each level touched during a command with the
command's number and its total before; at the end the touched levels whose total
differs are reported (bids then asks, best first), and emptied levels dropped.
Emptied levels stay in the price dict until then, so a level emptied and refilled
within one command is one object.

The rules are ``domain``'s; ``reference_book`` is the slow statement of them and
the contract and property tests hold this book to it.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections import deque
from typing import Any, Self

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
    book_document,
    validate_place,
)

__all__ = ["FastOrderBook"]


def _row(o: _Order) -> list[Any]:
    """An order as a snapshot row: `_encode_order(o.view())`, without the view."""
    return [
        o.oid, o.acct, o.side.value, o.otype.value, o.price, o.stop, o.qty, o.leaves,
        o.tif.value, o.expire, o.post_only, o.stp.value, o.budget, o.aseq, o.prio,
    ]  # fmt: skip


_BUY = Side.BUY
_SELL = Side.SELL
_LIMIT = OrderType.LIMIT
_MARKET = OrderType.MARKET
_STOP_LIMIT = OrderType.STOP_LIMIT
_STOP_MARKET = OrderType.STOP_MARKET
_GTC = TimeInForce.GTC
_IOC = TimeInForce.IOC
_FOK = TimeInForce.FOK
_GTD = TimeInForce.GTD
_NEWEST = StpMode.CANCEL_NEWEST
_OLDEST = StpMode.CANCEL_OLDEST
_BOTH = StpMode.CANCEL_BOTH
_R_USER = CancelReason.USER
_R_IOC = CancelReason.IOC_REMAINDER
_R_FOK = CancelReason.FOK_UNFILLED
_R_MARKET = CancelReason.MARKET_UNFILLED
_R_STP = CancelReason.STP
_R_EXPIRED = CancelReason.EXPIRED
_R_MASS = CancelReason.MASS_CANCEL
_NO_BOUND = float("-inf")


class _Order:
    __slots__ = (
        "acct",
        "aseq",
        "budget",
        "expire",
        "is_buy",
        "is_market",
        "leaves",
        "level",
        "live",
        "next",
        "oid",
        "otype",
        "post_only",
        "prev",
        "price",
        "prio",
        "qty",
        "side",
        "stop",
        "stp",
        "tif",
    )

    def __init__(
        self,
        oid: int,
        acct: int,
        side: Side,
        otype: OrderType,
        price: int | None,
        stop: int | None,
        qty: int,
        leaves: int,
        tif: TimeInForce,
        expire: int | None,
        post_only: bool,
        stp: StpMode,
        budget: int | None,
        aseq: int,
        prio: int,
    ) -> None:
        self.oid = oid
        self.acct = acct
        self.side = side
        self.is_buy = side is _BUY
        self.otype = otype
        self.is_market = otype is _MARKET or otype is _STOP_MARKET
        self.price = price
        self.stop = stop
        self.qty = qty
        self.leaves = leaves
        self.tif = tif
        self.expire = expire
        self.post_only = post_only
        self.stp = stp
        self.budget = budget
        self.aseq = aseq
        self.prio = prio
        self.prev: _Order | None = None
        self.next: _Order | None = None
        self.level: _Level | None = None
        self.live = False  # in the id and account dicts (resting, pending, or re-entering)

    def view(self) -> OrderView:
        return OrderView(
            self.oid,
            self.acct,
            self.side,
            self.otype,
            self.price,
            self.stop,
            self.qty,
            self.leaves,
            self.tif,
            self.expire,
            self.post_only,
            self.stp,
            self.budget,
            self.aseq,
            self.prio,
        )


class _Level:
    __slots__ = ("count", "head", "mark", "orig", "price", "side", "sort_key", "tail", "total")

    def __init__(self, price: int, side: Side) -> None:
        self.price = price
        self.side = side
        self.total = 0
        self.count = 0  # resting orders in the list
        self.head: _Order | None = None
        self.tail: _Order | None = None
        self.mark = -1  # number of the command that last touched this level
        self.orig = 0  # total before that command
        # L2 report order: bids (negative keys) best first, then asks best first
        self.sort_key = -price if side is _BUY else price


def _level_key(level: _Level) -> int:
    return level.sort_key


class FastOrderBook(OrderBook):
    """Price levels in dicts plus sorted key lists, FIFO linked lists per level."""

    __slots__ = (
        "_accounts",
        "_ask_keys",
        "_asks",
        "_bid_keys",
        "_bids",
        "_buy_stops",
        "_cmd",
        "_events",
        "_gtd",
        "_last",
        "_max_qty",
        "_min_notional",
        "_min_qty",
        "_orders",
        "_sell_stops",
        "_seq",
        "_spec",
        "_touched",
        "_ts",
    )

    name = "fast"

    def __init__(self, spec: MarketSpec) -> None:
        self._spec = spec
        self._min_qty = spec.min_qty
        self._max_qty = spec.max_qty
        self._min_notional = spec.min_notional
        self._seq = 0
        self._last: int | None = None
        self._bids: dict[int, _Level] = {}
        self._asks: dict[int, _Level] = {}
        self._bid_keys: list[int] = []  # prices ascending: best bid last
        self._ask_keys: list[int] = []  # -prices ascending: best ask last
        self._orders: dict[int, _Order] = {}
        self._accounts: dict[int, dict[int, _Order]] = {}
        self._buy_stops: list[tuple[int, int, _Order]] = []
        self._sell_stops: list[tuple[int, int, _Order]] = []
        self._gtd: list[tuple[int, int, _Order]] = []
        self._cmd = 0
        self._touched: list[_Level] = []
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
        gtd = self._gtd
        while gtd and not gtd[0][2].live:  # lazy deletion: drop dead orders' entries
            heapq.heappop(gtd)
        return gtd[0][0] if gtd else None

    def _side_levels(self, side: Side, depth: int | None = None) -> list[_Level]:
        keys = self._bid_keys if side is _BUY else self._ask_keys
        best_first = keys[::-1] if depth is None else keys[: -depth - 1 : -1]
        if side is _BUY:
            return [self._bids[k] for k in best_first]
        return [self._asks[-k] for k in best_first]

    def l2(self, depth: int | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        bids = [(lvl.price, lvl.total) for lvl in self._side_levels(_BUY, depth)]
        asks = [(lvl.price, lvl.total) for lvl in self._side_levels(_SELL, depth)]
        return bids, asks

    def level_size(self, side: Side, price: int) -> int:
        lvl = (self._bids if side is _BUY else self._asks).get(price)
        return 0 if lvl is None else lvl.count

    def l3(self) -> list[OrderView]:
        views: list[OrderView] = []
        for side in (_BUY, _SELL):
            for lvl in self._side_levels(side):
                o = lvl.head
                while o is not None:
                    views.append(o.view())
                    o = o.next
        return views

    def stops(self) -> list[OrderView]:
        pending = [e[2] for e in self._buy_stops] + [e[2] for e in self._sell_stops]
        pending.sort(key=lambda o: o.aseq)
        return [o.view() for o in pending]

    def order(self, order_id: int) -> OrderView | None:
        o = self._orders.get(order_id)
        return None if o is None else o.view()

    def export_state(self) -> BookState:
        return BookState(self._spec, self._seq, self._last, tuple(self.l3()), tuple(self.stops()))

    def document(self) -> dict[str, Any]:
        """`state_document(self.export_state())` without a view per order: a deep book's
        snapshot is taken inside the writer's batch."""
        resting: list[list[Any]] = []
        for side in (_BUY, _SELL):
            for lvl in self._side_levels(side):
                o = lvl.head
                while o is not None:
                    resting.append(_row(o))
                    o = o.next
        pending = [e[2] for e in self._buy_stops] + [e[2] for e in self._sell_stops]
        pending.sort(key=lambda o: o.aseq)
        return book_document(self._spec, self._seq, self._last, resting, [_row(o) for o in pending])

    @classmethod
    def from_state(cls, state: BookState) -> Self:
        book = cls(state.spec)
        book._seq = state.seq
        book._last = state.last_price
        for v, pending in [(v, False) for v in state.resting] + [(v, True) for v in state.stops]:
            o = _Order(
                v.order_id,
                v.account_id,
                v.side,
                v.order_type,
                v.price,
                v.stop_price,
                v.qty,
                v.leaves,
                v.tif,
                v.expire_time,
                v.post_only,
                v.stp,
                v.quote_budget,
                v.accepted_seq,
                v.priority,
            )
            if pending:
                book._add_stop(o)
            else:
                book._rest(o)
            if o.tif is _GTD and o.expire is not None:
                heapq.heappush(book._gtd, (o.expire, o.aseq, o))
        book._touched.clear()
        return book

    # ----------------------------------------------------------------- structure

    def _add_live(self, o: _Order) -> None:
        self._orders[o.oid] = o
        mine = self._accounts.get(o.acct)
        if mine is None:
            self._accounts[o.acct] = {o.oid: o}
        else:
            mine[o.oid] = o
        o.live = True

    def _drop_live(self, o: _Order) -> None:
        del self._orders[o.oid]
        mine = self._accounts[o.acct]
        del mine[o.oid]
        if not mine:
            del self._accounts[o.acct]
        o.live = False

    def _rest(self, o: _Order) -> None:
        """Append an order at the back of its price level."""
        price = o.price
        assert price is not None
        if o.is_buy:
            levels, keys, key = self._bids, self._bid_keys, price
        else:
            levels, keys, key = self._asks, self._ask_keys, -price
        lvl = levels.get(price)
        if lvl is None:
            lvl = levels[price] = _Level(price, o.side)
            insort(keys, key)
        elif lvl.head is None:
            insort(keys, key)
        if lvl.mark != self._cmd:
            lvl.mark = self._cmd
            lvl.orig = lvl.total
            self._touched.append(lvl)
        tail = lvl.tail
        o.prev = tail
        o.next = None
        if tail is None:
            lvl.head = o
        else:
            tail.next = o
        lvl.tail = o
        lvl.total += o.leaves
        lvl.count += 1
        o.level = lvl
        if not o.live:
            self._add_live(o)

    def _unlink(self, o: _Order) -> None:
        """Take a resting order out of its level (it stays live)."""
        lvl = o.level
        assert lvl is not None
        if lvl.mark != self._cmd:
            lvl.mark = self._cmd
            lvl.orig = lvl.total
            self._touched.append(lvl)
        lvl.total -= o.leaves
        lvl.count -= 1
        prev, nxt = o.prev, o.next
        if prev is None:
            lvl.head = nxt
        else:
            prev.next = nxt
        if nxt is None:
            lvl.tail = prev
        else:
            nxt.prev = prev
        o.prev = o.next = None
        o.level = None
        if lvl.head is None:
            if o.is_buy:
                keys, key = self._bid_keys, lvl.price
            else:
                keys, key = self._ask_keys, -lvl.price
            del keys[bisect_left(keys, key)]

    def _add_stop(self, o: _Order) -> None:
        assert o.stop is not None
        insort(self._buy_stops if o.is_buy else self._sell_stops, (o.stop, o.aseq, o))
        if not o.live:
            self._add_live(o)

    def _remove_stop(self, o: _Order) -> None:
        assert o.stop is not None
        stops = self._buy_stops if o.is_buy else self._sell_stops
        del stops[bisect_left(stops, (o.stop, o.aseq))]

    def _emit_cancel(self, o: _Order, reason: CancelReason, qty: int) -> None:
        o.qty -= qty
        o.leaves -= qty
        self._seq += 1
        self._events.append(Cancelled(self._seq, self._ts, o.oid, o.acct, reason, qty, o.leaves))

    def _cancel_live(self, o: _Order, reason: CancelReason) -> None:
        """Cancel all of a live order that is resting or pending."""
        if o.level is not None:
            self._unlink(o)
        else:
            self._remove_stop(o)
        self._drop_live(o)
        self._emit_cancel(o, reason, o.leaves)

    def _reject(self, order_id: int, account_id: int, reason: RejectReason) -> None:
        self._seq += 1
        self._events.append(Rejected(self._seq, self._ts, order_id, account_id, reason))

    # ----------------------------------------------------------------- commands

    def submit(self, command: Command) -> Result:
        events: list[Event] = []
        self._events = events
        ts = self._ts = command.ts
        self._cmd += 1
        gtd = self._gtd
        if gtd and gtd[0][0] <= ts:
            self._expire(ts)
        kind = type(command)
        if kind is AmendOrder:
            self._amend(command)  # type: ignore[arg-type]
        elif kind is PlaceOrder:
            self._place(command)  # type: ignore[arg-type]
        elif kind is CancelOrder:
            self._cancel_order(command)  # type: ignore[arg-type]
        elif kind is MassCancel:
            self._mass_cancel(command)  # type: ignore[arg-type]
        elif kind is MarkStatus:
            self._mark_status(command)  # type: ignore[arg-type]
        elif kind is not Expire:
            raise TypeError(f"not a command: {command!r}")
        if self._touched:
            self._flush_levels()
        return Result(events)

    def _flush_levels(self) -> None:
        touched = self._touched
        n = len(touched)
        if n == 2:
            a, b = touched
            if b.sort_key < a.sort_key:
                touched.reverse()
        elif n > 2:
            touched.sort(key=_level_key)
        events = self._events
        ts = self._ts
        seq = self._seq
        for lvl in touched:
            total = lvl.total
            if total != lvl.orig:
                seq += 1
                events.append(LevelChanged(seq, ts, lvl.side, lvl.price, total))
            if total == 0:
                levels = self._bids if lvl.side is _BUY else self._asks
                if levels.get(lvl.price) is lvl:
                    del levels[lvl.price]
        self._seq = seq
        touched.clear()

    def _expire(self, ts: int) -> None:
        gtd = self._gtd
        while gtd and gtd[0][0] <= ts:
            o = heapq.heappop(gtd)[2]
            if o.live:
                self._cancel_live(o, _R_EXPIRED)
        if len(gtd) > 2 * len(self._orders) + 1024:  # shed entries of dead orders
            self._gtd = [e for e in gtd if e[2].live]
            heapq.heapify(self._gtd)

    def _crosses(self, is_buy: bool, price: int) -> bool:
        if is_buy:
            keys = self._ask_keys
            return bool(keys) and -keys[-1] <= price
        keys = self._bid_keys
        return bool(keys) and keys[-1] >= price

    def _place(self, cmd: PlaceOrder) -> None:
        reason = validate_place(self._spec, cmd)
        if reason is None:
            if cmd.order_id in self._orders:
                reason = RejectReason.DUPLICATE_ORDER_ID
            elif cmd.post_only and self._crosses(cmd.side is _BUY, cmd.price):  # type: ignore[arg-type]
                reason = RejectReason.POST_ONLY_WOULD_TAKE
        if reason is not None:
            self._reject(cmd.order_id, cmd.account_id, reason)
            return
        self._seq = seq = self._seq + 1
        otype = cmd.order_type
        self._events.append(
            Accepted(
                seq,
                cmd.ts,
                cmd.order_id,
                cmd.account_id,
                cmd.side,
                otype,
                cmd.price,
                cmd.stop_price,
                cmd.qty,
            )
        )
        o = _Order(
            cmd.order_id,
            cmd.account_id,
            cmd.side,
            otype,
            cmd.price,
            cmd.stop_price,
            cmd.qty,
            cmd.qty,
            cmd.tif,
            cmd.expire_time,
            cmd.post_only,
            cmd.stp,
            cmd.quote_budget,
            seq,
            seq,
        )
        last = self._last
        if otype is _LIMIT or otype is _MARKET:
            self._execute(o)
        else:
            self._add_stop(o)
            last = None  # a new stop may fire at once
        if o.live and o.tif is _GTD:
            assert o.expire is not None
            heapq.heappush(self._gtd, (o.expire, o.aseq, o))
        if self._last != last or last is None:
            self._run_stops()

    def _cancel_order(self, cmd: CancelOrder) -> None:
        o = self._orders.get(cmd.order_id)
        if o is None or o.acct != cmd.account_id:
            self._reject(cmd.order_id, cmd.account_id, RejectReason.UNKNOWN_ORDER)
            return
        self._cancel_live(o, _R_USER)

    def _mass_cancel(self, cmd: MassCancel) -> None:
        mine = self._accounts.get(cmd.account_id)
        if not mine:
            return
        side = cmd.side
        doomed = [o for o in mine.values() if side is None or o.side is side]
        doomed.sort(key=lambda o: o.aseq)
        for o in doomed:
            self._cancel_live(o, _R_MASS)

    def _mark_status(self, cmd: MarkStatus) -> None:
        self._seq += 1
        self._events.append(StatusMarked(self._seq, self._ts))
        if cmd.cancel_all:
            doomed = [o for mine in self._accounts.values() for o in mine.values()]
            doomed.sort(key=lambda o: o.aseq)
            for o in doomed:
                self._cancel_live(o, CancelReason.CLOSED)

    # Over ruff's complexity limit on purpose: the fast book's amend, inline for speed; the
    # reference book states it simply and the contract tests hold the two equal.
    def _amend(self, cmd: AmendOrder) -> None:  # noqa: C901
        price = cmd.price
        qty = cmd.qty
        reason: RejectReason | None = None
        o = None
        if price is None and qty is None:
            reason = RejectReason.INVALID_AMEND
        elif qty is not None and qty <= 0:
            reason = RejectReason.INVALID_QUANTITY
        elif price is not None and price <= 0:
            reason = RejectReason.INVALID_PRICE
        else:
            o = self._orders.get(cmd.order_id)
            if o is None or o.acct != cmd.account_id:
                reason = RejectReason.UNKNOWN_ORDER
            elif o.level is None:
                reason = RejectReason.ORDER_NOT_AMENDABLE
        if reason is not None or o is None:
            self._reject(cmd.order_id, cmd.account_id, reason or RejectReason.UNKNOWN_ORDER)
            return
        old_price = o.price
        assert old_price is not None
        new_price = old_price if price is None else price
        new_qty = o.qty if qty is None else qty
        filled = o.qty - o.leaves
        if new_qty < self._min_qty:
            reason = RejectReason.QUANTITY_BELOW_MIN
        elif new_qty > self._max_qty:
            reason = RejectReason.QUANTITY_ABOVE_MAX
        elif new_price * new_qty < self._min_notional:
            reason = RejectReason.NOTIONAL_BELOW_MIN
        elif new_qty <= filled:
            reason = RejectReason.AMEND_QTY_TOO_LOW
        elif new_price != old_price and o.post_only and self._crosses(o.is_buy, new_price):
            reason = RejectReason.POST_ONLY_WOULD_TAKE
        if reason is not None:
            self._reject(cmd.order_id, cmd.account_id, reason)
            return

        lvl = o.level
        assert lvl is not None
        new_leaves = new_qty - filled
        if new_price == old_price:
            delta = new_leaves - o.leaves
            if delta:
                if lvl.mark != self._cmd:
                    lvl.mark = self._cmd
                    lvl.orig = lvl.total
                    self._touched.append(lvl)
                lvl.total += delta
                o.leaves = new_leaves
            kept = new_qty <= o.qty
            o.qty = new_qty
            self._seq = seq = self._seq + 1
            self._events.append(
                Amended(seq, cmd.ts, o.oid, o.acct, new_price, new_qty, new_leaves, kept)
            )
            if not kept:
                o.prio = seq
                if lvl.tail is not o:  # to the back of the queue
                    prev, nxt = o.prev, o.next
                    if prev is None:
                        lvl.head = nxt
                    else:
                        prev.next = nxt
                    assert nxt is not None
                    nxt.prev = prev
                    tail = lvl.tail
                    assert tail is not None
                    tail.next = o
                    o.prev = tail
                    o.next = None
                    lvl.tail = o
            return

        # A new price: out of the old level, in again like a new limit order.
        # (``_unlink`` and ``_rest`` inlined: this is the busiest path of all.)
        cmd_no = self._cmd
        touched = self._touched
        if lvl.mark != cmd_no:
            lvl.mark = cmd_no
            lvl.orig = lvl.total
            touched.append(lvl)
        lvl.total -= o.leaves
        lvl.count -= 1
        prev, nxt = o.prev, o.next
        if prev is None:
            lvl.head = nxt
        else:
            prev.next = nxt
        if nxt is None:
            lvl.tail = prev
        else:
            nxt.prev = prev
        is_buy = o.is_buy
        if is_buy:
            levels, keys, other, old_key, new_key = (
                self._bids,
                self._bid_keys,
                self._ask_keys,
                old_price,
                new_price,
            )
            crosses = bool(other) and -other[-1] <= new_price
        else:
            levels, keys, other, old_key, new_key = (
                self._asks,
                self._ask_keys,
                self._bid_keys,
                -old_price,
                -new_price,
            )
            crosses = bool(other) and other[-1] >= new_price
        if lvl.head is None:
            del keys[bisect_left(keys, old_key)]
        o.price = new_price
        o.qty = new_qty
        o.leaves = new_leaves
        self._seq = seq = self._seq + 1
        o.prio = seq
        self._events.append(
            Amended(seq, cmd.ts, o.oid, o.acct, new_price, new_qty, new_leaves, False)
        )
        if crosses:
            o.prev = o.next = None
            o.level = None
            last = self._last
            self._execute(o)
            if self._last != last:
                self._run_stops()
            return
        lvl = levels.get(new_price)
        if lvl is None:
            lvl = levels[new_price] = _Level(new_price, o.side)
            insort(keys, new_key)
        elif lvl.head is None:
            insort(keys, new_key)
        if lvl.mark != cmd_no:
            lvl.mark = cmd_no
            lvl.orig = lvl.total
            touched.append(lvl)
        tail = lvl.tail
        o.prev = tail
        o.next = None
        if tail is None:
            lvl.head = o
        else:
            tail.next = o
        lvl.tail = o
        lvl.total += new_leaves
        lvl.count += 1
        o.level = lvl

    # ----------------------------------------------------------------- matching

    def _execute(self, o: _Order) -> None:
        """Run an active order: FOK check, match, then its remainder."""
        tif = o.tif
        if tif is _FOK and not self._fillable(o):
            self._emit_cancel(o, _R_FOK, o.leaves)
        else:
            self._match(o)
            if o.leaves:
                if o.is_market:
                    self._emit_cancel(o, _R_MARKET, o.leaves)
                elif tif is _IOC:
                    self._emit_cancel(o, _R_IOC, o.leaves)
                elif tif is _FOK:  # pragma: no cover - _fillable said it fills
                    self._emit_cancel(o, _R_FOK, o.leaves)
                else:
                    self._rest(o)
                    return
        if o.live:
            self._drop_live(o)

    def _fillable(self, t: _Order) -> bool:
        """Would matching fill the whole order? Walks the book as ``_match`` would."""
        need = t.leaves
        budget = t.budget
        acct = t.acct
        skip_own = t.stp is _OLDEST
        if t.is_buy:
            levels, keys = self._asks, self._ask_keys
            bound = _NO_BOUND if t.price is None else -t.price
            sign = -1
        else:
            levels, keys = self._bids, self._bid_keys
            bound = _NO_BOUND if t.price is None else t.price
            sign = 1
        for i in range(len(keys) - 1, -1, -1):
            k = keys[i]
            if k < bound:
                return False
            lvl = levels[sign * k]
            price = lvl.price
            m = lvl.head
            while m is not None:
                if budget is not None and budget < price:
                    return False
                if m.acct == acct:
                    if not skip_own:
                        return False
                    m = m.next
                    continue
                q = need if need < m.leaves else m.leaves
                if budget is not None:
                    cap = budget // price
                    if cap < q:
                        q = cap
                    budget -= q * price
                need -= q
                if need == 0:
                    return True
                m = m.next
        return False

    # Over ruff's complexity limit on purpose: the fast book's matching loop, inline for speed;
    # the reference book states it simply.
    def _match(self, t: _Order) -> None:  # noqa: C901
        """Trade an incoming order against the other side while it can."""
        if t.is_buy:
            levels, keys = self._asks, self._ask_keys
            bound = _NO_BOUND if t.price is None else -t.price
            sign = -1
        else:
            levels, keys = self._bids, self._bid_keys
            bound = _NO_BOUND if t.price is None else t.price
            sign = 1
        budget = t.budget
        acct = t.acct
        tid = t.oid
        aggressor = t.side
        events = self._events
        ts = self._ts
        cmd = self._cmd
        touched = self._touched
        orders = self._orders
        accounts = self._accounts
        last = None
        going = True
        while going and keys:
            k = keys[-1]
            if k < bound:
                break
            lvl = levels[sign * k]
            price = lvl.price
            if budget is not None and budget < price:
                break
            if lvl.mark != cmd:
                lvl.mark = cmd
                lvl.orig = lvl.total
                touched.append(lvl)
            m = lvl.head
            while m is not None:
                if m.acct == acct:
                    going = self._self_trade(t, m, lvl)
                    if not going:
                        break
                    m = lvl.head
                    continue
                mleft = m.leaves
                tleft = t.leaves
                q = tleft if tleft < mleft else mleft
                if budget is not None:
                    cap = budget // price
                    if cap < q:
                        q = cap
                    budget -= q * price
                mleft -= q
                tleft -= q
                m.leaves = mleft
                t.leaves = tleft
                lvl.total -= q
                self._seq = seq = self._seq + 1
                events.append(
                    Trade(seq, ts, seq, price, q, aggressor, m.oid, tid, m.acct, acct, mleft, tleft)
                )
                last = price
                if mleft == 0:
                    lvl.count -= 1
                    nxt = m.next
                    lvl.head = nxt
                    if nxt is None:
                        lvl.tail = None
                    else:
                        nxt.prev = None
                    m.next = None
                    m.level = None
                    m.live = False
                    del orders[m.oid]
                    mine = accounts[m.acct]
                    del mine[m.oid]
                    if not mine:
                        del accounts[m.acct]
                    m = nxt
                if tleft == 0 or (budget is not None and budget < price):
                    going = False
                    break
            if lvl.head is None:
                keys.pop()
        if last is not None:
            self._last = last

    def _self_trade(self, t: _Order, m: _Order, lvl: _Level) -> bool:
        """Apply the taker's STP mode against maker ``m`` (the head of ``lvl``).
        Returns whether the taker goes on matching."""
        mode = t.stp
        if mode is _NEWEST:
            self._emit_cancel(t, _R_STP, t.leaves)
            return False
        if mode is _OLDEST or mode is _BOTH:
            self._cancel_head(m, lvl, m.leaves)
            if mode is _BOTH:
                self._emit_cancel(t, _R_STP, t.leaves)
                return False
            return True
        both = m.leaves if m.leaves < t.leaves else t.leaves
        self._cancel_head(m, lvl, both)
        self._emit_cancel(t, _R_STP, both)
        return t.leaves > 0

    def _cancel_head(self, m: _Order, lvl: _Level, qty: int) -> None:
        """STP-cancel ``qty`` of the level's head order; the caller fixes the keys."""
        lvl.total -= qty
        self._emit_cancel(m, _R_STP, qty)
        if m.leaves == 0:
            lvl.count -= 1
            nxt = m.next
            lvl.head = nxt
            if nxt is None:
                lvl.tail = None
            else:
                nxt.prev = None
            m.next = None
            m.level = None
            self._drop_live(m)

    def _run_stops(self) -> None:
        last = self._last
        if last is None:
            return
        buys = self._buy_stops
        sells = self._sell_stops
        if not ((buys and buys[0][0] <= last) or (sells and sells[-1][0] >= last)):
            return
        queue: deque[tuple[_Order, int]] = deque()
        while True:
            last = self._last
            assert last is not None
            fired: list[_Order] = []
            n = 0
            while n < len(buys) and buys[n][0] <= last:
                fired.append(buys[n][2])
                n += 1
            if n:
                del buys[:n]
            while sells and sells[-1][0] >= last:
                fired.append(sells.pop()[2])
            if fired:
                fired.sort(key=lambda o: o.aseq)
                queue.extend((o, last) for o in fired)
            if not queue:
                return
            o, when = queue.popleft()
            assert o.stop is not None
            self._seq = seq = self._seq + 1
            o.prio = seq
            self._events.append(Triggered(seq, self._ts, o.oid, o.acct, o.stop, when))
            self._execute(o)
