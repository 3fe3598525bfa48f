"""Book subscribers: shared bytes in step, shared merged deltas when behind, bounded debt,
resync with a flag, heartbeats; trade subscribers overflow instead of growing."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.type.v1 import types_pb2 as t
from services.marketdata.domain import ASK, BID, L2Book, Level
from services.marketdata.fanout import BookFanout, BookSubscriber, Limits, TradeSubscriber


def lv(ticks: int, qty: int) -> Level:
    return Level(ticks, format(Decimal(ticks).scaleb(-2).normalize(), "f"), str(qty), 1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fanout(**limits: float) -> tuple[BookFanout, L2Book, Clock]:
    clock = Clock()
    fanout = BookFanout("BTC-USDT", Limits(**limits), clock=clock)  # type: ignore[arg-type]
    book = L2Book.of(10, [lv(100, 1)], [lv(101, 1)])
    fanout.reset(book, 0)
    return fanout, book, clock


def _move(fanout: BookFanout, book: L2Book, seq: int, side: int, level: Level) -> None:
    book.set(side, level)
    book.seq = seq
    fanout.update(seq)


async def _next(sub: BookSubscriber) -> md.StreamOrderBookResponse:
    return md.StreamOrderBookResponse.FromString(await asyncio.wait_for(sub.next(), 1))


async def test_subscribers_in_step_share_one_message() -> None:
    fanout, book, _ = _fanout()
    a, b = fanout.subscribe(5), fanout.subscribe(5)
    snap_a, snap_b = await _next(a), await _next(b)
    assert snap_a.snapshot.seq == snap_b.snapshot.seq == 10 and not snap_a.resynced
    _move(fanout, book, 11, BID, lv(99, 2))
    da, db = await asyncio.wait_for(a.next(), 1), await asyncio.wait_for(b.next(), 1)
    assert da is db  # serialized once
    delta = md.StreamOrderBookResponse.FromString(da).delta
    assert (delta.prev_seq, delta.seq) == (10, 11)


async def test_a_slow_subscriber_gets_one_conflated_delta() -> None:
    fanout, book, _ = _fanout()
    fast, slow = fanout.subscribe(5), fanout.subscribe(5)
    await _next(fast), await _next(slow)
    for seq, qty in ((11, 2), (12, 3), (13, 4)):
        _move(fanout, book, seq, BID, lv(99, qty))
        message = await _next(fast)
        assert message.delta.prev_seq == seq - 1
    _move(fanout, book, 14, ASK, lv(102, 1))
    await _next(fast)
    merged = (await _next(slow)).delta
    assert (merged.prev_seq, merged.seq) == (10, 14)
    assert [(x.price, x.quantity) for x in merged.bids] == [("0.99", "4")]
    assert [(x.price, x.quantity) for x in merged.asks] == [("1.02", "1")]
    assert merged.checksum == fanout.snapshot(5).checksum


async def test_subscribers_behind_from_the_same_seq_share_one_merged_delta() -> None:
    fanout, book, _ = _fanout()
    a, b, fast = fanout.subscribe(5), fanout.subscribe(5), fanout.subscribe(5)
    await _next(a), await _next(b), await _next(fast)
    for seq, qty in ((11, 2), (12, 3)):
        _move(fanout, book, seq, BID, lv(99, qty))
        await _next(fast)
    da, db = await asyncio.wait_for(a.next(), 1), await asyncio.wait_for(b.next(), 1)
    assert da is db  # built and serialized once for both
    merged = md.StreamOrderBookResponse.FromString(da).delta
    assert (merged.prev_seq, merged.seq) == (10, 12)
    assert [(x.price, x.quantity) for x in merged.bids] == [("0.99", "3")]


async def test_a_level_that_came_and_went_while_behind_is_left_out() -> None:
    fanout, book, _ = _fanout()
    slow = fanout.subscribe(5)
    await _next(slow)
    _move(fanout, book, 11, BID, lv(99, 2))
    _move(fanout, book, 12, BID, lv(99, 0))
    _move(fanout, book, 13, ASK, lv(102, 1))
    merged = (await _next(slow)).delta
    assert (merged.prev_seq, merged.seq) == (10, 13)
    assert not merged.bids and [(x.price, x.quantity) for x in merged.asks] == [("1.02", "1")]


async def test_too_many_events_behind_becomes_a_flagged_snapshot() -> None:
    fanout, book, _ = _fanout(max_lag=5)
    slow = fanout.subscribe(5)
    await _next(slow)
    for i in range(6):
        _move(fanout, book, 11 + i, BID, lv(99, i + 1))
    message = await _next(slow)
    assert message.WhichOneof("kind") == "snapshot" and message.resynced
    assert message.snapshot.seq == 16


async def test_too_much_debt_becomes_a_flagged_snapshot() -> None:
    fanout, book, _ = _fanout(max_levels=10)
    slow = fanout.subscribe(50)
    await _next(slow)
    for i in range(30):  # 30 distinct levels owed > 10
        _move(fanout, book, 11 + i, BID, lv(50 + i, 1))
    message = await _next(slow)
    assert message.WhichOneof("kind") == "snapshot" and message.resynced
    assert message.snapshot.seq == 40
    assert len(message.snapshot.bids) == 31
    _move(fanout, book, 41, ASK, lv(103, 1))
    follow = await _next(slow)
    assert (follow.delta.prev_seq, follow.delta.seq) == (40, 41)


async def test_a_rebuilt_book_resyncs_everyone() -> None:
    fanout, _, _ = _fanout()
    sub = fanout.subscribe(5)
    await _next(sub)
    fanout.reset(L2Book.of(99, [lv(100, 7)], []), 0)
    message = await _next(sub)
    assert message.resynced and message.snapshot.seq == 99


async def test_changes_outside_the_depth_only_move_seq_after_a_heartbeat() -> None:
    fanout, book, clock = _fanout(heartbeat_s=1.0)
    sub = fanout.subscribe(1)
    await _next(sub)
    _move(fanout, book, 11, BID, lv(50, 1))  # below the top 1
    _move(fanout, book, 12, BID, lv(51, 1))
    assert not sub.due
    clock.now = 2.0
    fanout.heartbeat()
    beat = await _next(sub)
    assert (beat.delta.prev_seq, beat.delta.seq) == (10, 12)
    assert not beat.delta.bids and not beat.delta.asks


async def test_a_subscriber_waiting_for_the_first_book_gets_it() -> None:
    fanout = BookFanout("BTC-USDT", Limits())
    sub = fanout.subscribe(5)
    waiting = asyncio.ensure_future(sub.next())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    fanout.reset(L2Book.of(3, [lv(100, 1)], []), 0)
    message = md.StreamOrderBookResponse.FromString(await asyncio.wait_for(waiting, 1))
    assert message.snapshot.seq == 3 and not message.resynced


async def test_a_trade_subscriber_that_falls_behind_overflows() -> None:
    sub = TradeSubscriber(frozenset(), size=3)
    for i in range(5):
        sub.offer([md.Trade(trade_id=str(i))])
    assert sub.overflowed
    assert await sub.next() == []  # the reader wakes and ends the stream


async def test_a_status_change_alone_is_a_delta_and_every_message_carries_the_status() -> None:
    fanout, book, _ = _fanout()
    sub, slow = fanout.subscribe(5), fanout.subscribe(5)
    first = await _next(sub)
    await _next(slow)
    assert first.snapshot.status == t.MARKET_STATUS_TRADING
    book.status, book.seq = t.MARKET_STATUS_HALTED, 11  # no level moved
    fanout.update(11)
    delta = (await _next(sub)).delta
    assert (delta.prev_seq, delta.seq, delta.status) == (10, 11, t.MARKET_STATUS_HALTED)
    assert not delta.bids and not delta.asks
    _move(fanout, book, 12, BID, lv(99, 2))
    assert (await _next(sub)).delta.status == t.MARKET_STATUS_HALTED
    merged = (await _next(slow)).delta  # behind: one merged delta, with the status now
    assert (merged.prev_seq, merged.seq, merged.status) == (10, 12, t.MARKET_STATUS_HALTED)
    assert fanout.snapshot(5).status == t.MARKET_STATUS_HALTED
    late = fanout.subscribe(5)
    assert (await _next(late)).snapshot.status == t.MARKET_STATUS_HALTED
