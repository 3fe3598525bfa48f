"""L2 books from level changes, depth views and their deltas, the checksum."""

from __future__ import annotations

import zlib
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.marketdata.domain import ASK, BID, DepthView, L2Book, Level, checksum


def lv(ticks: int, qty: int, count: int = 1) -> Level:
    return Level(ticks, format(Decimal(ticks).scaleb(-2).normalize(), "f"), str(qty), count)


def test_levels_sort_best_first_and_zero_removes() -> None:
    book = L2Book()
    for t in (100, 102, 101):
        book.set(BID, lv(t, 1))
        book.set(ASK, lv(t + 10, 1))
    assert [x.ticks for x in book.top(BID)] == [102, 101, 100]
    assert [x.ticks for x in book.top(ASK)] == [110, 111, 112]
    book.set(BID, lv(102, 0))
    book.set(ASK, lv(111, 0))
    book.set(ASK, lv(999, 0))  # removing an unknown level is harmless
    assert [x.ticks for x in book.top(BID, 5)] == [101, 100]
    assert [x.ticks for x in book.top(ASK, 1)] == [110]
    book.set(BID, lv(100, 7, 3))  # replace
    assert book.level(BID, 100) == lv(100, 7, 3)


def test_checksum_is_the_documented_string() -> None:
    bids = [Level(1, "100.5", "1.25", 1), Level(2, "100", "3", 2)]
    asks = [Level(3, "101", "0.5", 1)]
    assert checksum(bids, asks) == zlib.crc32(b"100.5:1.25:101:0.5:100:3")
    many = [Level(i, str(1000 - i), "1", 1) for i in range(40)]
    expected = ":".join(f"{1000 - i}:1" for i in range(25))
    assert checksum(many, []) == zlib.crc32(expected.encode())
    assert checksum([], []) == zlib.crc32(b"")


def test_a_level_entering_the_top_comes_with_its_quantity() -> None:
    book = L2Book.of(1, [lv(100, 1), lv(99, 2), lv(98, 3)], [])
    view = DepthView.of(book, 2)
    book.set(BID, lv(100, 0))  # 98 enters the top 2
    delta = view.advance(book)
    assert set(delta.bids) == {lv(98, 3), Level(100, "1", "0", 0)}
    book.set(BID, lv(101, 5))  # 98 is pushed out again
    delta = view.advance(book)
    assert set(delta.bids) == {lv(101, 5), Level(98, "0.98", "0", 0)}
    book.set(BID, lv(50, 5))  # below the view: nothing to say
    assert view.advance(book).empty


changes = st.lists(
    st.tuples(
        st.sampled_from([BID, ASK]),
        st.integers(1, 30),
        st.integers(0, 4),
        st.integers(1, 3),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(initial=changes, batches=st.lists(changes, max_size=8), depth=st.integers(1, 12))
def test_deltas_rebuild_exactly_the_top_of_the_book(
    initial: list[tuple[int, int, int, int]],
    batches: list[list[tuple[int, int, int, int]]],
    depth: int,
) -> None:
    """A client applying the deltas to a snapshot holds exactly the view, checksum included,
    whatever the changes (bids and asks may even cross here: the book does not care)."""
    book = L2Book()
    model: dict[int, dict[int, Level]] = {BID: {}, ASK: {}}

    def put(side: int, ticks: int, qty: int, count: int) -> None:
        level = lv(ticks, qty, count)
        book.set(side, level)
        if qty:
            model[side][ticks] = level
        else:
            model[side].pop(ticks, None)

    for change in initial:
        put(*change)
    view = DepthView.of(book, depth)
    held = {BID: {x.ticks: x for x in view.bids}, ASK: {x.ticks: x for x in view.asks}}
    for batch in batches:
        for change in batch:
            put(*change)
        delta = view.advance(book)
        for side, levels in ((BID, delta.bids), (ASK, delta.asks)):
            for level in levels:
                if level.quantity == "0":
                    del held[side][level.ticks]
                else:
                    held[side][level.ticks] = level
        want_bids = [model[BID][t] for t in sorted(model[BID], reverse=True)][:depth]
        want_asks = [model[ASK][t] for t in sorted(model[ASK])][:depth]
        got_bids = [held[BID][t] for t in sorted(held[BID], reverse=True)]
        got_asks = [held[ASK][t] for t in sorted(held[ASK])]
        assert (got_bids, got_asks) == (want_bids, want_asks)
        assert delta.checksum == checksum(want_bids, want_asks)
