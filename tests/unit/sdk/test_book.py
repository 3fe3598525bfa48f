"""BookState: the snapshot/delta chain, its checks, and the checksum.

The SDK does not import services/; these tests hold its checksum and delta
handling to market data's own (services.marketdata.domain): the deltas fed in
are the ones market data's DepthView computes for random level changes.
"""

from __future__ import annotations

import random
import zlib

import pytest

from cex.marketdata.v1 import marketdata_pb2 as md
from cex.type.v1 import types_pb2
from cex_sdk import BookOutOfSync, BookState, Level, book_checksum
from services.marketdata import domain


def _pb(levels: list[domain.Level]) -> list[types_pb2.PriceLevel]:
    return [types_pb2.PriceLevel(price=lv.price, quantity=lv.quantity) for lv in levels]


def _snapshot(
    view: domain.DepthView, seq: int, resynced: bool = False
) -> md.StreamOrderBookResponse:
    return md.StreamOrderBookResponse(
        snapshot=md.OrderBook(
            market="X", seq=seq, bids=_pb(view.bids), asks=_pb(view.asks), checksum=view.checksum
        ),
        resynced=resynced,
    )


def _delta(delta: domain.BookDelta, prev: int, seq: int) -> md.StreamOrderBookResponse:
    return md.StreamOrderBookResponse(
        delta=md.OrderBookDelta(
            market="X",
            prev_seq=prev,
            seq=seq,
            bids=_pb(list(delta.bids)),
            asks=_pb(list(delta.asks)),
            checksum=delta.checksum,
        )
    )


def _random_change(rng: random.Random, book: domain.L2Book) -> None:
    side = rng.choice((domain.BID, domain.ASK))
    ticks = rng.randrange(9_000, 10_000) if side == domain.BID else rng.randrange(10_001, 11_000)
    quantity = "0" if rng.random() < 0.3 else f"{rng.randrange(1, 500) / 1000:.3f}"
    book.set(side, domain.Level(ticks, f"{ticks / 100:.2f}", quantity, 1))


def test_the_checksum_is_market_data_s() -> None:
    rng = random.Random(7)
    for _ in range(200):
        book = domain.L2Book()
        for _ in range(rng.randrange(0, 80)):
            _random_change(rng, book)
        bids, asks = book.top(domain.BID), book.top(domain.ASK)
        mine = book_checksum(
            [Level(lv.price, lv.quantity) for lv in bids],
            [Level(lv.price, lv.quantity) for lv in asks],
        )
        assert mine == domain.checksum(bids, asks)


def test_the_checksum_string_interleaves_the_top_25_levels() -> None:
    bids = [Level("99.5", "1"), Level("99", "2")]
    asks = [Level("100", "3")]
    assert book_checksum(bids, asks) == zlib.crc32(b"99.5:1:100:3:99:2")
    assert book_checksum([], []) == zlib.crc32(b"")
    many = [Level(str(100 - i), "1") for i in range(30)]
    assert book_checksum(many, []) == book_checksum(many[:25], [])


def test_a_local_book_follows_market_data_s_deltas_exactly() -> None:
    rng = random.Random(3)
    book = domain.L2Book()
    for _ in range(60):
        _random_change(rng, book)
    view = domain.DepthView.of(book, 10)
    state = BookState("X", depth=10)
    state.apply(_snapshot(view, 1))
    seq = 1
    for _ in range(300):
        for _ in range(rng.randrange(1, 4)):
            _random_change(rng, book)
        delta = view.advance(book)
        state.apply(_delta(delta, seq, seq + 1))
        seq += 1
        assert [(lv.price, lv.quantity) for lv in state.bids()] == [
            (lv.price, lv.quantity) for lv in view.bids
        ]
        assert [(lv.price, lv.quantity) for lv in state.asks()] == [
            (lv.price, lv.quantity) for lv in view.asks
        ]
    assert state.seq == seq and state.synced


def _small() -> tuple[domain.L2Book, domain.DepthView]:
    book = domain.L2Book.of(
        5,
        [domain.Level(9900, "99.00", "1", 1)],
        [domain.Level(10100, "101.00", "2", 1)],
    )
    return book, domain.DepthView.of(book, 10)


def test_a_delta_that_does_not_start_at_the_book_s_seq_is_a_gap() -> None:
    book, view = _small()
    state = BookState("X")
    with pytest.raises(BookOutOfSync) as early:
        state.apply(_delta(domain.BookDelta((), (), view.checksum), 4, 5))
    assert early.value.reason == "gap"
    state.apply(_snapshot(view, 5))
    book.set(domain.BID, domain.Level(9950, "99.50", "1", 1))
    with pytest.raises(BookOutOfSync) as gap:
        state.apply(_delta(view.advance(book), 6, 7))  # 5 -> 6 never arrived
    assert gap.value.reason == "gap" and not state.synced
    state.apply(_snapshot(view, 7, resynced=True))  # the rebuild
    assert state.synced and state.seq == 7
    assert [lv.price for lv in state.bids()] == ["99.50", "99.00"]


def test_a_checksum_mismatch_unsyncs_the_book() -> None:
    book, view = _small()
    state = BookState("X")
    state.apply(_snapshot(view, 5))
    book.set(domain.ASK, domain.Level(10100, "101.00", "1.5", 1))
    good = _delta(view.advance(book), 5, 6)
    bad = md.StreamOrderBookResponse()
    bad.CopyFrom(good)
    bad.delta.asks[0].quantity = "1.6"
    with pytest.raises(BookOutOfSync) as mismatch:
        state.apply(bad)
    assert mismatch.value.reason == "checksum" and not state.synced
    with pytest.raises(BookOutOfSync):
        BookState("X").apply(
            md.StreamOrderBookResponse(snapshot=md.OrderBook(seq=1, checksum=view.checksum + 1))
        )


def test_zero_quantities_remove_levels_and_the_depth_is_kept() -> None:
    state = BookState("X", depth=2)
    levels = [types_pb2.PriceLevel(price=p, quantity="1") for p in ("99", "98", "97")]
    kept = [Level("99", "1"), Level("98", "1")]
    state.apply(
        md.StreamOrderBookResponse(
            snapshot=md.OrderBook(seq=1, bids=levels, checksum=book_checksum(kept, []))
        )
    )
    assert state.bids() == kept
    state.apply(
        md.StreamOrderBookResponse(
            delta=md.OrderBookDelta(
                prev_seq=1,
                seq=2,
                bids=[types_pb2.PriceLevel(price="99", quantity="0.000")],
                checksum=book_checksum([Level("98", "1")], []),
            )
        )
    )
    assert state.bids() == [Level("98", "1")] and state.seq == 2
