"""Property tests: random command streams drive both books side by side.

After every command the two books must agree exactly (events, L2, L3, stops,
state hash) and the invariants below must hold. Commands are drawn with an eye
on the book (cancels and amends mostly hit live orders), over a narrow price band
and a few accounts, so that orders cross, stops fire and self-trade prevention
triggers.

The HYPOTHESIS_PROFILE environment variable scales the number of examples:
unset or ``default`` keeps the whole run well under a minute on two cores; ``ci``
runs 5x, ``thorough`` 20x, ``nightly`` 100x as many.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.match import (
    Accepted,
    Amended,
    AmendOrder,
    Cancelled,
    CancelOrder,
    Command,
    Event,
    FastOrderBook,
    LevelChanged,
    MarketSpec,
    MassCancel,
    OrderBook,
    OrderType,
    PlaceOrder,
    ReferenceOrderBook,
    Rejected,
    Side,
    StpMode,
    TimeInForce,
    Trade,
)

# max_examples per test is its base count times the profile's factor.
_FACTOR = {"default": 1, "dev": 1, "ci": 5, "thorough": 20, "nightly": 100}
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")


def examples(base: int) -> settings:
    return settings(
        max_examples=base * _FACTOR.get(_PROFILE, 1),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


SPEC = MarketSpec("BTC-USD", tick_size=1, lot_size=1, min_qty=1, max_qty=50, min_notional=0)
LOW, HIGH = 95, 105
ACCOUNTS = [1, 2, 3, 4]

prices = st.integers(LOW, HIGH)
quantities = st.integers(1, 8)


@dataclass
class Stream:
    """What the drawing needs to know: the clock and which ids have been used."""

    ts: int = 1_000
    next_id: int = 1
    used: list[int] = field(default_factory=list)


def draw_command(data: st.DataObject, book: OrderBook, s: Stream) -> Command:
    s.ts += data.draw(st.sampled_from([0, 1, 1, 2, 5, 13]))
    ts = s.ts
    resting = book.l3()
    pending = book.stops()
    live = [(o.order_id, o.account_id) for o in resting + pending]
    kind = data.draw(
        st.sampled_from(
            ["limit"] * 16
            + ["market"] * 2
            + ["stop"] * 4
            + ["cancel"] * 3
            + ["amend"] * 10
            + ["mass"]
            + ["wild"] * 2
        )
    )
    account = data.draw(st.sampled_from(ACCOUNTS))

    def new_id() -> int:
        if s.used and data.draw(st.integers(0, 19)) == 0:
            return data.draw(st.sampled_from(s.used))  # duplicate if still live
        s.next_id += 1
        s.used.append(s.next_id)
        return s.next_id

    def target() -> tuple[int, int]:
        if live and data.draw(st.integers(0, 9)) > 0:
            oid, acct = data.draw(st.sampled_from(live))
            if data.draw(st.integers(0, 9)) == 0:
                acct = data.draw(st.sampled_from(ACCOUNTS))
            return oid, acct
        return data.draw(st.integers(0, s.next_id + 1)), account

    side = data.draw(st.sampled_from([Side.BUY, Side.SELL]))
    stp = data.draw(st.sampled_from(list(StpMode)))
    if kind == "limit":
        tif = data.draw(
            st.sampled_from(
                [TimeInForce.GTC] * 4 + [TimeInForce.IOC, TimeInForce.FOK] + [TimeInForce.GTD] * 2
            )
        )
        expire = ts + data.draw(st.integers(1, 150)) if tif is TimeInForce.GTD else None
        post_only = tif in (TimeInForce.GTC, TimeInForce.GTD) and data.draw(st.integers(0, 5)) == 0
        # Buyers mostly bid low and sellers ask high so the book has depth; the
        # overlap in the middle keeps orders crossing.
        price = data.draw(
            st.integers(LOW, HIGH - 3) if side is Side.BUY else st.integers(LOW + 3, HIGH)
        )
        return PlaceOrder(
            ts,
            new_id(),
            account,
            side,
            data.draw(quantities),
            price,
            OrderType.LIMIT,
            tif,
            None,
            expire,
            post_only,
            stp,
        )
    if kind in ("market", "stop"):
        stop = kind == "stop"
        is_market = not stop or data.draw(st.booleans())
        if is_market:
            otype = OrderType.STOP_MARKET if stop else OrderType.MARKET
            tif = data.draw(st.sampled_from([TimeInForce.IOC, TimeInForce.FOK]))
            bound = data.draw(st.sampled_from(["price", "budget", "both"]))
            price = data.draw(prices) if bound != "budget" else None
            budget = data.draw(st.integers(90, 900)) if bound != "price" else None
        else:
            otype = OrderType.STOP_LIMIT
            tif = data.draw(
                st.sampled_from(
                    [TimeInForce.GTC, TimeInForce.GTD, TimeInForce.IOC, TimeInForce.FOK]
                )
            )
            price, budget = data.draw(prices), None
        expire = ts + data.draw(st.integers(1, 150)) if tif is TimeInForce.GTD else None
        return PlaceOrder(
            ts,
            new_id(),
            account,
            side,
            data.draw(quantities),
            price,
            otype,
            tif,
            data.draw(prices) if stop else None,
            expire,
            False,
            stp,
            budget,
        )
    if kind == "cancel":
        oid, acct = target()
        return CancelOrder(ts, oid, acct)
    if kind == "amend":
        oid, acct = target()
        what = data.draw(st.sampled_from(["price", "price", "qty", "both", "odd"]))
        price = data.draw(prices) if what in ("price", "both") else None
        qty = data.draw(st.integers(1, 12)) if what in ("qty", "both") else None
        if what == "odd":
            price = data.draw(st.sampled_from([None, 0, -1]))
            qty = data.draw(st.sampled_from([None, 0]))
        return AmendOrder(ts, oid, acct, price, qty)
    if kind == "mass":
        return MassCancel(ts, account, data.draw(st.sampled_from([None, Side.BUY, Side.SELL])))
    # wild: anything goes, mostly rejected by validation
    return PlaceOrder(
        ts,
        new_id(),
        account,
        side,
        data.draw(st.integers(-1, 60)),
        data.draw(st.one_of(st.none(), st.integers(-1, HIGH + 2))),
        data.draw(st.sampled_from(list(OrderType))),
        data.draw(st.sampled_from(list(TimeInForce))),
        data.draw(st.one_of(st.none(), st.integers(-1, HIGH + 2))),
        data.draw(st.one_of(st.none(), st.integers(ts - 2, ts + 30))),
        data.draw(st.booleans()),
        stp,
        data.draw(st.one_of(st.none(), st.integers(-1, 500))),
    )


@dataclass
class Tally:
    ordered: int
    filled: int = 0
    cancelled: int = 0
    open: int = 0


class Checker:
    """Invariants that hold whatever the implementation, tracked from events alone."""

    def __init__(self) -> None:
        self.orders: dict[int, Tally] = {}
        self.l2: dict[tuple[Side, int], int] = {}

    # Over ruff's complexity limit on purpose: the model's one dispatch over every command kind.
    def apply(self, events: list[Event], prev_seq: int, book: OrderBook) -> None:  # noqa: C901
        assert [e.seq for e in events] == list(range(prev_seq + 1, prev_seq + 1 + len(events)))
        assert book.seq == prev_seq + len(events)
        rejected = [e for e in events if type(e) is Rejected]
        assert len(rejected) <= 1
        for e in events:
            if type(e) is Accepted:
                self.orders[e.order_id] = Tally(ordered=e.qty, open=e.qty)
            elif type(e) is Trade:
                assert e.qty > 0
                assert e.maker_account_id != e.taker_account_id, "self-trade"
                assert e.trade_id == e.seq
                for oid, leaves in (
                    (e.maker_order_id, e.maker_leaves),
                    (e.taker_order_id, e.taker_leaves),
                ):
                    t = self.orders[oid]
                    t.filled += e.qty
                    t.open -= e.qty
                    assert t.open == leaves
            elif type(e) is Cancelled:
                t = self.orders[e.order_id]
                assert e.qty > 0
                t.cancelled += e.qty
                t.open -= e.qty
                assert t.open == e.leaves
            elif type(e) is Amended:
                t = self.orders[e.order_id]
                assert e.qty == t.filled + e.leaves
                t.ordered += e.leaves - t.open
                t.open = e.leaves
            elif type(e) is LevelChanged:
                assert e.qty >= 0
                if e.qty:
                    self.l2[(e.side, e.price)] = e.qty
                else:
                    assert (e.side, e.price) in self.l2
                    del self.l2[(e.side, e.price)]
        for t in self.orders.values():
            assert t.ordered == t.filled + t.open + t.cancelled
            assert t.open >= 0

        resting = book.l3()
        pending = book.stops()
        live = {o.order_id: o for o in resting + pending}
        assert len(live) == len(resting) + len(pending), "order ids unique among live orders"
        for oid, t in self.orders.items():
            if oid in live:
                assert live[oid].leaves == t.open
                assert live[oid].qty == t.filled + t.open
            else:
                assert t.open == 0, f"order {oid} has open qty but is not in the book"

        # L2 from the LevelChanged stream equals the book's L2 equals L3 aggregated.
        bids, asks = book.l2()
        assert {(Side.BUY, p): q for p, q in bids} | {(Side.SELL, p): q for p, q in asks} == self.l2
        agg: dict[tuple[Side, int], int] = {}
        for o in resting:
            assert o.price is not None and o.leaves > 0 and o.qty >= o.leaves
            agg[(o.side, o.price)] = agg.get((o.side, o.price), 0) + o.leaves
        assert agg == self.l2
        # Not crossed; levels strictly ordered; priority within each level.
        if bids and asks:
            assert bids[0][0] < asks[0][0], "crossed book"
        assert [p for p, _ in bids] == sorted({p for p, _ in bids}, reverse=True)
        assert [p for p, _ in asks] == sorted({p for p, _ in asks})
        for a, b in itertools.pairwise(resting):
            if a.side is b.side and a.price == b.price:
                assert a.priority < b.priority, "time priority within a level"
        assert [o.side for o in resting] == sorted(
            (o.side for o in resting), key=lambda s: s is Side.SELL
        )
        # No pending stop may be left that the last price triggers.
        last = book.last_price
        for o in pending:
            assert o.stop_price is not None
            if last is not None:
                assert not (o.side is Side.BUY and last >= o.stop_price)
                assert not (o.side is Side.SELL and last <= o.stop_price)
        # Pending stops are in acceptance order.
        assert [o.accepted_seq for o in pending] == sorted(o.accepted_seq for o in pending)


def assert_same(fast: OrderBook, ref: OrderBook) -> None:
    assert fast.seq == ref.seq
    assert fast.last_price == ref.last_price
    assert fast.l2() == ref.l2()
    assert fast.l3() == ref.l3()
    assert fast.stops() == ref.stops()
    assert fast.state_hash() == ref.state_hash()
    for o in fast.l3():
        assert o.price is not None
        size = sum(1 for v in ref.l3() if v.side is o.side and v.price == o.price)
        assert fast.level_size(o.side, o.price) == ref.level_size(o.side, o.price) == size


@examples(300)
@given(st.data())
def test_books_agree_and_invariants_hold(data: st.DataObject) -> None:
    fast, ref = FastOrderBook(SPEC), ReferenceOrderBook(SPEC)
    stream = Stream()
    checker = Checker()
    for _ in range(data.draw(st.integers(1, 80), label="commands")):
        cmd = draw_command(data, fast, stream)
        prev = fast.seq
        got = fast.submit(cmd).events
        want = ref.submit(cmd).events
        assert got == want, f"events differ for {cmd}"
        checker.apply(got, prev, fast)
        assert_same(fast, ref)


@examples(100)
@given(st.data())
def test_snapshot_restore_continues_identically(data: st.DataObject) -> None:
    stream = Stream()
    straight = FastOrderBook(SPEC)
    cmds: list[Command] = []
    snap = b""
    n = data.draw(st.integers(2, 60), label="commands")
    cut = data.draw(st.integers(1, n - 1), label="cut")
    for i in range(n):
        cmd = draw_command(data, straight, stream)
        cmds.append(cmd)
        straight.submit(cmd)
        if i + 1 == cut:
            snap = straight.snapshot()
    later = cmds[cut:]
    for cls in (FastOrderBook, ReferenceOrderBook):
        restored: OrderBook = cls.restore(snap)
        assert restored.snapshot() == snap
        replay = FastOrderBook(SPEC)
        for cmd in cmds[:cut]:
            replay.submit(cmd)
        assert replay.state_hash() == restored.state_hash()
        for cmd in later:
            assert restored.submit(cmd).events == replay.submit(cmd).events
        assert restored.state_hash() == replay.state_hash() == straight.state_hash()


@examples(50)
@given(st.data())
def test_replay_is_deterministic(data: st.DataObject) -> None:
    """The same commands from the same state give the same events and hash."""
    stream = Stream()
    first = FastOrderBook(SPEC)
    cmds: list[Command] = []
    events: list[Any] = []
    for _ in range(data.draw(st.integers(1, 60))):
        cmd = draw_command(data, first, stream)
        cmds.append(cmd)
        events += first.submit(cmd).events
    second = FastOrderBook(SPEC)
    again: list[Any] = []
    for cmd in cmds:
        again += second.submit(cmd).events
    assert again == events
    assert second.state_hash() == first.state_hash()


def random_command(rng: random.Random, book: OrderBook, s: Stream) -> Command:
    """A plain seeded generator for long streams (deeper books, GTD churn)."""
    s.ts += rng.choice([0, 1, 1, 2, 3])
    ts = s.ts
    account = rng.randint(1, 6)
    side = rng.choice([Side.BUY, Side.SELL])
    stp = rng.choice(list(StpMode))
    r = rng.random()
    if r < 0.45:
        s.next_id += 1
        tif = rng.choice([TimeInForce.GTC, TimeInForce.GTD, TimeInForce.GTD, TimeInForce.IOC])
        expire = ts + rng.randint(1, 400) if tif is TimeInForce.GTD else None
        lo, hi = (LOW - 10, HIGH - 2) if side is Side.BUY else (LOW + 2, HIGH + 10)
        return PlaceOrder(
            ts,
            s.next_id,
            account,
            side,
            rng.randint(1, 9),
            rng.randint(lo, hi),
            tif=tif,
            expire_time=expire,
            stp=stp,
            post_only=rng.random() < 0.1,
        )
    if r < 0.55:
        s.next_id += 1
        stop = rng.random() < 0.5
        if rng.random() < 0.5:
            otype = OrderType.STOP_MARKET if stop else OrderType.MARKET
            return PlaceOrder(
                ts,
                s.next_id,
                account,
                side,
                rng.randint(1, 15),
                rng.choice([None, rng.randint(LOW - 10, HIGH + 10)]),
                otype,
                rng.choice([TimeInForce.IOC, TimeInForce.FOK]),
                rng.randint(LOW, HIGH) if stop else None,
                None,
                False,
                stp,
                rng.randint(100, 2_000),
            )
        otype = OrderType.STOP_LIMIT if stop else OrderType.LIMIT
        return PlaceOrder(
            ts,
            s.next_id,
            account,
            side,
            rng.randint(1, 15),
            rng.randint(LOW - 5, HIGH + 5),
            otype,
            rng.choice([TimeInForce.FOK, TimeInForce.IOC, TimeInForce.GTC]),
            rng.randint(LOW, HIGH) if stop else None,
            None,
            False,
            stp,
        )
    live = book.l3()
    if not live or r < 0.6:
        return (
            MassCancel(ts, account, rng.choice([None, Side.BUY, Side.SELL]))
            if rng.random() < 0.2
            else CancelOrder(ts, rng.randint(1, s.next_id + 1), account)
        )
    o = rng.choice(live)
    if r < 0.7:
        return CancelOrder(ts, o.order_id, o.account_id)
    assert o.price is not None
    return AmendOrder(
        ts,
        o.order_id,
        o.account_id,
        rng.choice([None, o.price + rng.randint(-3, 3)]),
        rng.choice([None, None, o.qty - 1, o.qty + rng.randint(1, 5)]),
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_random_streams_agree(seed: int) -> None:
    rng = random.Random(seed)
    fast, ref = FastOrderBook(SPEC), ReferenceOrderBook(SPEC)
    stream, checker = Stream(), Checker()
    for i in range(2_500):
        cmd = random_command(rng, fast, stream)
        prev = fast.seq
        got = fast.submit(cmd).events
        assert got == ref.submit(cmd).events, f"step {i}: {cmd}"
        checker.apply(got, prev, fast)
        if i % 50 == 0:
            assert_same(fast, ref)
    assert_same(fast, ref)
