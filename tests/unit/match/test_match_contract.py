"""The order book contract: explicit scenarios, each run against both books."""

from __future__ import annotations

import re
from typing import Any

import pytest

from services.match import (
    Accepted,
    Amended,
    AmendOrder,
    Cancelled,
    CancelOrder,
    CancelReason,
    Event,
    Expire,
    FastOrderBook,
    LevelChanged,
    MarketSpec,
    MarkStatus,
    MassCancel,
    OrderBook,
    OrderType,
    PlaceOrder,
    ReferenceOrderBook,
    Rejected,
    RejectReason,
    Side,
    StatusMarked,
    StpMode,
    TimeInForce,
    Trade,
    Triggered,
)
from tests.unit.match.match_support import BOOKS, SPEC, Driver

BUY, SELL = Side.BUY, Side.SELL


def of(events: list[Event], kind: type[Any]) -> list[Any]:
    return [e for e in events if type(e) is kind]


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def trades(events: list[Event]) -> list[tuple[int, int, int, int]]:
    """(maker, taker, price, qty) of each trade."""
    return [(t.maker_order_id, t.taker_order_id, t.price, t.qty) for t in of(events, Trade)]


def cancels(events: list[Event]) -> list[tuple[int, CancelReason, int, int]]:
    return [(c.order_id, c.reason, c.qty, c.leaves) for c in of(events, Cancelled)]


def levels(events: list[Event]) -> list[tuple[Side, int, int]]:
    return [(e.side, e.price, e.qty) for e in of(events, LevelChanged)]


def ids(book: OrderBook) -> list[int]:
    return [o.order_id for o in book.l3()]


# --------------------------------------------------------------------------- basics


def test_new_book_is_empty(book: OrderBook) -> None:
    assert book.seq == 0
    assert book.last_price is None
    assert book.l2() == ([], [])
    assert book.l3() == []
    assert book.stops() == []
    assert re.fullmatch(r"[0-9a-f]{64}", book.state_hash())


def test_limit_order_rests_with_exact_events(d: Driver) -> None:
    events = d.buy(1, 5, 100, account=7)
    assert events == [
        Accepted(1, d.ts, 1, 7, BUY, OrderType.LIMIT, 100, None, 5),
        LevelChanged(2, d.ts, BUY, 100, 5),
    ]
    assert d.book.seq == 2
    assert d.book.l2() == ([(100, 5)], [])
    (view,) = d.book.l3()
    assert (view.order_id, view.leaves, view.qty, view.filled, view.priority) == (1, 5, 5, 0, 1)


def test_full_match_exact_events(d: Driver) -> None:
    d.sell(1, 5, 100, account=1)
    events = d.buy(2, 5, 101, account=2)
    assert events == [
        Accepted(3, d.ts, 2, 2, BUY, OrderType.LIMIT, 101, None, 5),
        Trade(4, d.ts, 4, 100, 5, BUY, 1, 2, 1, 2, 0, 0),
        LevelChanged(5, d.ts, SELL, 100, 0),
    ]
    assert d.book.l2() == ([], [])
    assert d.book.last_price == 100


def test_trade_id_is_event_seq(d: Driver) -> None:
    d.sell(1, 1, 100)
    d.sell(2, 1, 101)
    events = d.buy(3, 2, 101, account=2)
    for t in of(events, Trade):
        assert t.trade_id == t.seq


def test_price_priority(d: Driver) -> None:
    d.sell(1, 1, 103)
    d.sell(2, 1, 101)
    d.sell(3, 1, 102)
    events = d.buy(4, 3, 103, account=2)
    assert trades(events) == [(2, 4, 101, 1), (3, 4, 102, 1), (1, 4, 103, 1)]
    d.buy(5, 1, 90)
    d.buy(6, 1, 92)
    d.buy(7, 1, 91)
    events = d.sell(8, 3, 90, account=2)
    assert trades(events) == [(6, 8, 92, 1), (7, 8, 91, 1), (5, 8, 90, 1)]


def test_time_priority_within_a_level(d: Driver) -> None:
    for oid in (1, 2, 3):
        d.sell(oid, 2, 100, account=oid)
    events = d.buy(9, 5, 100, account=9)
    assert trades(events) == [(1, 9, 100, 2), (2, 9, 100, 2), (3, 9, 100, 1)]
    assert ids(d.book) == [3]
    assert d.book.l3()[0].leaves == 1


def test_taker_never_trades_through_its_limit(d: Driver) -> None:
    d.sell(1, 5, 105)
    events = d.buy(2, 5, 104, account=2)
    assert of(events, Trade) == []
    assert d.book.l2() == ([(104, 5)], [(105, 5)])


def test_partial_fill_of_maker(d: Driver) -> None:
    d.sell(1, 10, 100)
    events = d.buy(2, 4, 100, account=2)
    (t,) = of(events, Trade)
    assert (t.qty, t.maker_leaves, t.taker_leaves) == (4, 6, 0)
    assert levels(events) == [(SELL, 100, 6)]
    (maker,) = d.book.l3()
    assert (maker.qty, maker.leaves, maker.filled) == (10, 6, 4)


def test_partial_fill_of_taker_rests_remainder(d: Driver) -> None:
    d.sell(1, 3, 100)
    events = d.buy(2, 10, 101, account=2)
    assert trades(events) == [(1, 2, 100, 3)]
    # bids before asks, each best first
    assert levels(events) == [(BUY, 101, 7), (SELL, 100, 0)]
    (rest,) = d.book.l3()
    assert (rest.order_id, rest.price, rest.leaves, rest.filled) == (2, 101, 7, 3)
    assert rest.priority == of(events, Accepted)[0].seq


def test_sweep_reports_each_level_once_best_first(d: Driver) -> None:
    d.sell(1, 1, 100)
    d.sell(2, 1, 100)
    d.sell(3, 1, 101)
    d.sell(4, 5, 102)
    events = d.buy(5, 4, 102, account=2)
    assert [t.price for t in of(events, Trade)] == [100, 100, 101, 102]
    assert levels(events) == [(SELL, 100, 0), (SELL, 101, 0), (SELL, 102, 4)]
    assert kinds(events) == ["Accepted"] + ["Trade"] * 4 + ["LevelChanged"] * 3


def test_seq_strictly_increasing_without_gaps(d: Driver) -> None:
    seen: list[int] = []
    seen += [e.seq for e in d.buy(1, 5, 100)]
    seen += [e.seq for e in d.sell(2, 3, 100, account=2)]
    seen += [e.seq for e in d.cancel(99)]  # rejected: still an event
    seen += [e.seq for e in d.amend(1, qty=1)]
    seen += [e.seq for e in d.mass_cancel(1)]
    assert seen == list(range(1, len(seen) + 1))
    assert d.book.seq == seen[-1]


# --------------------------------------------------------------------------- time in force


def test_ioc_remainder_cancelled(d: Driver) -> None:
    d.sell(1, 3, 100)
    events = d.buy(2, 5, 100, account=2, tif=TimeInForce.IOC)
    assert trades(events) == [(1, 2, 100, 3)]
    assert cancels(events) == [(2, CancelReason.IOC_REMAINDER, 2, 0)]
    assert d.book.l2() == ([], [])


def test_ioc_fully_filled_has_no_cancel(d: Driver) -> None:
    d.sell(1, 5, 100)
    events = d.buy(2, 5, 100, account=2, tif=TimeInForce.IOC)
    assert of(events, Cancelled) == []


def test_ioc_without_liquidity(d: Driver) -> None:
    events = d.buy(2, 5, 100, tif=TimeInForce.IOC)
    assert kinds(events) == ["Accepted", "Cancelled"]
    assert d.book.l3() == []


def test_fok_fills_completely(d: Driver) -> None:
    d.sell(1, 3, 100)
    d.sell(2, 3, 101)
    events = d.buy(3, 5, 101, account=2, tif=TimeInForce.FOK)
    assert trades(events) == [(1, 3, 100, 3), (2, 3, 101, 2)]
    assert of(events, Cancelled) == []


def test_fok_unfillable_does_not_trade(d: Driver) -> None:
    d.sell(1, 3, 100)
    d.sell(2, 3, 102)
    before = d.book.l3()
    events = d.buy(3, 5, 101, account=2, tif=TimeInForce.FOK)
    assert kinds(events) == ["Accepted", "Cancelled"]
    assert cancels(events) == [(3, CancelReason.FOK_UNFILLED, 5, 0)]
    assert d.book.l3() == before


def test_fok_counts_own_orders_as_blocking_unless_cancel_oldest(book_cls: type[OrderBook]) -> None:
    for stp, fills in [
        (StpMode.CANCEL_NEWEST, False),
        (StpMode.CANCEL_BOTH, False),
        (StpMode.DECREMENT_AND_CANCEL, False),
        (StpMode.CANCEL_OLDEST, True),
    ]:
        d = Driver(book_cls(SPEC))  # type: ignore[call-arg]
        d.sell(1, 2, 100, account=1)
        d.sell(2, 2, 100, account=2)
        d.sell(3, 2, 101, account=2)
        events = d.buy(4, 4, 101, account=1, tif=TimeInForce.FOK, stp=stp)
        if fills:
            assert cancels(events) == [(1, CancelReason.STP, 2, 0)]
            assert trades(events) == [(2, 4, 100, 2), (3, 4, 101, 2)]
        else:
            assert cancels(events) == [(4, CancelReason.FOK_UNFILLED, 4, 0)]
            assert ids(d.book) == [1, 2, 3]


def test_gtd_expires_before_the_command_with_ts_at_or_past_expiry(d: Driver) -> None:
    d.buy(1, 5, 100, tif=TimeInForce.GTD, expire_time=2_000, ts=1_000)
    d.buy(2, 5, 99, tif=TimeInForce.GTD, expire_time=3_000, ts=1_001)
    events = d.buy(3, 1, 90, ts=1_999)
    assert of(events, Cancelled) == []
    events = d.sell(4, 5, 100, account=2, ts=2_000)
    # expiry comes first, so the sell does not meet order 1
    assert kinds(events)[:2] == ["Cancelled", "Accepted"]
    assert cancels(events) == [(1, CancelReason.EXPIRED, 5, 0)]
    assert of(events, Trade) == []
    assert d.book.l2() == ([(99, 5), (90, 1)], [(100, 5)])


def test_gtd_expiry_order_is_expire_time_then_acceptance(d: Driver) -> None:
    d.buy(1, 1, 100, tif=TimeInForce.GTD, expire_time=5_000, ts=1)
    d.buy(2, 1, 99, tif=TimeInForce.GTD, expire_time=4_000, ts=2)
    d.sell(3, 1, 120, tif=TimeInForce.GTD, expire_time=4_000, ts=3)
    events = d.cancel(42, ts=6_000)  # a rejected command still expires orders
    assert [c[0] for c in cancels(events)] == [2, 3, 1]
    assert kinds(events) == ["Cancelled"] * 3 + ["Rejected"] + ["LevelChanged"] * 3
    assert d.book.l3() == []


def test_gtd_pending_stop_expires(d: Driver) -> None:
    d.buy(
        1,
        1,
        110,
        order_type=OrderType.STOP_LIMIT,
        stop_price=105,
        tif=TimeInForce.GTD,
        expire_time=50,
        ts=10,
    )
    assert len(d.book.stops()) == 1
    events = d.mass_cancel(99, ts=50)
    assert cancels(events) == [(1, CancelReason.EXPIRED, 1, 0)]
    assert d.book.stops() == []


def test_gtd_partially_filled_expires_with_its_leaves(d: Driver) -> None:
    d.buy(1, 5, 100, tif=TimeInForce.GTD, expire_time=100, ts=1)
    d.sell(2, 2, 100, account=2, ts=2)
    events = d.cancel(42, ts=100)
    assert cancels(events) == [(1, CancelReason.EXPIRED, 3, 0)]


def test_expire_only_advances_the_clock(d: Driver) -> None:
    d.buy(1, 5, 100, tif=TimeInForce.GTD, expire_time=2_000, ts=1)
    d.buy(2, 1, 110, order_type=OrderType.STOP_LIMIT, stop_price=105, tif=TimeInForce.GTD,
          expire_time=3_000, ts=2)  # fmt: skip
    d.buy(3, 1, 90, ts=3)
    assert d.book.next_expiry() == 2_000
    assert d.submit(Expire(ts=1_999)) == []  # nothing due: no event at all
    events = d.submit(Expire(ts=2_000))
    assert kinds(events) == ["Cancelled", "LevelChanged"]
    assert cancels(events) == [(1, CancelReason.EXPIRED, 5, 0)]
    assert d.book.next_expiry() == 3_000  # the pending stop's
    assert cancels(d.submit(Expire(ts=5_000))) == [(2, CancelReason.EXPIRED, 1, 0)]
    assert d.book.next_expiry() is None
    assert ids(d.book) == [3]


# --------------------------------------------------------------------------- post-only


def test_post_only_rests_when_not_crossing(d: Driver) -> None:
    d.sell(1, 5, 101)
    events = d.buy(2, 5, 100, post_only=True, account=2)
    assert kinds(events) == ["Accepted", "LevelChanged"]


@pytest.mark.parametrize("account", [1, 2])
def test_post_only_rejected_when_it_would_take(d: Driver, account: int) -> None:
    d.sell(1, 5, 101, account=1)
    before = d.book.l3()
    events = d.buy(2, 5, 101, post_only=True, account=account)
    assert [type(e) for e in events] == [Rejected]
    assert events[0].reason == RejectReason.POST_ONLY_WOULD_TAKE
    assert d.book.l3() == before


# --------------------------------------------------------------------------- self-trade prevention


def _stp_book(book_cls: type[OrderBook]) -> Driver:
    d = Driver(book_cls(SPEC))  # type: ignore[call-arg]
    d.sell(1, 2, 100, account=5)  # someone else first
    d.sell(2, 3, 100, account=1)  # own order
    d.sell(3, 4, 101, account=6)
    return d


def test_stp_cancel_newest(book_cls: type[OrderBook]) -> None:
    d = _stp_book(book_cls)
    events = d.buy(9, 8, 101, account=1, stp=StpMode.CANCEL_NEWEST)
    assert trades(events) == [(1, 9, 100, 2)]
    assert cancels(events) == [(9, CancelReason.STP, 6, 0)]
    assert ids(d.book) == [2, 3]


def test_stp_cancel_oldest(book_cls: type[OrderBook]) -> None:
    d = _stp_book(book_cls)
    events = d.buy(9, 8, 101, account=1, stp=StpMode.CANCEL_OLDEST)
    assert kinds(events)[:4] == ["Accepted", "Trade", "Cancelled", "Trade"]
    assert trades(events) == [(1, 9, 100, 2), (3, 9, 101, 4)]
    assert cancels(events) == [(2, CancelReason.STP, 3, 0)]
    assert d.book.l2() == ([(101, 2)], [])


def test_stp_cancel_both(book_cls: type[OrderBook]) -> None:
    d = _stp_book(book_cls)
    events = d.buy(9, 8, 101, account=1, stp=StpMode.CANCEL_BOTH)
    assert trades(events) == [(1, 9, 100, 2)]
    assert cancels(events) == [(2, CancelReason.STP, 3, 0), (9, CancelReason.STP, 6, 0)]
    assert ids(d.book) == [3]


def test_stp_decrement_taker_larger(book_cls: type[OrderBook]) -> None:
    d = _stp_book(book_cls)
    events = d.buy(9, 8, 101, account=1, stp=StpMode.DECREMENT_AND_CANCEL)
    # 2 traded with order 1; 3 decremented against own order 2 (gone); 3 traded at 101
    assert trades(events) == [(1, 9, 100, 2), (3, 9, 101, 3)]
    assert cancels(events) == [(2, CancelReason.STP, 3, 0), (9, CancelReason.STP, 3, 3)]
    assert d.book.l2() == ([], [(101, 1)])


def test_stp_decrement_maker_larger(book_cls: type[OrderBook]) -> None:
    d = _stp_book(book_cls)
    events = d.buy(9, 4, 100, account=1, stp=StpMode.DECREMENT_AND_CANCEL)
    assert trades(events) == [(1, 9, 100, 2)]
    assert cancels(events) == [(2, CancelReason.STP, 2, 1), (9, CancelReason.STP, 2, 0)]
    own = d.book.order(2)
    assert own is not None and (own.leaves, own.qty) == (1, 1)
    assert ids(d.book) == [2, 3]  # kept its place


def test_stp_decrement_equal(book_cls: type[OrderBook]) -> None:
    d = _stp_book(book_cls)
    events = d.buy(9, 5, 100, account=1, stp=StpMode.DECREMENT_AND_CANCEL)
    assert cancels(events) == [(2, CancelReason.STP, 3, 0), (9, CancelReason.STP, 3, 0)]
    assert ids(d.book) == [3]


def test_stp_only_between_same_account(d: Driver) -> None:
    d.sell(1, 3, 100, account=1)
    events = d.buy(2, 3, 100, account=2, stp=StpMode.CANCEL_NEWEST)
    assert trades(events) == [(1, 2, 100, 3)]


# --------------------------------------------------------------------------- amend


def _three_bids(book_cls: type[OrderBook]) -> Driver:
    d = Driver(book_cls(SPEC))  # type: ignore[call-arg]
    d.buy(1, 5, 100)
    d.buy(2, 5, 100)
    d.buy(3, 5, 100)
    return d


def test_amend_lower_qty_keeps_priority(book_cls: type[OrderBook]) -> None:
    d = _three_bids(book_cls)
    prio = d.book.l3()[0].priority
    events = d.amend(1, qty=2)
    (a,) = of(events, Amended)
    assert (a.price, a.qty, a.leaves, a.priority_kept) == (100, 2, 2, True)
    assert levels(events) == [(BUY, 100, 12)]
    assert ids(d.book) == [1, 2, 3]
    assert d.book.l3()[0].priority == prio


def test_amend_higher_qty_loses_priority(book_cls: type[OrderBook]) -> None:
    d = _three_bids(book_cls)
    events = d.amend(1, qty=7)
    (a,) = of(events, Amended)
    assert not a.priority_kept
    assert ids(d.book) == [2, 3, 1]
    assert d.book.l3()[-1].priority == a.seq
    assert levels(events) == [(BUY, 100, 17)]


def test_amend_price_loses_priority_and_moves(book_cls: type[OrderBook]) -> None:
    d = _three_bids(book_cls)
    d.buy(4, 5, 99)
    events = d.amend(1, price=99)
    assert not of(events, Amended)[0].priority_kept
    assert ids(d.book) == [2, 3, 4, 1]
    assert levels(events) == [(BUY, 100, 10), (BUY, 99, 10)]


def test_amend_back_and_forth_loses_priority(book_cls: type[OrderBook]) -> None:
    d = _three_bids(book_cls)
    d.amend(1, price=99)
    events = d.amend(1, price=100)
    assert ids(d.book) == [2, 3, 1]
    assert levels(events) == [(BUY, 100, 15), (BUY, 99, 0)]


def test_amend_to_crossing_price_trades(book_cls: type[OrderBook]) -> None:
    d = _three_bids(book_cls)
    d.sell(7, 3, 101, account=2)
    events = d.amend(2, price=102)
    assert kinds(events)[:2] == ["Amended", "Trade"]
    t = of(events, Trade)[0]
    assert (t.maker_order_id, t.taker_order_id, t.price, t.qty, t.aggressor) == (7, 2, 101, 3, BUY)
    assert d.book.l2() == ([(102, 2), (100, 10)], [])
    assert d.book.order(2).filled == 3  # type: ignore[union-attr]


def test_amend_total_must_exceed_filled(d: Driver) -> None:
    d.buy(1, 10, 100)
    d.sell(2, 4, 100, account=2)
    events = d.amend(1, qty=4)
    assert [e.reason for e in of(events, Rejected)] == [RejectReason.AMEND_QTY_TOO_LOW]
    events = d.amend(1, qty=5)
    (a,) = of(events, Amended)
    assert (a.qty, a.leaves) == (5, 1)


def test_amend_post_only_that_would_cross_is_rejected(d: Driver) -> None:
    d.buy(1, 5, 100, post_only=True)
    d.sell(2, 5, 102, account=2)
    before = d.book.l3()
    events = d.amend(1, price=102)
    assert [e.reason for e in of(events, Rejected)] == [RejectReason.POST_ONLY_WOULD_TAKE]
    assert d.book.l3() == before
    events = d.amend(1, price=101)
    assert of(events, Amended)


def test_amend_nothing_changed_is_kept(d: Driver) -> None:
    d.buy(1, 5, 100)
    events = d.amend(1, price=100, qty=5)
    assert kinds(events) == ["Amended"]
    assert events[0].priority_kept  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kw", "account", "reason"),
    [
        ({}, 1, RejectReason.INVALID_AMEND),
        ({"qty": 0}, 1, RejectReason.INVALID_QUANTITY),
        ({"price": -1}, 1, RejectReason.INVALID_PRICE),
        ({"qty": 3}, 2, RejectReason.UNKNOWN_ORDER),
        ({"qty": 2_000}, 1, RejectReason.QUANTITY_ABOVE_MAX),
    ],
)
def test_amend_rejections_leave_book_unchanged(
    d: Driver, kw: dict[str, int], account: int, reason: RejectReason
) -> None:
    d.buy(1, 5, 100)
    before = (d.book.l3(), d.book.stops())
    events = d.amend(1, account=account, **kw)
    assert [(type(e), e.reason) for e in events] == [(Rejected, reason)]  # type: ignore[union-attr]
    assert (d.book.l3(), d.book.stops()) == before


def test_amend_size_limits(book_cls: type[OrderBook]) -> None:
    spec = MarketSpec("X-Y", 1, 1, min_qty=2, max_qty=10, min_notional=500)
    d = Driver(book_cls(spec))  # type: ignore[call-arg]
    d.buy(1, 5, 100)
    assert of(d.amend(1, qty=1), Rejected)[0].reason == RejectReason.QUANTITY_BELOW_MIN
    assert of(d.amend(1, qty=11), Rejected)[0].reason == RejectReason.QUANTITY_ABOVE_MAX
    assert of(d.amend(1, price=99), Rejected)[0].reason == RejectReason.NOTIONAL_BELOW_MIN


def test_amend_unknown_and_stop(d: Driver) -> None:
    assert of(d.amend(77, qty=1), Rejected)[0].reason == RejectReason.UNKNOWN_ORDER
    d.buy(1, 1, 110, order_type=OrderType.STOP_LIMIT, stop_price=105)
    assert of(d.amend(1, qty=2), Rejected)[0].reason == RejectReason.ORDER_NOT_AMENDABLE


# --------------------------------------------------------------------------- cancel


def test_cancel_resting(d: Driver) -> None:
    d.buy(1, 5, 100)
    d.buy(2, 5, 100)
    events = d.cancel(1)
    assert cancels(events) == [(1, CancelReason.USER, 5, 0)]
    assert levels(events) == [(BUY, 100, 5)]
    assert ids(d.book) == [2]
    events = d.cancel(2)
    assert levels(events) == [(BUY, 100, 0)]
    assert d.book.l2() == ([], [])


def test_cancel_unknown_or_other_accounts_order(d: Driver) -> None:
    d.buy(1, 5, 100, account=1)
    for oid, acct in [(2, 1), (1, 2)]:
        events = d.cancel(oid, account=acct)
        assert [(type(e), e.reason) for e in events] == [  # type: ignore[union-attr]
            (Rejected, RejectReason.UNKNOWN_ORDER)
        ]
    assert ids(d.book) == [1]


def test_cancel_pending_stop(d: Driver) -> None:
    d.sell(1, 1, 90, order_type=OrderType.STOP_LIMIT, stop_price=95)
    events = d.cancel(1)
    assert cancels(events) == [(1, CancelReason.USER, 1, 0)]
    assert d.book.stops() == []


def test_order_id_reusable_after_done(d: Driver) -> None:
    d.buy(1, 5, 100)
    d.cancel(1)
    assert of(d.buy(1, 5, 100), Accepted)


@pytest.mark.parametrize("stop", [False, True])
def test_duplicate_live_order_id_rejected(d: Driver, stop: bool) -> None:
    if stop:
        d.buy(1, 5, 110, order_type=OrderType.STOP_LIMIT, stop_price=105)
    else:
        d.buy(1, 5, 100)
    before = (d.book.l3(), d.book.stops())
    events = d.sell(1, 5, 200, account=2)
    assert [(type(e), e.reason) for e in events] == [  # type: ignore[union-attr]
        (Rejected, RejectReason.DUPLICATE_ORDER_ID)
    ]
    assert (d.book.l3(), d.book.stops()) == before


# --------------------------------------------------------------------------- mass cancel


def test_mass_cancel_account_in_acceptance_order(d: Driver) -> None:
    d.sell(1, 1, 105, account=1)
    d.buy(2, 1, 99, account=1)
    d.buy(3, 1, 98, account=2)
    d.buy(4, 1, 99, account=1)
    d.sell(5, 1, 90, account=1, order_type=OrderType.STOP_LIMIT, stop_price=95)
    events = d.mass_cancel(1)
    assert cancels(events) == [(oid, CancelReason.MASS_CANCEL, 1, 0) for oid in (1, 2, 4, 5)]
    assert levels(events) == [(BUY, 99, 0), (SELL, 105, 0)]
    assert ids(d.book) == [3]
    assert d.book.stops() == []


def test_mass_cancel_after_restore_keeps_acceptance_order(book_cls: type[OrderBook]) -> None:
    d = Driver(book_cls(SPEC))  # type: ignore[call-arg]
    d.sell(1, 1, 90, account=1, order_type=OrderType.STOP_LIMIT, stop_price=95)
    d.buy(2, 1, 99, account=1)
    d.buy(3, 1, 98, account=1)
    d = Driver(book_cls.restore(d.book.snapshot()))
    events = d.mass_cancel(1)
    assert [c[0] for c in cancels(events)] == [1, 2, 3]


def test_mass_cancel_one_side(d: Driver) -> None:
    d.sell(1, 1, 105, account=1)
    d.buy(2, 1, 99, account=1)
    events = d.mass_cancel(1, SELL)
    assert [c[0] for c in cancels(events)] == [1]
    assert ids(d.book) == [2]


def test_mass_cancel_with_nothing_yields_no_events(d: Driver) -> None:
    d.buy(1, 1, 99, account=1)
    assert d.mass_cancel(2) == []
    assert d.book.seq == 2


# --------------------------------------------------------------------------- market orders


def test_market_order_with_protection_price(d: Driver) -> None:
    d.sell(1, 2, 100)
    d.sell(2, 2, 101)
    d.sell(3, 2, 103)
    events = d.market(4, BUY, 10, price=102, account=2)
    assert trades(events) == [(1, 4, 100, 2), (2, 4, 101, 2)]
    assert cancels(events) == [(4, CancelReason.MARKET_UNFILLED, 6, 0)]
    assert d.book.l2() == ([], [(103, 2)])


def test_market_order_with_quote_budget(d: Driver) -> None:
    d.sell(1, 2, 100)
    d.sell(2, 5, 110)
    # budget 430: 2 @ 100 = 200, then 230 // 110 = 2 @ 110 = 220, 10 left < 110
    events = d.market(3, BUY, 10, quote_budget=430, account=2)
    assert trades(events) == [(1, 3, 100, 2), (2, 3, 110, 2)]
    assert cancels(events) == [(3, CancelReason.MARKET_UNFILLED, 6, 0)]


def test_market_budget_exactly_affording_a_level(d: Driver) -> None:
    d.sell(1, 2, 100)
    d.sell(2, 5, 110)
    events = d.market(3, BUY, 10, quote_budget=310, account=2)
    assert trades(events) == [(1, 3, 100, 2), (2, 3, 110, 1)]


def test_sell_market_order_with_protection_price(d: Driver) -> None:
    d.buy(1, 2, 100)
    d.buy(2, 2, 98)
    events = d.market(3, SELL, 3, price=99, account=2)
    assert trades(events) == [(1, 3, 100, 2)]
    assert cancels(events) == [(3, CancelReason.MARKET_UNFILLED, 1, 0)]


def test_market_order_without_liquidity(d: Driver) -> None:
    events = d.market(1, BUY, 3, price=100)
    assert kinds(events) == ["Accepted", "Cancelled"]
    assert cancels(events) == [(1, CancelReason.MARKET_UNFILLED, 3, 0)]


def test_market_fok(d: Driver) -> None:
    d.sell(1, 2, 100)
    events = d.market(2, BUY, 3, price=200, tif=TimeInForce.FOK, account=2)
    assert cancels(events) == [(2, CancelReason.FOK_UNFILLED, 3, 0)]
    events = d.market(3, BUY, 2, price=200, tif=TimeInForce.FOK, account=2)
    assert trades(events) == [(1, 3, 100, 2)]


def test_market_fok_counts_the_budget(d: Driver) -> None:
    d.sell(1, 5, 100)
    events = d.market(2, BUY, 3, quote_budget=299, tif=TimeInForce.FOK, account=2)
    assert cancels(events) == [(2, CancelReason.FOK_UNFILLED, 3, 0)]
    events = d.market(3, BUY, 3, quote_budget=300, tif=TimeInForce.FOK, account=2)
    assert trades(events) == [(1, 3, 100, 3)]


# --------------------------------------------------------------------------- stops


def test_buy_stop_triggers_when_last_reaches_stop(d: Driver) -> None:
    d.buy(10, 1, 110, order_type=OrderType.STOP_LIMIT, stop_price=105, account=3)
    d.sell(1, 1, 104, account=1)
    d.buy(2, 1, 104, account=2)  # last = 104 < 105: nothing
    assert len(d.book.stops()) == 1
    d.sell(3, 5, 105, account=1)
    events = d.buy(4, 1, 105, account=2)  # last = 105 >= 105
    assert kinds(events) == ["Accepted", "Trade", "Triggered", "Trade", "LevelChanged"]
    trig = of(events, Triggered)[0]
    assert (trig.order_id, trig.stop_price, trig.last_price) == (10, 105, 105)
    assert trades(events) == [(3, 4, 105, 1), (3, 10, 105, 1)]
    assert d.book.stops() == []


def test_sell_stop_triggers_when_last_falls_to_stop(d: Driver) -> None:
    d.sell(
        10,
        2,
        None,
        order_type=OrderType.STOP_MARKET,
        stop_price=95,
        quote_budget=10_000,
        tif=TimeInForce.IOC,
        account=3,
    )
    d.buy(1, 1, 96, account=1)
    d.sell(2, 1, 96, account=2)  # last 96 > 95
    assert len(d.book.stops()) == 1
    d.buy(3, 5, 95, account=1)
    events = d.sell(4, 1, 95, account=2)  # last 95 <= 95
    assert [type(e).__name__ for e in events][2] == "Triggered"
    assert trades(events) == [(3, 4, 95, 1), (3, 10, 95, 2)]


def test_stop_limit_rests_after_trigger_with_trigger_priority(d: Driver) -> None:
    d.buy(10, 3, 100, order_type=OrderType.STOP_LIMIT, stop_price=100, account=3)
    d.buy(11, 3, 100, account=4)
    d.sell(1, 1, 100, account=1)  # trades with 11 at 100 -> triggers 10
    events = d.submit(CancelOrder(ts=d.ts + 1, order_id=999, account_id=0))
    assert of(events, Rejected)
    views = d.book.l3()
    assert [v.order_id for v in views] == [11, 10]
    assert views[1].order_type is OrderType.STOP_LIMIT and views[1].leaves == 3


def test_stop_placed_when_already_triggered_fires_at_once(d: Driver) -> None:
    d.sell(1, 1, 100, account=1)
    d.buy(2, 1, 100, account=2)  # last = 100
    d.sell(3, 5, 101, account=1)
    events = d.buy(4, 2, 102, order_type=OrderType.STOP_LIMIT, stop_price=99, account=2)
    assert kinds(events) == ["Accepted", "Triggered", "Trade", "LevelChanged"]


def test_stop_without_any_trade_stays_pending(d: Driver) -> None:
    events = d.buy(1, 1, 102, order_type=OrderType.STOP_LIMIT, stop_price=1)
    assert kinds(events) == ["Accepted"]
    assert [s.order_id for s in d.book.stops()] == [1]
    assert d.book.l3() == []


def test_stops_fire_in_acceptance_order_and_cascade(d: Driver) -> None:
    # Resting liquidity above the market.
    d.sell(1, 1, 101, account=1)
    d.sell(2, 1, 102, account=1)
    d.sell(3, 1, 103, account=1)
    # Stop 21 (stop 102) is accepted before 20 (stop 101): both fire on the first trade
    # at 102, in acceptance order; 20 is only reached after 21 trades at 103... and a
    # third stop (stop 103) fires from that cascade.
    d.buy(21, 1, 103, order_type=OrderType.STOP_LIMIT, stop_price=102, account=2)
    d.buy(20, 1, 103, order_type=OrderType.STOP_LIMIT, stop_price=101, account=2)
    d.buy(22, 1, 110, order_type=OrderType.STOP_LIMIT, stop_price=103, account=2)
    events = d.buy(30, 2, 102, account=4)  # trades 101, 102: last 102
    assert [
        (type(e).__name__, getattr(e, "order_id", None)) for e in events if type(e) in (Triggered,)
    ] == [
        ("Triggered", 21),
        ("Triggered", 20),
        ("Triggered", 22),
    ]
    assert trades(events) == [(1, 30, 101, 1), (2, 30, 102, 1), (3, 21, 103, 1)]
    # 20 found nothing at <= 103 and rests; 22 fired from the cascade and rests at 110
    assert d.book.l2() == ([(110, 1), (103, 1)], [])
    assert d.book.stops() == []


def test_triggered_stop_market_unfilled_is_cancelled(d: Driver) -> None:
    d.sell(1, 1, 100, account=1)
    d.buy(
        5,
        4,
        None,
        order_type=OrderType.STOP_MARKET,
        stop_price=100,
        quote_budget=1_000,
        tif=TimeInForce.IOC,
        account=2,
    )
    events = d.buy(2, 1, 100, account=3)
    assert kinds(events) == ["Accepted", "Trade", "Triggered", "Cancelled", "LevelChanged"]
    assert cancels(events) == [(5, CancelReason.MARKET_UNFILLED, 4, 0)]


def test_triggered_fok_stop_unfillable(d: Driver) -> None:
    d.sell(1, 1, 100, account=1)
    d.sell(2, 1, 101, account=1)
    d.buy(
        5, 4, 101, order_type=OrderType.STOP_LIMIT, stop_price=100, tif=TimeInForce.FOK, account=2
    )
    events = d.buy(3, 1, 100, account=3)
    assert cancels(events) == [(5, CancelReason.FOK_UNFILLED, 4, 0)]
    assert d.book.l2() == ([], [(101, 1)])


# --------------------------------------------------------------------------- rejections


def _cmd(**kw: Any) -> PlaceOrder:
    base: dict[str, Any] = {
        "ts": 10_000,
        "order_id": 50,
        "account_id": 1,
        "side": BUY,
        "qty": 5,
        "price": 100,
    }
    base.update(kw)
    return PlaceOrder(**base)


REJECTIONS: list[tuple[str, Any, RejectReason]] = [
    ("zero qty", _cmd(qty=0), RejectReason.INVALID_QUANTITY),
    ("negative qty", _cmd(qty=-3), RejectReason.INVALID_QUANTITY),
    ("no price", _cmd(price=None), RejectReason.INVALID_PRICE),
    ("zero price", _cmd(price=0), RejectReason.INVALID_PRICE),
    ("negative price", _cmd(price=-100), RejectReason.INVALID_PRICE),
    ("limit with budget", _cmd(quote_budget=5), RejectReason.INVALID_QUOTE_BUDGET),
    (
        "market unbounded",
        _cmd(order_type=OrderType.MARKET, price=None, tif=TimeInForce.IOC),
        RejectReason.MARKET_ORDER_UNBOUNDED,
    ),
    (
        "stop market unbounded",
        _cmd(order_type=OrderType.STOP_MARKET, price=None, stop_price=5, tif=TimeInForce.IOC),
        RejectReason.MARKET_ORDER_UNBOUNDED,
    ),
    (
        "market zero protection",
        _cmd(order_type=OrderType.MARKET, price=0, tif=TimeInForce.IOC),
        RejectReason.INVALID_PRICE,
    ),
    (
        "market zero budget",
        _cmd(order_type=OrderType.MARKET, price=None, quote_budget=0, tif=TimeInForce.IOC),
        RejectReason.INVALID_QUOTE_BUDGET,
    ),
    ("market GTC", _cmd(order_type=OrderType.MARKET), RejectReason.INVALID_TIME_IN_FORCE),
    (
        "stop without stop price",
        _cmd(order_type=OrderType.STOP_LIMIT),
        RejectReason.INVALID_STOP_PRICE,
    ),
    (
        "stop price zero",
        _cmd(order_type=OrderType.STOP_LIMIT, stop_price=0),
        RejectReason.INVALID_STOP_PRICE,
    ),
    ("limit with stop price", _cmd(stop_price=90), RejectReason.INVALID_STOP_PRICE),
    ("GTD without expiry", _cmd(tif=TimeInForce.GTD), RejectReason.INVALID_EXPIRE_TIME),
    (
        "GTD already expired",
        _cmd(tif=TimeInForce.GTD, expire_time=10_000),
        RejectReason.INVALID_EXPIRE_TIME,
    ),
    ("GTC with expiry", _cmd(expire_time=20_000), RejectReason.INVALID_EXPIRE_TIME),
    ("post-only IOC", _cmd(post_only=True, tif=TimeInForce.IOC), RejectReason.INVALID_POST_ONLY),
    (
        "post-only stop",
        _cmd(post_only=True, order_type=OrderType.STOP_LIMIT, stop_price=90),
        RejectReason.INVALID_POST_ONLY,
    ),
    ("below min qty", _cmd(qty=1), RejectReason.QUANTITY_BELOW_MIN),
    ("above max qty", _cmd(qty=101), RejectReason.QUANTITY_ABOVE_MAX),
    ("below min notional", _cmd(qty=2, price=10), RejectReason.NOTIONAL_BELOW_MIN),
    (
        "budget below min notional",
        _cmd(order_type=OrderType.MARKET, price=None, quote_budget=49, tif=TimeInForce.IOC),
        RejectReason.NOTIONAL_BELOW_MIN,
    ),
    ("duplicate id", _cmd(order_id=1), RejectReason.DUPLICATE_ORDER_ID),
    ("post-only would take", _cmd(post_only=True, price=105), RejectReason.POST_ONLY_WOULD_TAKE),
]


def _amend_cmd(**kw: Any) -> AmendOrder:
    base: dict[str, Any] = {"ts": 10_000, "order_id": 2, "account_id": 9}
    base.update(kw)
    return AmendOrder(**base)


REJECTIONS += [
    ("amend nothing", _amend_cmd(), RejectReason.INVALID_AMEND),
    ("amend zero qty", _amend_cmd(qty=0), RejectReason.INVALID_QUANTITY),
    ("amend zero price", _amend_cmd(price=0), RejectReason.INVALID_PRICE),
    ("amend unknown", _amend_cmd(order_id=77, qty=8), RejectReason.UNKNOWN_ORDER),
    ("amend other account", _amend_cmd(account_id=8, qty=8), RejectReason.UNKNOWN_ORDER),
    ("amend stop", _amend_cmd(order_id=4, qty=3), RejectReason.ORDER_NOT_AMENDABLE),
    ("amend below min", _amend_cmd(qty=1), RejectReason.QUANTITY_BELOW_MIN),
    ("amend above max", _amend_cmd(qty=101), RejectReason.QUANTITY_ABOVE_MAX),
    ("amend notional", _amend_cmd(price=4), RejectReason.NOTIONAL_BELOW_MIN),
    ("amend to filled", _amend_cmd(qty=4), RejectReason.AMEND_QTY_TOO_LOW),
    ("amend post-only crossing", _amend_cmd(price=105), RejectReason.POST_ONLY_WOULD_TAKE),
    (
        "cancel unknown",
        CancelOrder(ts=10_000, order_id=77, account_id=9),
        RejectReason.UNKNOWN_ORDER,
    ),
    (
        "cancel other account",
        CancelOrder(ts=10_000, order_id=2, account_id=8),
        RejectReason.UNKNOWN_ORDER,
    ),
]


def _rejection_book(book_cls: type[OrderBook]) -> OrderBook:
    """Min qty 2, max 100, min notional 50. Resting: ask 1 (3 @ 105), post-only bid 2
    (10 @ 95, 4 filled); pending buy stop 4 (stop 110)."""
    spec = MarketSpec("X-Y", 1, 1, min_qty=2, max_qty=100, min_notional=50)
    book = book_cls(spec)  # type: ignore[call-arg]
    book.submit(_cmd(order_id=1, ts=1, side=SELL, price=105, qty=3, account_id=9))
    book.submit(_cmd(order_id=2, ts=2, price=95, qty=10, account_id=9, post_only=True))
    book.submit(_cmd(order_id=3, ts=3, side=SELL, price=95, qty=4, account_id=8))
    book.submit(
        _cmd(
            order_id=4,
            ts=4,
            order_type=OrderType.STOP_LIMIT,
            stop_price=110,
            price=111,
            qty=2,
            account_id=9,
        )
    )
    return book


@pytest.mark.parametrize(("name", "cmd", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejections_leave_book_unchanged(
    book_cls: type[OrderBook], name: str, cmd: Any, reason: RejectReason
) -> None:
    book = _rejection_book(book_cls)
    assert book.order(2).filled == 4  # type: ignore[union-attr]
    before = (book.l3(), book.stops(), book.l2(), book.last_price, book.seq)
    result = book.submit(cmd)
    assert result.events == [Rejected(before[-1] + 1, cmd.ts, cmd.order_id, cmd.account_id, reason)]
    assert result.rejected == reason
    assert (book.l3(), book.stops(), book.l2(), book.last_price, book.seq - 1) == before


def test_every_reject_reason_has_a_scenario() -> None:
    assert {r[2] for r in REJECTIONS} == set(RejectReason)


def test_reject_reasons_are_upper_snake_with_prefix() -> None:
    for reason in RejectReason:
        assert re.fullmatch(r"MATCH(_[A-Z0-9]+)+", reason.value)


def test_market_spec_validates() -> None:
    with pytest.raises(ValueError):
        MarketSpec("X", 0, 1)
    with pytest.raises(ValueError):
        MarketSpec("X", 1, 1, min_qty=5, max_qty=4)


# --------------------------------------------------------------------------- state


def _busy(d: Driver) -> None:
    d.buy(1, 5, 100, account=1)
    d.buy(2, 3, 100, account=2, tif=TimeInForce.GTD, expire_time=5_000)
    d.buy(3, 2, 99, account=3)
    d.sell(4, 4, 103, account=1)
    d.sell(5, 1, 100, account=3)
    d.buy(6, 1, 110, order_type=OrderType.STOP_LIMIT, stop_price=104, account=2)
    d.sell(
        7,
        1,
        90,
        order_type=OrderType.STOP_LIMIT,
        stop_price=95,
        account=3,
        tif=TimeInForce.GTD,
        expire_time=4_000,
    )
    d.amend(1, qty=3)


def _continue(d: Driver) -> list[Event]:
    out: list[Event] = []
    out += d.buy(8, 2, 103, account=4, ts=3_000)  # trades at 103, no trigger (104)
    out += d.buy(9, 5, 104, account=4, ts=3_001)
    out += d.sell(10, 2, 104, account=5, ts=3_002)  # trades 104: triggers stop 6
    out += d.amend(3, price=98, ts=3_003)
    out += d.sell(11, 10, 95, account=5, ts=3_004)  # sweeps, last 95: triggers stop 7
    out += d.cancel(2, account=2, ts=4_500)  # stop 7 expired before, if still pending
    out += d.mass_cancel(4, ts=6_000)
    return out


def test_state_hash_equal_across_implementations() -> None:
    hashes, snaps = set(), set()
    for cls in BOOKS:
        d = Driver(cls(SPEC))  # type: ignore[call-arg]
        _busy(d)
        hashes.add(d.book.state_hash())
        snaps.add(d.book.snapshot())
        _continue(d)
        hashes.add(d.book.state_hash() + "after")
    assert len(hashes) == 2 and len(snaps) == 1


def test_state_hash_changes_with_state(d: Driver) -> None:
    h0 = d.book.state_hash()
    d.buy(1, 5, 100)
    h1 = d.book.state_hash()
    d.amend(1, qty=4)
    h2 = d.book.state_hash()
    assert len({h0, h1, h2}) == 3


@pytest.mark.parametrize("target", BOOKS, ids=lambda c: c.name)
def test_snapshot_round_trip_continues_identically(
    book_cls: type[OrderBook], target: type[OrderBook]
) -> None:
    straight = Driver(book_cls(SPEC))  # type: ignore[call-arg]
    _busy(straight)
    data = straight.book.snapshot()
    restored = Driver(target.restore(data))
    assert restored.book.snapshot() == data
    assert restored.book.state_hash() == straight.book.state_hash()
    assert restored.book.l3() == straight.book.l3()
    assert restored.book.stops() == straight.book.stops()
    assert restored.book.seq == straight.book.seq
    assert _continue(restored) == _continue(straight)
    assert restored.book.state_hash() == straight.book.state_hash()


def test_restore_rejects_unknown_version(book_cls: type[OrderBook]) -> None:
    with pytest.raises(ValueError):
        book_cls.restore(b'{"version": 99}')


@pytest.mark.parametrize("cls", [FastOrderBook, ReferenceOrderBook])
def test_l2_depth(cls: type[OrderBook]) -> None:
    d = Driver(cls(SPEC))  # type: ignore[call-arg]
    for i, p in enumerate([100, 99, 98, 97]):
        d.buy(i + 1, 1, p)
    for i, p in enumerate([101, 102, 103]):
        d.sell(i + 10, 2, p)
    assert d.book.l2(2) == ([(100, 1), (99, 1)], [(101, 2), (102, 2)])


def test_level_size_counts_resting_orders(d: Driver) -> None:
    d.buy(1, 1, 100)
    d.buy(2, 3, 100, account=2)
    d.buy(3, 1, 99)
    assert d.book.level_size(BUY, 100) == 2
    assert d.book.level_size(BUY, 99) == 1
    assert d.book.level_size(SELL, 100) == 0
    d.sell(4, 2, 100, account=3)  # fills order 1, leaves order 2 with 2
    assert d.book.level_size(BUY, 100) == 1
    d.cancel(2, account=2)
    assert d.book.level_size(BUY, 100) == 0


def test_level_size_follows_every_way_in_and_out(book_cls: type[OrderBook]) -> None:
    """The fast book counts a level as orders join and leave it (no walk of the
    level): amends that move or requeue, fills, STP cancels, mass cancels, restores."""
    d = Driver(book_cls(SPEC))  # type: ignore[call-arg]
    for i in range(1, 6):
        d.buy(i, 2, 100, account=i)
    d.amend(1, price=99, account=1)  # to another level
    d.amend(2, qty=3, account=2)  # to the back of the same level
    assert (d.book.level_size(BUY, 100), d.book.level_size(BUY, 99)) == (4, 1)
    d.sell(10, 3, 100, account=9)  # fills order 3, order 4 in part
    assert d.book.level_size(BUY, 100) == 3
    # takes the rest of 4, STP-cancels 5 (its own), then takes 1 of 2
    d.sell(11, 2, 100, account=5, stp=StpMode.CANCEL_OLDEST)
    assert d.book.level_size(BUY, 100) == 1
    d.mass_cancel(1)
    assert d.book.level_size(BUY, 99) == 0
    d = Driver(book_cls.restore(d.book.snapshot()))
    assert (d.book.level_size(BUY, 100), d.book.level_size(BUY, 99)) == (1, 0)


def test_commands_are_frozen() -> None:
    cmd = AmendOrder(ts=1, order_id=1, account_id=1, qty=1)
    with pytest.raises(AttributeError):
        cmd.qty = 2  # type: ignore[misc]
    event = Trade(1, 1, 1, 1, 1, BUY, 1, 2, 1, 2, 0, 0)
    with pytest.raises(AttributeError):
        event.qty = 2  # type: ignore[misc]
    assert MassCancel(ts=1, account_id=1).side is None


def test_gtd_expiry_still_exact_after_many_dead_gtd_orders(book_cls: type[OrderBook]) -> None:
    """Cancelled GTD orders leave nothing behind that could expire later (the fast
    book's heap drops dead entries lazily and compacts itself)."""
    d = Driver(book_cls(SPEC))  # type: ignore[call-arg]
    for oid in range(1, 1_501):
        d.buy(oid, 1, 90, tif=TimeInForce.GTD, expire_time=10**9, ts=oid)
        d.cancel(oid, ts=oid)
    d.buy(5_000, 1, 91, tif=TimeInForce.GTD, expire_time=3_000, ts=2_000)
    d.buy(5_001, 1, 92, tif=TimeInForce.GTD, expire_time=10**9, ts=2_001)
    events = d.cancel(42, ts=3_000)
    assert cancels(events) == [(5_000, CancelReason.EXPIRED, 1, 0)]
    events = d.cancel(42, ts=10**9)
    assert cancels(events) == [(5_001, CancelReason.EXPIRED, 1, 0)]
    if isinstance(d.book, FastOrderBook):
        assert len(d.book._gtd) < 100


def test_status_mark_takes_a_seq_and_changes_nothing(d: Driver) -> None:
    d.buy(1, 5, 100, ts=1)
    d.sell(2, 1, 110, account=2, ts=2)
    before = d.book.seq
    events = d.submit(MarkStatus(ts=3))
    assert events == [StatusMarked(before + 1, 3)]
    assert ids(d.book) == [1, 2]


def test_status_mark_with_cancel_all_cancels_every_live_order_in_accepted_order(
    d: Driver,
) -> None:
    d.buy(1, 5, 100, ts=1)
    d.buy(2, 1, 120, order_type=OrderType.STOP_LIMIT, stop_price=115, ts=2)  # pending
    d.sell(3, 2, 110, account=2, ts=3)
    d.sell(4, 1, 111, account=2, tif=TimeInForce.GTD, expire_time=9, ts=4)
    events = d.submit(MarkStatus(ts=5, cancel_all=True))
    assert kinds(events)[0] == "StatusMarked"
    assert cancels(events) == [
        (1, CancelReason.CLOSED, 5, 0),
        (2, CancelReason.CLOSED, 1, 0),
        (3, CancelReason.CLOSED, 2, 0),
        (4, CancelReason.CLOSED, 1, 0),
    ]
    assert levels(events) == [(BUY, 100, 0), (SELL, 110, 0), (SELL, 111, 0)]
    assert ids(d.book) == [] and d.book.next_expiry() is None
    assert d.submit(MarkStatus(ts=6, cancel_all=True)) == [StatusMarked(d.book.seq, 6)]
